//! Checkpoint sync between a primary and a backup over the authenticated
//! peer link (message types `0x0200..=0x02ff`).
//!
//! ```text
//! Primary                                         Backup
//!   │ HELLO {version, page size, pages, slots} ──►  │  (decoder store reset)
//!   │ (encoder store reset) ◄── HELLO_ACK {applied seq | none}
//!   │ [seq unknown to the primary]
//!   │ HASH_REQUEST ─────────────────────────────►   │
//!   │ ◄──────────────────── HASHES {start, hashes}… │
//!   │ loop per checkpoint:
//!   │ CKPT_BEGIN {seq, total} ──────────────────►   │
//!   │ CKPT_DATA  {bytes}…     ──────────────────►   │  buffer (bounded)
//!   │ CKPT_END                ──────────────────►   │  decode + verify,
//!   │                                              │  redo file + fsync,
//!   │                                              │  apply + fsync, state
//!   │ ◄────────────────── ACK {seq, pages, apply ns}
//! ```
//!
//! Recovery rules: both sides empty their reference stores on every new
//! connection. The backup announces the last checkpoint its image holds; the
//! primary keeps the page hashes of its last acknowledged checkpoint and of
//! the one in flight, so it knows exactly which pages differ. If the backup's
//! sequence number is neither, the primary asks for the backup's page hashes
//! and sends every page that differs. A checkpoint cut in the middle is never
//! applied: the backup's image stays on the previous checkpoint.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use understudy_durable::{Durability, ReplaceError};
use xxhash_rust::xxh3::Xxh3;

use crate::codec::{CodecConfig, CodecError, Decoded, Decoder, Encoder, HEADER_LEN, KindCounts};
use crate::image::{self, DirtyTracker, ImageError, page_hash};
use crate::page::PAGE_SIZE;

/// Protocol version in HELLO.
pub const PROTOCOL_VERSION: u16 = 1;
/// Primary -> backup: session parameters.
pub const MSG_HELLO: u16 = 0x0201;
/// Backup -> primary: which checkpoint the backup holds.
pub const MSG_HELLO_ACK: u16 = 0x0202;
/// Primary -> backup: send your page hashes.
pub const MSG_HASH_REQUEST: u16 = 0x0203;
/// Backup -> primary: a run of page hashes.
pub const MSG_HASHES: u16 = 0x0204;
/// Primary -> backup: a checkpoint starts.
pub const MSG_CKPT_BEGIN: u16 = 0x0210;
/// Primary -> backup: checkpoint bytes.
pub const MSG_CKPT_DATA: u16 = 0x0211;
/// Primary -> backup: the checkpoint is complete.
pub const MSG_CKPT_END: u16 = 0x0212;
/// Backup -> primary: checkpoint applied.
pub const MSG_ACK: u16 = 0x0220;

/// Page hashes per HASHES message (16 B each: 1 MiB).
const HASHES_PER_MSG: usize = 65536;

/// A message transport: the peer link, or anything framed alike.
pub trait Transport {
    /// Send one message made of `parts`.
    fn send_parts(&mut self, msg_type: u16, parts: &[&[u8]]) -> Result<(), SyncError>;
    /// Receive the next message into `buf`; returns its type.
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<u16, SyncError>;
}

impl Transport for understudy_peer::Link {
    fn send_parts(&mut self, msg_type: u16, parts: &[&[u8]]) -> Result<(), SyncError> {
        understudy_peer::Link::send_parts(self, msg_type, parts).map_err(SyncError::Link)
    }
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<u16, SyncError> {
        self.recv_into(buf).map_err(SyncError::Link)
    }
}

