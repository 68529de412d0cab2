//! Simulated storage for crash tests: files whose writes sit in a "page
//! cache" until synced, a global event log of every write and sync, crash
//! states that keep any subset of the unsynced writes (per write or per
//! 512-byte sector, i.e. torn), and failpoints at every write and sync.
//!
//! Model: a write is visible to readers at once; a sync makes every earlier
//! write of that file durable; file size changes are durable at once. A crash
//! just before event `n` keeps every write made durable by a sync before `n`
//! and any subset of the later ones, applied in their original order.

use std::sync::Arc;

use parking_lot::Mutex;
use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Extent, ExtentKind, Format,
    Result as BResult, WriteOpts, ZeroOpts, check_range,
};

use crate::log::LogFile;

/// Index of a file in a [`SimWorld`].
pub type FileId = usize;

/// Kind of a storage operation, for failpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOp {
    /// A write (or zero/discard on a disk).
    Write,
    /// A sync (fsync/flush).
    Sync,
}

/// Make the `nth` (0-based) matching operation fail with `EIO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failpoint {
    /// Only operations on this file; `None` for any file.
    pub file: Option<FileId>,
    /// Operation kind.
    pub op: SimOp,
    /// Which matching operation fails first.
    pub nth: u64,
    /// Keep failing every later matching operation.
    pub sticky: bool,
}

/// One storage event.
#[derive(Clone, Debug)]
pub enum Event {
    /// Bytes written to a file.
    Write {
        /// File.
        file: FileId,
        /// Offset.
        offset: u64,
        /// Data.
        data: Arc<Vec<u8>>,
    },
    /// A file was synced.
    Sync {
        /// File.
        file: FileId,
    },
    /// A file's size changed (durable at once).
    SetLen {
        /// File.
        file: FileId,
        /// New length.
        len: u64,
    },
}

#[derive(Debug, Default)]
struct WorldState {
    current: Vec<Vec<u8>>,
    initial: Vec<Vec<u8>>,
    events: Vec<Event>,
    failpoints: Vec<(Failpoint, u64)>,
    injected: u64,
}

/// A set of simulated files sharing one event log.
#[derive(Debug, Default)]
pub struct SimWorld {
    st: Mutex<WorldState>,
}

impl SimWorld {
    /// An empty world.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Add a file with durable initial contents.
    pub fn add_file(&self, initial: Vec<u8>) -> FileId {
        let mut st = self.st.lock();
        st.current.push(initial.clone());
        st.initial.push(initial);
        st.current.len() - 1
    }

    /// A [`LogFile`] handle on a file.
    pub fn file(self: &Arc<Self>, id: FileId) -> SimFile {
        SimFile {
            world: Arc::clone(self),
            id,
        }
    }

    /// A [`Disk`] handle on a file (its size is fixed at its current length).
    pub fn disk(self: &Arc<Self>, id: FileId) -> SimDisk {
        let size = self.st.lock().current[id].len() as u64;
        SimDisk {
            world: Arc::clone(self),
            id,
            size,
        }
    }

    /// Arm a failpoint.
    pub fn add_failpoint(&self, fp: Failpoint) {
        self.st.lock().failpoints.push((fp, 0));
    }

    /// Remove every failpoint.
    pub fn clear_failpoints(&self) {
        self.st.lock().failpoints.clear();
    }

    /// How many errors were injected.
    pub fn injected(&self) -> u64 {
        self.st.lock().injected
    }

    /// Number of events so far.
    pub fn event_count(&self) -> usize {
        self.st.lock().events.len()
    }

    /// Current (page cache) contents of a file.
    pub fn contents(&self, id: FileId) -> Vec<u8> {
        self.st.lock().current[id].clone()
    }

    /// A crash-state generator over the events so far.
    pub fn crasher(&self) -> Crasher {
        let st = self.st.lock();
        Crasher {
            events: st.events.clone(),
            durable: st.initial.clone(),
            pending: vec![Vec::new(); st.initial.len()],
            pos: 0,
        }
    }

