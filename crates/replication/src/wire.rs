//! The replication messages: sans-I/O encode and decode.
//!
//! Every message is one peer-link frame in the replication range
//! (`0x0300..=0x03ff`); the link authenticates both sides and MACs every
//! frame. Data extents also carry an xxh3-64 of their bytes, computed by
//! the primary from the bytes it wrote or read and checked by the backup
//! before it writes them. All integers are big-endian. Every length and
//! count is checked against its bound before anything is allocated, and
//! decoding never panics (fuzz target `replication_wire`).
//!
//! Every message the primary sends after the hello carries a sequence
//! number, one more than the previous. The backup applies them in order
//! and answers with a cumulative [`Msg::Ack`]: "everything up to `seq` is
//! applied" (for `Flush`: durable; for `EpochClose`: closed in the journal;
//! for `HashReq`: answered by the `Hashes` that precedes the ack).

use std::fmt;

use crate::generation::Generations;

/// Oldest replication protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Newest replication protocol version this build speaks.
pub const MAX_VERSION: u16 = 1;
/// Largest data extent in one message (bytes).
pub const MAX_DATA: usize = 4 << 20;
/// Longest export name (bytes).
pub const MAX_NAME: usize = 255;
/// Most block hashes in one `Hashes` message.
pub const MAX_HASHES: usize = 65_536;
/// Longest text in an `Ack` (bytes).
pub const MAX_TEXT: usize = 1024;
/// Most history ids in a generation set.
pub const MAX_HISTORY: usize = crate::generation::HISTORY_LEN;

/// Message types, in the peer link's replication range.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgType {
    /// Never valid (zeroed buffers are caught).
    Invalid = 0x0300,
    /// Primary → backup: who I am and what I hold.
    Hello = 0x0301,
    /// Backup → primary: what the backup holds.
    Welcome = 0x0302,
    /// Primary → backup: write these bytes.
    Write = 0x0310,
    /// Primary → backup: make this range read as zeroes.
    Zero = 0x0311,
    /// Primary → backup: make everything so far durable, then ack.
    Flush = 0x0312,
    /// Primary → backup: an epoch ends here; apply it atomically.
    EpochClose = 0x0313,
    /// Primary → backup: the resync is complete; take these generations.
    ResyncDone = 0x0314,
    /// Primary → backup: hash blocks of a range.
    HashReq = 0x0320,
    /// Backup → primary: the hashes asked for.
    Hashes = 0x0321,
    /// Backup → primary: everything up to a sequence number is applied.
    Ack = 0x03f0,
}

impl MsgType {
    /// Look a wire value up.
    pub fn from_u16(v: u16) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0x0301 => Hello,
            0x0302 => Welcome,
            0x0310 => Write,
            0x0311 => Zero,
            0x0312 => Flush,
            0x0313 => EpochClose,
            0x0314 => ResyncDone,
            0x0320 => HashReq,
            0x0321 => Hashes,
            0x03f0 => Ack,
            _ => return None,
        })
    }
}

/// How the primary acknowledges writes (see `docs/replication.md`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Acknowledged once the backup wrote it (DRBD protocol C).
    Sync = 0,
    /// Acknowledged after the local write; the backup lags by a bound.
    Async = 1,
    /// Acknowledged after the local write; the backup applies whole epochs.
    Epoch = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        Some(match v {
            0 => Mode::Sync,
            1 => Mode::Async,
            2 => Mode::Epoch,
            _ => return None,
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Epoch => "epoch",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, WireError> {
        match s {
            "sync" => Ok(Mode::Sync),
            "async" => Ok(Mode::Async),
            "epoch" => Ok(Mode::Epoch),
            _ => Err(WireError::Invalid {
                what: "mode",
                field: "name (use sync, async or epoch)",
            }),
        }
    }
}

/// What one side announces about its copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyInfo {
    /// Generation ids.
    pub gens: Generations,
    /// The copy was primary and stopped uncleanly.
    pub crashed_primary: bool,
    /// Bytes marked in its per-peer bitmap.
    pub changed_bytes: u64,
    /// When it last became primary (ms since the Unix epoch).
    pub promoted_at_ms: u64,
}

/// The first message: the primary's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the primary speaks.
    pub min_version: u16,
    /// Newest protocol version the primary speaks.
    pub max_version: u16,
    /// Replication mode.
    pub mode: Mode,
    /// Virtual size in bytes.
    pub size: u64,
    /// Export name.
    pub name: String,
    /// The primary's copy.
    pub copy: CopyInfo,
}