/// Failures of the sync protocol. Any error ends the connection; both sides
/// resynchronise on the next one.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The link failed.
    #[error("peer link failed; reconnect to resume from the last acknowledged checkpoint")]
    Link(#[source] understudy_peer::PeerError),
    /// The other side broke the protocol.
    #[error("protocol violation: {0}; check that both sides run the same understudy version")]
    Protocol(String),
    /// Configurations differ.
    #[error("primary and backup disagree: {0}; configure both sides alike")]
    Mismatch(String),
    /// Encoding or decoding failed.
    #[error("checkpoint codec failed")]
    Codec(#[source] CodecError),
    /// Dirty detection failed.
    #[error("dirty page detection failed")]
    Dirty(#[source] ImageError),
    /// Backup image I/O failed.
    #[error(
        "backup image {op} failed on {path}; check the disk, then restart the backup (the redo file replays)"
    )]
    Io {
        /// Operation.
        op: &'static str,
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Replacing the redo or state file of the backup image failed.
    #[error(
        "cannot write the backup's {file}; check the disk, then restart the backup (the image keeps its last complete checkpoint)"
    )]
    Persist {
        /// Which file: `redo file` or `state file`.
        file: &'static str,
        /// Cause (names the step and path).
        #[source]
        source: ReplaceError,
    },
    /// The state file of the backup image is not one this crate wrote.
    #[error("state file {path} is damaged; delete it to force a hash resync")]
    StateDamaged {
        /// File.
        path: String,
    },
    /// The backup image and the backup's configuration disagree on its size.
    #[error(
        "backup image {path} has {image_pages} pages but the sync configuration says {config_pages}; open the image with the configured page count"
    )]
    ImageSize {
        /// Image file.
        path: String,
        /// Pages the image was opened with.
        image_pages: u64,
        /// Pages in the configuration.
        config_pages: u64,
    },
    /// A checkpoint was sent without a session.
    #[error(
        "no sync session: call handshake on the (new) connection before sending a checkpoint; any failed checkpoint needs a new handshake"
    )]
    NoSession,
}

/// Settings of both sides.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SyncConfig {
    /// Codec parameters (must match on both sides).
    pub codec: CodecConfig,
    /// Bytes per CKPT_DATA message. Default: 1 MiB.
    pub chunk_bytes: usize,
    /// fsync the redo file, image and state (turn off only for tests on
    /// throwaway images). Default: true.
    pub durable: bool,
}

impl SyncConfig {
    /// Defaults for an image of `image_pages` pages.
    pub fn new(image_pages: u64) -> Self {
        Self {
            codec: CodecConfig::new(image_pages),
            chunk_bytes: 1 << 20,
            durable: true,
        }
    }

    /// Largest encoded checkpoint the backup accepts for this image.
    pub fn max_checkpoint_bytes(&self) -> u64 {
        HEADER_LEN as u64 + self.codec.image_pages * (PAGE_SIZE as u64 * 2 + 64)
    }
}

/// What one checkpoint cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// Sequence number.
    pub seq: u64,
    /// Dirty pages sent.
    pub dirty_pages: u64,
    /// Encoded bytes on the wire (without link framing).
    pub wire_bytes: u64,
    /// Pages by kind.
    pub kinds: KindCounts,
    /// Dirty detection + encoding time.
    pub encode: Duration,
    /// From first byte sent to acknowledgement.
    pub transfer: Duration,
    /// Time the backup spent verifying and applying.
    pub backup_apply: Duration,
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn proto(s: &str) -> SyncError {
    SyncError::Protocol(s.to_string())
}

/// The primary side.
#[derive(Debug)]
pub struct Primary {
    cfg: SyncConfig,
    enc: Encoder,
    /// Hashes of what the backup holds (last acknowledged checkpoint), and
    /// its sequence number.
    acked: Option<(u64, DirtyTracker)>,
    /// The checkpoint sent but not acknowledged.
    inflight: Option<(u64, DirtyTracker)>,
    /// Base for the next checkpoint, chosen at handshake.
    base: DirtyTracker,
    next_seq: u64,
    ready: bool,
    buf: Vec<u8>,
    /// Encoded checkpoint, reused (no fresh allocation per checkpoint).
    wire: Vec<u8>,
}

impl Primary {
    /// A primary that has never synced.
    pub fn new(cfg: SyncConfig) -> Self {
        Self {
            cfg,
            enc: Encoder::new(cfg.codec),
            wire: Vec::new(),
            acked: None,
            inflight: None,
            base: DirtyTracker::new(),
            next_seq: 1,
            ready: false,
            buf: Vec::new(),
        }
    }