    fn check_fail(st: &mut WorldState, file: FileId, op: SimOp) -> std::io::Result<()> {
        let mut fail = false;
        for (fp, seen) in &mut st.failpoints {
            if fp.op != op || fp.file.is_some_and(|f| f != file) {
                continue;
            }
            let n = *seen;
            *seen += 1;
            if n == fp.nth || (fp.sticky && n > fp.nth) {
                fail = true;
            }
        }
        if fail {
            st.injected += 1;
            return Err(std::io::Error::from_raw_os_error(libc_eio()));
        }
        Ok(())
    }

    fn write(&self, file: FileId, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.st.lock();
        Self::check_fail(&mut st, file, SimOp::Write)?;
        let cur = &mut st.current[file];
        let end = offset as usize + data.len();
        if cur.len() < end {
            cur.resize(end, 0);
        }
        cur[offset as usize..end].copy_from_slice(data);
        st.events.push(Event::Write {
            file,
            offset,
            data: Arc::new(data.to_vec()),
        });
        Ok(())
    }

    fn sync(&self, file: FileId) -> std::io::Result<()> {
        let mut st = self.st.lock();
        Self::check_fail(&mut st, file, SimOp::Sync)?;
        st.events.push(Event::Sync { file });
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

/// How a crash treats writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossMode {
    /// Every unsynced write survived.
    KeepAll,
    /// No unsynced write survived.
    DropAll,
    /// Each unsynced write survived or not, at random.
    RandomWrites,
    /// Each 512-byte sector of each unsynced write survived or not, at random
    /// (torn writes).
    RandomSectors,
}

impl LossMode {
    /// All modes, for cycling through.
    pub const ALL: [LossMode; 4] = [
        LossMode::RandomSectors,
        LossMode::DropAll,
        LossMode::RandomWrites,
        LossMode::KeepAll,
    ];
}

/// A small deterministic PRNG (splitmix64) for reproducible crash states.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A coin flip.
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// Produces crash states at increasing event positions.
#[derive(Debug)]
pub struct Crasher {
    events: Vec<Event>,
    durable: Vec<Vec<u8>>,
    pending: Vec<Vec<usize>>,
    pos: usize,
}

fn apply_write(img: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[offset as usize..end].copy_from_slice(data);
}

impl Crasher {
    /// Number of events (crash points are `0..=len`).
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    fn advance(&mut self, to: usize) {
        while self.pos < to.min(self.events.len()) {
            match &self.events[self.pos] {
                Event::Write { file, .. } => self.pending[*file].push(self.pos),
                Event::Sync { file } => {
                    let file = *file;
                    for i in std::mem::take(&mut self.pending[file]) {
                        if let Event::Write { offset, data, .. } = &self.events[i] {
                            apply_write(&mut self.durable[file], *offset, data);
                        }
                    }
                }
                Event::SetLen { file, len } => {
                    self.durable[*file].resize(*len as usize, 0);
                }
            }
            self.pos += 1;
        }
    }

    /// Contents of every file after a crash just before event `at`. Calls
    /// must use non-decreasing `at`.
    pub fn crash(&mut self, at: usize, mode: LossMode, rng: &mut Rng) -> Vec<Vec<u8>> {
        self.advance(at);
        let mut out = self.durable.clone();
        for (file, pend) in self.pending.iter().enumerate() {
            for &i in pend {
                let Event::Write { offset, data, .. } = &self.events[i] else {
                    continue;
                };
                match mode {
                    LossMode::DropAll => {}
                    LossMode::KeepAll => apply_write(&mut out[file], *offset, data),
                    LossMode::RandomWrites => {
                        if rng.coin() {
                            apply_write(&mut out[file], *offset, data);
                        }
                    }
                    LossMode::RandomSectors => {
                        // Sector boundaries are absolute file offsets.
                        let mut pos = *offset;
                        let end = offset + data.len() as u64;
                        while pos < end {
                            let next = ((pos / 512) + 1) * 512;
                            let e = next.min(end);
                            if rng.coin() {
                                let s = (pos - offset) as usize;
                                apply_write(&mut out[file], pos, &data[s..s + (e - pos) as usize]);
                            }
                            pos = e;
                        }
                    }
                }
            }
        }
        out
    }
}

/// A simulated file for a journal.
#[derive(Clone, Debug)]
pub struct SimFile {
    world: Arc<SimWorld>,
    id: FileId,
}

impl LogFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let st = self.world.st.lock();
        let cur = &st.current[self.id];
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= cur.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&cur[offset as usize..end as usize]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.world.write(self.id, offset, buf)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.world.sync(self.id)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.world.st.lock().current[self.id].len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self.world.st.lock();
        st.current[self.id].resize(len as usize, 0);
        st.events.push(Event::SetLen { file: self.id, len });
        Ok(())
    }
}