/// The backup's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version both use from now on.
    pub version: u16,
    /// A random id of this run of the backup: a primary that sees the same
    /// instance as in its last session knows the backup lost nothing it
    /// acknowledged (a restarted backup may have lost unflushed writes).
    pub instance: u64,
    /// The backup's copy.
    pub copy: CopyInfo,
}

/// Flag bits of `Write` and `Zero`.
pub mod flags {
    /// Force unit access: durable on the backup before the ack.
    pub const FUA: u8 = 1;
    /// Write-zeroes may deallocate.
    pub const MAY_UNMAP: u8 = 2;
    /// Every defined bit.
    pub const ALL: u8 = FUA | MAY_UNMAP;
}

/// `Ack` codes.
pub mod code {
    /// Success.
    pub const OK: u32 = 0;
    /// The backup's disk is full.
    pub const NO_SPACE: u32 = 1;
    /// An I/O error on the backup.
    pub const IO: u32 = 2;
    /// The request was invalid (range, hash, state).
    pub const INVALID: u32 = 3;
}

/// One replication message. Data-carrying variants borrow the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Write `data` at `offset`.
    Write {
        /// Sequence number.
        seq: u64,
        /// Offset.
        offset: u64,
        /// [`flags`] bits.
        flags: u8,
        /// xxh3-64 of `data`.
        hash: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Make a range read as zeroes.
    Zero {
        /// Sequence number.
        seq: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// [`flags`] bits.
        flags: u8,
    },
    /// Make everything so far durable.
    Flush {
        /// Sequence number.
        seq: u64,
    },
    /// An epoch of the primary ends here.
    EpochClose {
        /// Sequence number.
        seq: u64,
        /// The primary's epoch number (for logs and checks).
        epoch: u64,
    },
    /// The resync is complete and durable on the primary's side.
    ResyncDone {
        /// Sequence number.
        seq: u64,
        /// The generations both copies now share.
        gens: Generations,
    },
    /// Hash `len` bytes at `offset` in blocks of `block` bytes.
    HashReq {
        /// Sequence number.
        seq: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Block size.
        block: u32,
    },
    /// The answer to the `HashReq` of `seq`.
    Hashes {
        /// Sequence number answered.
        seq: u64,
        /// One xxh3-64 per block.
        hashes: Vec<u64>,
    },
    /// Everything up to `seq` is applied (`code` OK), or the request `seq`
    /// failed (`text` says why).
    Ack {
        /// Sequence number.
        seq: u64,
        /// [`code`] value.
        code: u32,
        /// Failure text (empty on success).
        text: String,
    },
}

/// Why a payload is not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The protocol versions do not overlap.
    #[error(
        "the primary speaks replication protocol versions {min}..{max}, this side speaks \
         {MIN_VERSION}..{MAX_VERSION}: upgrade the older side"
    )]
    NoCommonVersion {
        /// The peer's lowest version.
        min: u16,
        /// The peer's highest version.
        max: u16,
    },
    /// Unknown message type.
    #[error("unknown replication message type {0:#06x}: the peer speaks a newer protocol")]
    UnknownType(u16),
    /// The payload ended early.
    #[error("{what} is truncated")]
    Truncated {
        /// Message.
        what: &'static str,
    },
    /// The payload has bytes after the message.
    #[error("{what} has {extra} trailing bytes")]
    Trailing {
        /// Message.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field is out of its bounds.
    #[error("{what}: {field} = {value} is out of bounds (max {max})")]
    Bounds {
        /// Message.
        what: &'static str,
        /// Field.
        field: &'static str,
        /// Value found.
        value: u64,
        /// Limit.
        max: u64,
    },
    /// A field has a value that means nothing.
    #[error("{what}: invalid {field}")]
    Invalid {
        /// Message.
        what: &'static str,
        /// Field.
        field: &'static str,
    },
    /// The extent's bytes do not match its hash.
    #[error("{what}: the data does not match its hash (corrupted in transit or in memory)")]
    Hash {
        /// Message.
        what: &'static str,
    },
}

/// The xxh3-64 of an extent, as carried in `Write` (the copy engine's
/// [`understudy_copy::block_hash`], so hashes compare directly).
pub fn extent_hash(data: &[u8]) -> u64 {
    understudy_copy::block_hash(data)
}