    /// Last checkpoint the backup acknowledged.
    pub fn acked_seq(&self) -> Option<u64> {
        self.acked.as_ref().map(|a| a.0)
    }

    /// Start a session on a new connection.
    pub fn handshake<T: Transport>(&mut self, t: &mut T) -> Result<(), SyncError> {
        self.ready = false;
        self.enc.reset();
        let c = &self.cfg.codec;
        t.send_parts(
            MSG_HELLO,
            &[
                &PROTOCOL_VERSION.to_le_bytes(),
                &(PAGE_SIZE as u32).to_le_bytes(),
                &c.image_pages.to_le_bytes(),
                &c.store_slots.to_le_bytes(),
            ],
        )?;
        let ty = t.recv(&mut self.buf)?;
        if ty != MSG_HELLO_ACK || self.buf.len() != 11 {
            return Err(proto("expected HELLO_ACK"));
        }
        let applied = (self.buf[2] == 1).then(|| u64_at(&self.buf, 3)).flatten();
        let known = |x: &Option<(u64, DirtyTracker)>| match (x, applied) {
            (Some((s, tr)), Some(a)) if *s == a => Some(tr.clone()),
            _ => None,
        };
        self.base = if let Some(tr) = known(&self.acked) {
            tr
        } else if let Some(tr) = known(&self.inflight) {
            // Applied but the ACK was lost.
            self.acked = self.inflight.take();
            tr
        } else if applied.is_none() {
            DirtyTracker::new()
        } else {
            tracing::info!(
                ?applied,
                "backup holds an unknown checkpoint: comparing page hashes"
            );
            DirtyTracker::from_hashes(self.fetch_hashes(t)?)
        };
        self.inflight = None;
        if let Some(a) = applied {
            self.next_seq = self.next_seq.max(a + 1);
        }
        self.ready = true;
        Ok(())
    }

    fn fetch_hashes<T: Transport>(&mut self, t: &mut T) -> Result<Vec<u128>, SyncError> {
        t.send_parts(MSG_HASH_REQUEST, &[])?;
        let pages = self.cfg.codec.image_pages as usize;
        let mut hashes = Vec::with_capacity(pages);
        while hashes.len() < pages {
            let ty = t.recv(&mut self.buf)?;
            let start = u64_at(&self.buf, 0).ok_or_else(|| proto("short HASHES"))?;
            let body = &self.buf[8..];
            if ty != MSG_HASHES
                || start != hashes.len() as u64
                || !body.len().is_multiple_of(16)
                || body.is_empty()
                || hashes.len() + body.len() / 16 > pages
            {
                return Err(proto("bad HASHES message"));
            }
            hashes.extend(
                body.chunks_exact(16)
                    .map(|h| u128::from_le_bytes(h.try_into().unwrap_or([0; 16]))),
            );
        }
        Ok(hashes)
    }

    /// Send the pages of `image` that changed since what the backup holds,
    /// found by comparing page hashes.
    pub fn checkpoint<T: Transport>(
        &mut self,
        t: &mut T,
        image: &[u8],
    ) -> Result<CheckpointReport, SyncError> {
        let t0 = Instant::now();
        let mut next = self.base.clone();
        let dirty = next.scan(image).map_err(SyncError::Dirty)?;
        self.send(t, image, &dirty, next, t0)
    }

    /// Like [`checkpoint`](Self::checkpoint) but with the dirty pages given
    /// by a bitmap (one bit per page, e.g. from the KVM dirty log); only
    /// those pages are hashed. Right after a (re)connection a full hash scan
    /// is done instead, because pages of a lost checkpoint must be resent.
    pub fn checkpoint_bitmap<T: Transport>(
        &mut self,
        t: &mut T,
        image: &[u8],
        bitmap: &[u64],
    ) -> Result<CheckpointReport, SyncError> {
        if self.acked.is_none() || self.base.hashes().is_empty() || self.just_connected() {
            return self.checkpoint(t, image);
        }
        let t0 = Instant::now();
        let mut next = self.base.clone();
        let dirty = next.from_bitmap(image, bitmap).map_err(SyncError::Dirty)?;
        self.send(t, image, &dirty, next, t0)
    }