/// A simulated raw disk.
#[derive(Clone, Debug)]
pub struct SimDisk {
    world: Arc<SimWorld>,
    id: FileId,
    size: u64,
}

impl SimDisk {
    fn io(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.world.write(self.id, offset, data)?;
        if fua {
            self.world.sync(self.id)?;
        }
        Ok(())
    }
}

impl DiskSize for SimDisk {
    fn size(&self) -> u64 {
        self.size
    }
}

impl DiskRead for SimDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let st = self.world.st.lock();
        buf.copy_from_slice(&st.current[self.id][offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl DiskWrite for SimDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BResult<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.size)?;
        self.io(offset, buf, opts.fua)
            .map_err(|source| BlockError::Write {
                offset,
                len,
                source,
            })
    }
    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BResult<()> {
        check_range(offset, len, self.size)?;
        self.io(offset, &vec![0u8; len as usize], opts.write.fua)
            .map_err(|source| BlockError::WriteZeroes {
                offset,
                len,
                source,
            })
    }
    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BResult<()> {
        check_range(offset, len, self.size)?;
        self.io(offset, &vec![0u8; len as usize], opts.fua)
            .map_err(|source| BlockError::Discard {
                offset,
                len,
                source,
            })
    }
    fn flush(&self) -> BResult<()> {
        self.world
            .sync(self.id)
            .map_err(|source| BlockError::Flush { source })
    }
}

impl DiskMap for SimDisk {
    fn map(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}

impl Disk for SimDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: Format::Raw,
            size: self.size,
            read_only: false,
            can_discard: true,
            can_fast_zero: false,
            flush_covers_all_handles: true,
            preferred_block_size: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_synced_and_may_drop_unsynced() {
        let w = SimWorld::new();
        let f = w.add_file(vec![0u8; 1024]);
        let d = w.disk(f);
        d.write_at(&[1u8; 512], 0, WriteOpts::default()).unwrap();
        d.flush().unwrap();
        d.write_at(&[2u8; 1024], 0, WriteOpts::default()).unwrap();
        let mut c = w.crasher();
        let mut rng = Rng(1);
        let s = c.crash(c.len(), LossMode::DropAll, &mut rng);
        assert_eq!(&s[f][..512], &[1u8; 512][..]);
        assert_eq!(&s[f][512..], &[0u8; 512][..]);
        let s = c.crash(c.len(), LossMode::KeepAll, &mut rng);
        assert_eq!(s[f], vec![2u8; 1024]);
        // Torn: over many seeds both sectors are seen independently.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let s = c.crash(c.len(), LossMode::RandomSectors, &mut rng);
            seen.insert((s[f][0], s[f][512]));
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        // Before the sync nothing is durable.
        let mut c = w.crasher();
        let s = c.crash(1, LossMode::DropAll, &mut rng);
        assert_eq!(s[f], vec![0u8; 1024]);
    }

    #[test]
    fn failpoint_fires_once_or_sticky() {
        let w = SimWorld::new();
        let f = w.add_file(vec![0u8; 4096]);
        let file = w.file(f);
        w.add_failpoint(Failpoint {
            file: Some(f),
            op: SimOp::Sync,
            nth: 1,
            sticky: false,
        });
        assert!(file.sync().is_ok());
        assert!(file.sync().is_err());
        assert!(file.sync().is_ok());
        w.add_failpoint(Failpoint {
            file: None,
            op: SimOp::Write,
            nth: 0,
            sticky: true,
        });
        assert!(file.write_at(&[1], 0).is_err());
        assert!(file.write_at(&[1], 0).is_err());
        assert_eq!(w.injected(), 3);
        // A failed write leaves no event and no data.
        assert_eq!(w.contents(f)[0], 0);
    }
}