/// Choose the version for a hello's range, or refuse.
pub fn negotiate(min: u16, max: u16) -> Result<u16, WireError> {
    let v = max.min(MAX_VERSION);
    if min > max || v < min.max(MIN_VERSION) {
        return Err(WireError::NoCommonVersion { min, max });
    }
    Ok(v)
}

type Reader<'a> = understudy_peer::codec::Reader<'a, WireError>;

impl understudy_peer::codec::DecodeError for WireError {
    fn truncated(what: &'static str) -> Self {
        WireError::Truncated { what }
    }
    fn bounds(what: &'static str, field: &'static str, value: u64, max: u64) -> Self {
        WireError::Bounds {
            what,
            field,
            value,
            max,
        }
    }
    fn trailing(what: &'static str, extra: usize) -> Self {
        WireError::Trailing { what, extra }
    }
}

/// The fields only this protocol has, read through the shared cursor.
trait Fields {
    fn flags(&mut self) -> Result<u8, WireError>;
    fn text(&mut self, max: usize) -> Result<String, WireError>;
    fn gens(&mut self) -> Result<Generations, WireError>;
    fn copy_info(&mut self) -> Result<CopyInfo, WireError>;
    fn range(&self, offset: u64, len: u64) -> Result<(), WireError>;
}

impl Fields for Reader<'_> {
    fn flags(&mut self) -> Result<u8, WireError> {
        let f = self.u8()?;
        if f & !flags::ALL != 0 {
            return Err(WireError::Invalid {
                what: self.what(),
                field: "flags",
            });
        }
        Ok(f)
    }
    fn text(&mut self, max: usize) -> Result<String, WireError> {
        let n = self.u16()?;
        let n = self.bounded("text length", u64::from(n), max as u64)? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid {
            what: self.what(),
            field: "text (not UTF-8)",
        })
    }
    fn gens(&mut self) -> Result<Generations, WireError> {
        let current = self.u64()?;
        let bitmap = self.u64()?;
        let n = self.u8()?;
        let n = self.bounded("history length", u64::from(n), MAX_HISTORY as u64)? as usize;
        let mut history = Vec::with_capacity(n);
        for _ in 0..n {
            history.push(self.u64()?);
        }
        Ok(Generations {
            current,
            bitmap,
            history,
        })
    }
    fn copy_info(&mut self) -> Result<CopyInfo, WireError> {
        let gens = self.gens()?;
        let crashed_primary = match self.u8()? {
            0 => false,
            1 => true,
            _ => {
                return Err(WireError::Invalid {
                    what: self.what(),
                    field: "crashed_primary",
                });
            }
        };
        Ok(CopyInfo {
            gens,
            crashed_primary,
            changed_bytes: self.u64()?,
            promoted_at_ms: self.u64()?,
        })
    }
    fn range(&self, offset: u64, len: u64) -> Result<(), WireError> {
        if offset.checked_add(len).is_none() {
            return Err(WireError::Invalid {
                what: self.what(),
                field: "offset + len overflows",
            });
        }
        Ok(())
    }
}

fn put_gens(h: &mut Vec<u8>, g: &Generations) -> Result<(), WireError> {
    if g.history.len() > MAX_HISTORY {
        return Err(WireError::Bounds {
            what: "encode",
            field: "history length",
            value: g.history.len() as u64,
            max: MAX_HISTORY as u64,
        });
    }
    h.extend_from_slice(&g.current.to_be_bytes());
    h.extend_from_slice(&g.bitmap.to_be_bytes());
    h.push(g.history.len() as u8);
    for id in &g.history {
        h.extend_from_slice(&id.to_be_bytes());
    }
    Ok(())
}

fn put_copy_info(h: &mut Vec<u8>, c: &CopyInfo) -> Result<(), WireError> {
    put_gens(h, &c.gens)?;
    h.push(u8::from(c.crashed_primary));
    h.extend_from_slice(&c.changed_bytes.to_be_bytes());
    h.extend_from_slice(&c.promoted_at_ms.to_be_bytes());
    Ok(())
}

fn put_text(h: &mut Vec<u8>, field: &'static str, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::Bounds {
            what: "encode",
            field,
            value: s.len() as u64,
            max: max as u64,
        });
    }
    h.extend_from_slice(&(s.len() as u16).to_be_bytes());
    h.extend_from_slice(s.as_bytes());
    Ok(())
}