    fn just_connected(&self) -> bool {
        self.acked
            .as_ref()
            .is_none_or(|(s, _)| *s + 1 != self.next_seq)
    }

    fn send<T: Transport>(
        &mut self,
        t: &mut T,
        image: &[u8],
        dirty: &[u64],
        next: DirtyTracker,
        t0: Instant,
    ) -> Result<CheckpointReport, SyncError> {
        if !self.ready {
            return Err(SyncError::NoSession);
        }
        // Any failure from here on needs a new handshake.
        self.ready = false;
        let seq = self.next_seq;
        let pages = image::pages(image, dirty);
        let enc = self
            .enc
            .encode_into(seq, &pages, &mut self.wire)
            .map_err(SyncError::Codec)?;
        let encode = t0.elapsed();
        let t1 = Instant::now();
        let backup_apply = match self.transfer(t, seq) {
            Ok(d) => d,
            Err(e) => {
                // The backup may have applied it and lost only the ACK: the
                // next handshake recognises it by its sequence number.
                self.inflight = Some((seq, next));
                return Err(e);
            }
        };
        let transfer = t1.elapsed();
        self.inflight = None;
        self.base = next.clone();
        self.acked = Some((seq, next));
        self.next_seq = seq + 1;
        self.ready = true;
        Ok(CheckpointReport {
            seq,
            dirty_pages: dirty.len() as u64,
            wire_bytes: self.wire.len() as u64,
            kinds: enc.kinds,
            encode,
            transfer,
            backup_apply,
        })
    }

    /// Send the encoded checkpoint `seq` and wait for its ACK; returns the
    /// time the backup says it spent applying it.
    fn transfer<T: Transport>(&mut self, t: &mut T, seq: u64) -> Result<Duration, SyncError> {
        t.send_parts(
            MSG_CKPT_BEGIN,
            &[&seq.to_le_bytes(), &(self.wire.len() as u64).to_le_bytes()],
        )?;
        for chunk in self.wire.chunks(self.cfg.chunk_bytes.max(1)) {
            t.send_parts(MSG_CKPT_DATA, &[chunk])?;
        }
        t.send_parts(MSG_CKPT_END, &[])?;
        let ty = t.recv(&mut self.buf)?;
        if ty != MSG_ACK || u64_at(&self.buf, 0) != Some(seq) {
            return Err(proto("expected ACK for the checkpoint just sent"));
        }
        Ok(Duration::from_nanos(u64_at(&self.buf, 16).unwrap_or(0)))
    }
}

const REDO_MAGIC: &[u8; 8] = b"USMREDO1";
const STATE_MAGIC: &[u8; 8] = b"USMSTAT1";

/// A file-backed backup image that always holds exactly one checkpoint.
///
/// Apply order: redo file (tmp, fsync, rename, fsync dir) -> image writes ->
/// fsync image -> state file with the sequence number (tmp, fsync, rename)
/// -> remove redo. On open a complete redo file is replayed. The redo file
/// is the commit point: a crash before its rename leaves the previous
/// checkpoint, a crash after it ends with the new one.
#[derive(Debug)]
pub struct BackupImage {
    path: PathBuf,
    file: File,
    pages: u64,
    durable: bool,
    applied: Option<u64>,
}