impl<'a> Msg<'a> {
    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Msg::Hello(_) => MsgType::Hello,
            Msg::Welcome(_) => MsgType::Welcome,
            Msg::Write { .. } => MsgType::Write,
            Msg::Zero { .. } => MsgType::Zero,
            Msg::Flush { .. } => MsgType::Flush,
            Msg::EpochClose { .. } => MsgType::EpochClose,
            Msg::ResyncDone { .. } => MsgType::ResyncDone,
            Msg::HashReq { .. } => MsgType::HashReq,
            Msg::Hashes { .. } => MsgType::Hashes,
            Msg::Ack { .. } => MsgType::Ack,
        }
    }

    /// Encode into a header and a trailing byte slice (a data extent is not
    /// copied: send both as parts of one frame). Fails only when a field
    /// exceeds its bound, so nothing unreadable is ever sent.
    pub fn encode(&self) -> Result<(u16, Vec<u8>, &'a [u8]), WireError> {
        let mut h = Vec::with_capacity(64);
        let mut tail: &'a [u8] = &[];
        match self {
            Msg::Hello(m) => {
                h.extend_from_slice(&m.min_version.to_be_bytes());
                h.extend_from_slice(&m.max_version.to_be_bytes());
                h.push(m.mode as u8);
                h.extend_from_slice(&m.size.to_be_bytes());
                put_text(&mut h, "name", &m.name, MAX_NAME)?;
                put_copy_info(&mut h, &m.copy)?;
            }
            Msg::Welcome(w) => {
                h.extend_from_slice(&w.version.to_be_bytes());
                h.extend_from_slice(&w.instance.to_be_bytes());
                put_copy_info(&mut h, &w.copy)?;
            }
            Msg::Write {
                seq,
                offset,
                flags,
                hash,
                data,
            } => {
                if data.len() > MAX_DATA {
                    return Err(WireError::Bounds {
                        what: "encode",
                        field: "data",
                        value: data.len() as u64,
                        max: MAX_DATA as u64,
                    });
                }
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.push(*flags);
                h.extend_from_slice(&hash.to_be_bytes());
                tail = data;
            }
            Msg::Zero {
                seq,
                offset,
                len,
                flags,
            } => {
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.push(*flags);
            }
            Msg::Flush { seq } => h.extend_from_slice(&seq.to_be_bytes()),
            Msg::EpochClose { seq, epoch } => {
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&epoch.to_be_bytes());
            }
            Msg::ResyncDone { seq, gens } => {
                h.extend_from_slice(&seq.to_be_bytes());
                put_gens(&mut h, gens)?;
            }
            Msg::HashReq {
                seq,
                offset,
                len,
                block,
            } => {
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&block.to_be_bytes());
            }
            Msg::Hashes { seq, hashes } => {
                if hashes.len() > MAX_HASHES {
                    return Err(WireError::Bounds {
                        what: "encode",
                        field: "hashes",
                        value: hashes.len() as u64,
                        max: MAX_HASHES as u64,
                    });
                }
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
                for x in hashes {
                    h.extend_from_slice(&x.to_be_bytes());
                }
            }
            Msg::Ack { seq, code, text } => {
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&code.to_be_bytes());
                put_text(&mut h, "text", text, MAX_TEXT)?;
            }
        }
        Ok((self.msg_type() as u16, h, tail))
    }

    /// Encode into one buffer (tests, fuzzing).
    pub fn to_vec(&self) -> Result<(u16, Vec<u8>), WireError> {
        let (t, mut h, tail) = self.encode()?;
        h.extend_from_slice(tail);
        Ok((t, h))
    }

    /// Decode the payload of a frame of type `msg_type`. A `Write`'s data
    /// is checked against its hash here.
    pub fn decode(msg_type: u16, payload: &'a [u8]) -> Result<Msg<'a>, WireError> {
        let t = MsgType::from_u16(msg_type).ok_or(WireError::UnknownType(msg_type))?;
        match t {
            MsgType::Invalid => Err(WireError::UnknownType(msg_type)),
            MsgType::Hello => decode_hello(payload),
            MsgType::Welcome => {
                let mut r = Reader::new(payload, "Welcome");
                let version = r.u16()?;
                let instance = r.u64()?;
                let copy = r.copy_info()?;
                r.end()?;
                Ok(Msg::Welcome(Welcome {
                    version,
                    instance,
                    copy,
                }))
            }
            MsgType::Write => decode_write(payload),
            MsgType::Zero => {
                let mut r = Reader::new(payload, "Zero");
                let (seq, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
                r.range(offset, len)?;
                let flags = r.flags()?;
                r.end()?;
                Ok(Msg::Zero {
                    seq,
                    offset,
                    len,
                    flags,
                })
            }
            MsgType::Flush => {
                let mut r = Reader::new(payload, "Flush");
                let seq = r.u64()?;
                r.end()?;
                Ok(Msg::Flush { seq })
            }
            MsgType::EpochClose => {
                let mut r = Reader::new(payload, "EpochClose");
                let (seq, epoch) = (r.u64()?, r.u64()?);
                r.end()?;
                Ok(Msg::EpochClose { seq, epoch })
            }
            MsgType::ResyncDone => {
                let mut r = Reader::new(payload, "ResyncDone");
                let seq = r.u64()?;
                let gens = r.gens()?;
                r.end()?;
                Ok(Msg::ResyncDone { seq, gens })
            }
            MsgType::HashReq => decode_hash_req(payload),
            MsgType::Hashes => decode_hashes(payload),
            MsgType::Ack => {
                let mut r = Reader::new(payload, "Ack");
                let (seq, code) = (r.u64()?, r.u32()?);
                let text = r.text(MAX_TEXT)?;
                r.end()?;
                Ok(Msg::Ack { seq, code, text })
            }
        }
    }

    /// The sequence number of a message sent after the hello.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Msg::Hello(_) | Msg::Welcome(_) => None,
            Msg::Write { seq, .. }
            | Msg::Zero { seq, .. }
            | Msg::Flush { seq }
            | Msg::EpochClose { seq, .. }
            | Msg::ResyncDone { seq, .. }
            | Msg::HashReq { seq, .. }
            | Msg::Hashes { seq, .. }
            | Msg::Ack { seq, .. } => Some(*seq),
        }
    }
}

fn decode_hello(payload: &[u8]) -> Result<Msg<'_>, WireError> {
    let mut r = Reader::new(payload, "Hello");
    let min_version = r.u16()?;
    let max_version = r.u16()?;
    let mode = Mode::from_u8(r.u8()?).ok_or(WireError::Invalid {
        what: "Hello",
        field: "mode",
    })?;
    let size = r.u64()?;
    let name = r.text(MAX_NAME)?;
    if name.is_empty() {
        return Err(WireError::Invalid {
            what: "Hello",
            field: "name (empty)",
        });
    }
    let copy = r.copy_info()?;
    r.end()?;
    Ok(Msg::Hello(Hello {
        min_version,
        max_version,
        mode,
        size,
        name,
        copy,
    }))
}

fn decode_write(payload: &[u8]) -> Result<Msg<'_>, WireError> {
    let mut r = Reader::new(payload, "Write");
    let (seq, offset) = (r.u64()?, r.u64()?);
    let flags = r.flags()?;
    let hash = r.u64()?;
    let data = r.rest();
    r.bounded("data", data.len() as u64, MAX_DATA as u64)?;
    r.range(offset, data.len() as u64)?;
    if extent_hash(data) != hash {
        return Err(WireError::Hash { what: "Write" });
    }
    Ok(Msg::Write {
        seq,
        offset,
        flags,
        hash,
        data,
    })
}

fn decode_hash_req(payload: &[u8]) -> Result<Msg<'_>, WireError> {
    let mut r = Reader::new(payload, "HashReq");
    let (seq, offset, len, block) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
    r.range(offset, len)?;
    if block == 0 || !block.is_power_of_two() || block < 512 {
        return Err(WireError::Invalid {
            what: "HashReq",
            field: "block (a power of two, at least 512)",
        });
    }
    r.bounded("blocks", len.div_ceil(u64::from(block)), MAX_HASHES as u64)?;
    r.end()?;
    Ok(Msg::HashReq {
        seq,
        offset,
        len,
        block,
    })
}

fn decode_hashes(payload: &[u8]) -> Result<Msg<'_>, WireError> {
    let mut r = Reader::new(payload, "Hashes");
    let seq = r.u64()?;
    let n = r.u32()?;
    let n = r.bounded("hashes", u64::from(n), MAX_HASHES as u64)? as usize;
    // The count is also checked against what is really there before the
    // allocation, so a short frame cannot ask for 512 KiB.
    if r.remaining() != n * 8 {
        return Err(if r.remaining() < n * 8 {
            WireError::Truncated { what: "Hashes" }
        } else {
            WireError::Trailing {
                what: "Hashes",
                extra: r.remaining() - n * 8,
            }
        });
    }
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        hashes.push(r.u64()?);
    }
    r.end()?;
    Ok(Msg::Hashes { seq, hashes })
}

#[cfg(test)]
mod tests;