fn side(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

impl BackupImage {
    /// Open (creating if needed) an image of `pages` pages at `path`, and
    /// finish any checkpoint a crash interrupted.
    pub fn open(path: &Path, pages: u64, durable: bool) -> Result<Self, SyncError> {
        let io = |op| {
            let p = path.display().to_string();
            move |source| SyncError::Io {
                op,
                path: p,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let len = pages * PAGE_SIZE as u64;
        if file.metadata().map_err(io("stat"))?.len() != len {
            file.set_len(len).map_err(io("resize"))?;
        }
        let mut me = Self {
            path: path.to_path_buf(),
            file,
            pages,
            durable,
            applied: None,
        };
        me.applied = me.read_state()?;
        me.recover()?;
        Ok(me)
    }

    /// The checkpoint the image holds.
    pub fn applied_seq(&self) -> Option<u64> {
        self.applied
    }

    /// Pages in the image.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn io(&self, op: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> SyncError {
        let path = p.display().to_string();
        move |source| SyncError::Io { op, path, source }
    }

    fn read_state(&self) -> Result<Option<u64>, SyncError> {
        let p = side(&self.path, ".state");
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("read state", &p)(e)),
        };
        let damaged = || SyncError::StateDamaged {
            path: p.display().to_string(),
        };
        if b.len() != 24 || &b[..8] != STATE_MAGIC {
            return Err(damaged());
        }
        let seq = u64_at(&b, 8).unwrap_or(0);
        if u64_at(&b, 16) != Some(xxhash_rust::xxh3::xxh3_64(&b[..16])) {
            return Err(damaged());
        }
        Ok(Some(seq))
    }

    /// Replace `p` with `data` atomically; durably unless this image was
    /// opened for throwaway tests (`durable == false`).
    fn write_atomic(&self, file: &'static str, p: &Path, data: &[u8]) -> Result<(), SyncError> {
        let durability = if self.durable {
            Durability::Durable
        } else {
            Durability::ProcessCrashOnly
        };
        understudy_durable::replace_with(p, data, durability, |_| Ok(()))
            .map_err(|source| SyncError::Persist { file, source })
    }

    /// Write the redo file for `d` (the commit point). Public so that tests
    /// can simulate a crash right after it.
    pub fn write_redo(&self, d: &Decoded) -> Result<(), SyncError> {
        let mut b = Vec::with_capacity(40 + d.pfns.len() * 8 + d.data.len());
        b.extend_from_slice(REDO_MAGIC);
        b.extend_from_slice(&d.seq.to_le_bytes());
        b.extend_from_slice(&(d.pfns.len() as u64).to_le_bytes());
        for p in &d.pfns {
            b.extend_from_slice(&p.to_le_bytes());
        }
        b.extend_from_slice(&d.data);
        let mut h = Xxh3::new();
        h.update(&b);
        b.extend_from_slice(&h.digest128().to_le_bytes());
        self.write_atomic("redo file", &side(&self.path, ".redo"), &b)
    }

    fn recover(&mut self) -> Result<(), SyncError> {
        let p = side(&self.path, ".redo");
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io("open redo", &p)(e)),
        };
        let max = 40 + self.pages * (8 + PAGE_SIZE as u64);
        let mut b = Vec::new();
        Read::by_ref(&mut f)
            .take(max + 1)
            .read_to_end(&mut b)
            .map_err(self.io("read redo", &p))?;
        let parsed = (|| {
            if b.len() < 40 || b.len() as u64 > max || &b[..8] != REDO_MAGIC {
                return None;
            }
            let body = &b[..b.len() - 16];
            let sum = u128::from_le_bytes(b[b.len() - 16..].try_into().ok()?);
            let mut h = Xxh3::new();
            h.update(body);
            if h.digest128() != sum {
                return None;
            }
            let seq = u64_at(body, 8)?;
            let n = usize::try_from(u64_at(body, 16)?).ok()?;
            if n as u64 > self.pages || body.len() != 24 + n * (8 + PAGE_SIZE) {
                return None;
            }
            let pfns: Vec<u64> = body[24..24 + n * 8]
                .chunks_exact(8)
                .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
                .collect();
            if pfns.iter().any(|&p| p >= self.pages) {
                return None;
            }
            Some(Decoded {
                seq,
                pfns,
                data: body[24 + n * 8..].to_vec(),
                kinds: KindCounts::default(),
            })
        })();
        match parsed {
            Some(d) => {
                tracing::warn!(
                    seq = d.seq,
                    pages = d.pfns.len(),
                    "replaying redo file of an interrupted checkpoint"
                );
                self.apply_pages(&d)?;
            }
            None => tracing::warn!(path = %p.display(), "discarding an invalid redo file"),
        }
        std::fs::remove_file(&p).map_err(self.io("remove redo", &p))?;
        Ok(())
    }

    fn apply_pages(&mut self, d: &Decoded) -> Result<(), SyncError> {
        for (pfn, page) in d.pages() {
            self.file
                .write_all_at(page, pfn * PAGE_SIZE as u64)
                .map_err(self.io("write", &self.path))?;
        }
        if self.durable {
            self.file
                .sync_data()
                .map_err(self.io("fsync", &self.path))?;
        }
        let mut s = Vec::with_capacity(24);
        s.extend_from_slice(STATE_MAGIC);
        s.extend_from_slice(&d.seq.to_le_bytes());
        let h = xxhash_rust::xxh3::xxh3_64(&s);
        s.extend_from_slice(&h.to_le_bytes());
        self.write_atomic("state file", &side(&self.path, ".state"), &s)?;
        self.applied = Some(d.seq);
        Ok(())
    }

    /// Apply a verified checkpoint crash-safely (see the type docs).
    pub fn apply(&mut self, d: &Decoded) -> Result<(), SyncError> {
        if d.pfns.iter().any(|&p| p >= self.pages) {
            return Err(proto("page beyond the backup image"));
        }
        self.write_redo(d)?;
        self.apply_pages(d)?;
        let p = side(&self.path, ".redo");
        std::fs::remove_file(&p).map_err(self.io("remove redo", &p))
    }

    /// Read the whole image.
    pub fn read_all(&self) -> Result<Vec<u8>, SyncError> {
        let mut b = vec![0u8; (self.pages as usize) * PAGE_SIZE];
        self.file
            .read_exact_at(&mut b, 0)
            .map_err(self.io("read", &self.path))?;
        Ok(b)
    }

    /// Hash of every page (for a resync).
    pub fn page_hashes(&self) -> Result<Vec<u128>, SyncError> {
        let mut out = Vec::with_capacity(self.pages as usize);
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut pfn = 0u64;
        while pfn < self.pages {
            let n = (self.pages - pfn).min(256) as usize;
            let b = &mut buf[..n * PAGE_SIZE];
            self.file
                .read_exact_at(b, pfn * PAGE_SIZE as u64)
                .map_err(self.io("read", &self.path))?;
            out.extend(b.chunks_exact(PAGE_SIZE).map(page_hash));
            pfn += n as u64;
        }
        Ok(out)
    }
}

/// The backup side: decoder plus image.
#[derive(Debug)]
pub struct Backup {
    cfg: SyncConfig,
    image: BackupImage,
    dec: Decoder,
    decoded: Decoded,
    buf: Vec<u8>,
}

impl Backup {
    /// A backup serving `image`.
    pub fn new(cfg: SyncConfig, image: BackupImage) -> Result<Self, SyncError> {
        if image.pages() != cfg.codec.image_pages {
            return Err(SyncError::ImageSize {
                path: image.path.display().to_string(),
                image_pages: image.pages(),
                config_pages: cfg.codec.image_pages,
            });
        }
        Ok(Self {
            cfg,
            image,
            dec: Decoder::new(cfg.codec),
            decoded: Decoded::default(),
            buf: Vec::new(),
        })
    }

    /// The image.
    pub fn image(&self) -> &BackupImage {
        &self.image
    }

    /// Serve one connection until the primary goes away or misbehaves.
    /// Returns the number of checkpoints applied on this connection; a cut
    /// connection is an error, and the image still holds its last complete
    /// checkpoint.
    pub fn serve<T: Transport>(&mut self, t: &mut T) -> Result<u64, SyncError> {
        self.dec.reset();
        let ty = t.recv(&mut self.buf)?;
        if ty != MSG_HELLO || self.buf.len() != 18 {
            return Err(proto("expected HELLO"));
        }
        let version = u16::from_le_bytes([self.buf[0], self.buf[1]]);
        let page = u32::from_le_bytes(self.buf[2..6].try_into().unwrap_or([0; 4]));
        let pages = u64_at(&self.buf, 6).unwrap_or(0);
        let slots = u32::from_le_bytes(self.buf[14..18].try_into().unwrap_or([0; 4]));
        if version != PROTOCOL_VERSION {
            return Err(SyncError::Mismatch(format!(
                "protocol version {version}, this backup speaks {PROTOCOL_VERSION}"
            )));
        }
        if page as usize != PAGE_SIZE
            || pages != self.cfg.codec.image_pages
            || slots != self.cfg.codec.store_slots
        {
            return Err(SyncError::Mismatch(format!(
                "primary: page {page} B, {pages} pages, {slots} slots; backup: {PAGE_SIZE} B, {} pages, {} slots",
                self.cfg.codec.image_pages, self.cfg.codec.store_slots
            )));
        }
        let applied = self.image.applied_seq();
        t.send_parts(
            MSG_HELLO_ACK,
            &[
                &PROTOCOL_VERSION.to_le_bytes(),
                &[u8::from(applied.is_some())],
                &applied.unwrap_or(0).to_le_bytes(),
            ],
        )?;
        let mut applied_here = 0;
        loop {
            let ty = match t.recv(&mut self.buf) {
                Ok(ty) => ty,
                Err(SyncError::Link(e)) if e.is_clean_close() => return Ok(applied_here),
                Err(e) => return Err(e),
            };
            match ty {
                MSG_HASH_REQUEST => {
                    let hashes = self.image.page_hashes()?;
                    for (i, c) in hashes.chunks(HASHES_PER_MSG).enumerate() {
                        let mut body = Vec::with_capacity(c.len() * 16);
                        for h in c {
                            body.extend_from_slice(&h.to_le_bytes());
                        }
                        t.send_parts(
                            MSG_HASHES,
                            &[&((i * HASHES_PER_MSG) as u64).to_le_bytes(), &body],
                        )?;
                    }
                }
                MSG_CKPT_BEGIN => {
                    let seq = u64_at(&self.buf, 0).ok_or_else(|| proto("short CKPT_BEGIN"))?;
                    let total = u64_at(&self.buf, 8).ok_or_else(|| proto("short CKPT_BEGIN"))?;
                    if total > self.cfg.max_checkpoint_bytes() {
                        return Err(proto("checkpoint larger than the image allows"));
                    }
                    let t0 = Instant::now();
                    let mut data = Vec::with_capacity((total as usize).min(64 << 20));
                    loop {
                        match t.recv(&mut self.buf)? {
                            MSG_CKPT_DATA => {
                                if data.len() + self.buf.len() > total as usize {
                                    return Err(proto(
                                        "checkpoint data exceeds its announced length",
                                    ));
                                }
                                data.extend_from_slice(&self.buf);
                            }
                            MSG_CKPT_END => break,
                            _ => return Err(proto("unexpected message inside a checkpoint")),
                        }
                    }
                    if data.len() as u64 != total {
                        return Err(proto("checkpoint shorter than announced"));
                    }
                    self.dec
                        .decode_into(&data, &mut self.decoded)
                        .map_err(SyncError::Codec)?;
                    if self.decoded.seq != seq {
                        return Err(proto("checkpoint sequence number differs from CKPT_BEGIN"));
                    }
                    self.image.apply(&self.decoded)?;
                    applied_here += 1;
                    let ns = t0.elapsed().as_nanos() as u64;
                    t.send_parts(
                        MSG_ACK,
                        &[
                            &seq.to_le_bytes(),
                            &(self.decoded.pfns.len() as u64).to_le_bytes(),
                            &ns.to_le_bytes(),
                        ],
                    )?;
                    tracing::debug!(
                        seq,
                        pages = self.decoded.pfns.len(),
                        bytes = total,
                        "checkpoint applied"
                    );
                }
                other => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected message type {other:#06x}"
                    )));
                }
            }
        }
    }
}
