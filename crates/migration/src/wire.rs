//! The migration messages: sans-I/O encode and decode.
//!
//! Every message travels as one peer-link frame (type `0x0100..=0x01ff`).
//! The link authenticates both sides and MACs every frame; on top of that
//! every data extent carries an xxh3-64 of its bytes, computed at the source
//! from the bytes it read and checked at the target before it writes them.
//! All integers are big-endian. Every length and count is bounded before
//! anything is allocated; decoding never panics (see the fuzz target
//! `migration_wire`).

use std::fmt;

/// Oldest migration protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Newest migration protocol version this build speaks. Version 2 adds
/// `MirrorZero` (synchronously mirrored write-zeroes); the rest is
/// unchanged, and with a version-1 peer write-zeroes are copied, not
/// mirrored.
pub const MAX_VERSION: u16 = 2;
/// First version with `MirrorZero`.
pub const MIRROR_ZERO_VERSION: u16 = 2;
/// Largest data extent in one message (bytes).
pub const MAX_DATA: usize = 4 << 20;
/// Longest export name (bytes).
pub const MAX_NAME: usize = 255;
/// Most ranges in one `Have` message.
pub const MAX_RANGES: usize = 65_536;
/// Most block hashes in one hash reply.
pub const MAX_HASHES: usize = 65_536;
/// Longest text (abort reasons, error replies), bytes.
pub const MAX_TEXT: usize = 1024;

/// Message types, in the peer link's migration range.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgType {
    /// Never valid (zeroed buffers are caught).
    Invalid = 0x0100,
    /// Source → target: what is offered.
    Hello = 0x0101,
    /// Target → source: the version chosen and how to start.
    Welcome = 0x0102,
    /// Target → source: ranges the target already holds (resume).
    Have = 0x0103,
    /// Source → target: an extent of data with its hash.
    Data = 0x0110,
    /// Source → target: a range that reads as zeroes.
    Zero = 0x0111,
    /// Source → target: make everything so far durable, then reply.
    Flush = 0x0112,
    /// Source → target: a mirrored guest write; reply when applied.
    Mirror = 0x0113,
    /// Source → target (version 2): a mirrored guest write-zeroes; reply
    /// when applied.
    MirrorZero = 0x0114,
    /// Source → target: take ownership at this generation; reply when durable.
    Commit = 0x0120,
    /// Source → target: the migration is abandoned (target keeps the partial image).
    Abort = 0x0121,
    /// Source → target: hash blocks of a range; reply with the hashes.
    HashReq = 0x0130,
    /// Source → target (after commit): a forwarded read.
    FwdRead = 0x0140,
    /// Source → target (after commit): a forwarded write.
    FwdWrite = 0x0141,
    /// Source → target (after commit): a forwarded write-zeroes.
    FwdZero = 0x0142,
    /// Source → target (after commit): a forwarded discard.
    FwdDiscard = 0x0143,
    /// Source → target (after commit): a forwarded flush.
    FwdFlush = 0x0144,
    /// Target → source: the answer to a request with an id.
    Reply = 0x01f0,
}

impl MsgType {
    /// Look a wire value up.
    pub fn from_u16(v: u16) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0x0101 => Hello,
            0x0102 => Welcome,
            0x0103 => Have,
            0x0110 => Data,
            0x0111 => Zero,
            0x0112 => Flush,
            0x0113 => Mirror,
            0x0114 => MirrorZero,
            0x0120 => Commit,
            0x0121 => Abort,
            0x0130 => HashReq,
            0x0140 => FwdRead,
            0x0141 => FwdWrite,
            0x0142 => FwdZero,
            0x0143 => FwdDiscard,
            0x0144 => FwdFlush,
            0x01f0 => Reply,
            _ => return None,
        })
    }
}

/// How the target proposes to start.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new, empty sparse image: send every allocated extent.
    Fresh = 0,
    /// The same migration was interrupted: a `Have` list follows.
    Resume = 1,
    /// The target holds the copy of `base_generation`: send only what
    /// changed since.
    Incremental = 2,
    /// The target holds an older copy of the disk of unknown state: compare
    /// block hashes and send only the blocks that differ.
    HashResync = 3,
}

impl Start {
    fn from_u8(v: u8) -> Option<Start> {
        Some(match v {
            0 => Start::Fresh,
            1 => Start::Resume,
            2 => Start::Incremental,
            3 => Start::HashResync,
            _ => return None,
        })
    }
}

/// The first message of a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the source speaks.
    pub min_version: u16,
    /// Newest protocol version the source speaks.
    pub max_version: u16,
    /// Identity of this migration (stable across retries).
    pub migration_id: [u8; 16],
    /// Identity of the disk's lineage (the same on every copy).
    pub disk_id: [u8; 16],
    /// The source's current generation; the target commits at `generation + 1`.
    pub generation: u64,
    /// Generation at which the source believes the target's copy equals
    /// its own (0: none).
    pub base_generation: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// Image format: 0 raw, 1 qcow2.
    pub format: u8,
    /// Tracking granularity in bytes (a power of two).
    pub granularity: u32,
    /// Export name.
    pub name: String,
}

/// The target's answer to [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version both use from now on.
    pub version: u16,
    /// How to start.
    pub start: Start,
}

/// Flag bits of forwarded writes.
pub mod flags {
    /// Force unit access.
    pub const FUA: u8 = 1;
    /// Write-zeroes may deallocate.
    pub const MAY_UNMAP: u8 = 2;
    /// Write-zeroes must not fall back to writing zero buffers.
    pub const FAST_ONLY: u8 = 4;
    /// Hash entry: the block changed on the target since the commit.
    pub const CHANGED: u8 = 1;
}

/// Reply codes.
pub mod code {
    /// Success.
    pub const OK: u32 = 0;
    /// The target's disk is full.
    pub const NO_SPACE: u32 = 1;
    /// An I/O error on the target.
    pub const IO: u32 = 2;
    /// The request was invalid (out of range, bad hash, wrong state).
    pub const INVALID: u32 = 3;
    /// The request is not supported by the target's disk.
    pub const NOT_SUPPORTED: u32 = 4;
    /// The target refuses (ownership rules).
    pub const REFUSED: u32 = 5;
}

/// Error codes a target sends instead of a Welcome (peer-level `Error`
/// frames; generic refusals use `understudy_peer::error_code::REFUSED`).
pub mod refusal {
    /// "I already own this disk, at exactly the generation you were handing
    /// over, received from you": the commit whose answer a source lost did
    /// take effect. Older sources see a plain refusal.
    pub const COMMITTED: u32 = understudy_peer::error_code::SERVICE_BASE + 1;
}

/// One migration message. Data-carrying variants borrow the frame payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Ranges `(offset, len)` the target holds; `last` ends the list.
    Have {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
        /// Whether this is the last `Have` message.
        last: bool,
    },
    /// An extent of data.
    Data {
        /// Offset.
        offset: u64,
        /// xxh3-64 of `data`.
        hash: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A range that reads as zeroes.
    Zero {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Make everything received durable, then reply.
    Flush {
        /// Request id.
        id: u64,
    },
    /// A mirrored guest write-zeroes (version 2).
    MirrorZero {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A mirrored guest write.
    Mirror {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// xxh3-64 of `data`.
        hash: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Take ownership.
    Commit {
        /// Request id.
        id: u64,
        /// The generation the target owns the disk at.
        generation: u64,
    },
    /// The source gives up this attempt.
    Abort {
        /// Why, for the target's log.
        reason: String,
    },
    /// Hash `len` bytes at `offset` in blocks of `block` bytes.
    HashReq {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Block size.
        block: u32,
    },
    /// Forwarded read.
    FwdRead {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Forwarded write.
    FwdWrite {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// [`flags`] bits.
        flags: u8,
        /// The bytes.
        data: &'a [u8],
    },
    /// Forwarded write-zeroes.
    FwdZero {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// [`flags`] bits.
        flags: u8,
    },
    /// Forwarded discard.
    FwdDiscard {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// [`flags`] bits.
        flags: u8,
    },
    /// Forwarded flush.
    FwdFlush {
        /// Request id.
        id: u64,
    },
    /// The answer to the request `id`. For `code != OK`, `body` is a UTF-8
    /// message; otherwise it depends on the request (read data, hashes).
    Reply {
        /// Request id.
        id: u64,
        /// [`code`] value.
        code: u32,
        /// Body.
        body: &'a [u8],
    },
}

/// Why a payload is not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer's protocol versions and ours do not overlap.
    #[error(
        "the source speaks migration protocol versions {min}..{max}, this target speaks \
         {MIN_VERSION}..{MAX_VERSION}: upgrade the older side"
    )]
    NoCommonVersion {
        /// The peer's lowest version.
        min: u16,
        /// The peer's highest version.
        max: u16,
    },
    /// Unknown message type.
    #[error(
        "unknown migration message type {0:#06x}: the peer speaks a newer protocol; upgrade this side"
    )]
    UnknownType(u16),
    /// The payload ended early.
    #[error("{what} is truncated: the peer is broken or speaks another protocol version")]
    Truncated {
        /// Message.
        what: &'static str,
    },
    /// The payload has bytes after the message.
    #[error(
        "{what} has {extra} trailing bytes: the peer is broken or speaks another protocol version"
    )]
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

fn check_range(what: &'static str, offset: u64, len: u64) -> Result<(), WireError> {
    if offset.checked_add(len).is_none() {
        return Err(WireError::Invalid {
            what,
            field: "offset + len overflows",
        });
    }
    Ok(())
}

/// The xxh3-64 of an extent, as carried in `Data` and `Mirror`.
pub fn extent_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

impl<'a> Msg<'a> {
    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Msg::Hello(_) => MsgType::Hello,
            Msg::Welcome(_) => MsgType::Welcome,
            Msg::Have { .. } => MsgType::Have,
            Msg::Data { .. } => MsgType::Data,
            Msg::Zero { .. } => MsgType::Zero,
            Msg::Flush { .. } => MsgType::Flush,
            Msg::Mirror { .. } => MsgType::Mirror,
            Msg::MirrorZero { .. } => MsgType::MirrorZero,
            Msg::Commit { .. } => MsgType::Commit,
            Msg::Abort { .. } => MsgType::Abort,
            Msg::HashReq { .. } => MsgType::HashReq,
            Msg::FwdRead { .. } => MsgType::FwdRead,
            Msg::FwdWrite { .. } => MsgType::FwdWrite,
            Msg::FwdZero { .. } => MsgType::FwdZero,
            Msg::FwdDiscard { .. } => MsgType::FwdDiscard,
            Msg::FwdFlush { .. } => MsgType::FwdFlush,
            Msg::Reply { .. } => MsgType::Reply,
        }
    }

    /// Encode into a fixed header and a trailing byte slice (data extents
    /// are not copied: send both as parts of one frame). Fails only when a
    /// field exceeds its bound, so nothing unreadable is ever sent.
    pub fn encode(&self) -> Result<(u16, Vec<u8>, &'a [u8]), WireError> {
        let mut h = Vec::with_capacity(64);
        let mut tail: &'a [u8] = &[];
        let bound = |field: &'static str, value: usize, max: usize| {
            if value > max {
                Err(WireError::Bounds {
                    what: "encode",
                    field,
                    value: value as u64,
                    max: max as u64,
                })
            } else {
                Ok(())
            }
        };
        match self {
            Msg::Hello(m) => {
                bound("name", m.name.len(), MAX_NAME)?;
                h.extend_from_slice(&m.min_version.to_be_bytes());
                h.extend_from_slice(&m.max_version.to_be_bytes());
                h.extend_from_slice(&m.migration_id);
                h.extend_from_slice(&m.disk_id);
                h.extend_from_slice(&m.generation.to_be_bytes());
                h.extend_from_slice(&m.base_generation.to_be_bytes());
                h.extend_from_slice(&m.size.to_be_bytes());
                h.push(m.format);
                h.extend_from_slice(&m.granularity.to_be_bytes());
                h.push(m.name.len() as u8);
                h.extend_from_slice(m.name.as_bytes());
            }
            Msg::Welcome(w) => {
                h.extend_from_slice(&w.version.to_be_bytes());
                h.push(w.start as u8);
            }
            Msg::Have { ranges, last } => {
                bound("ranges", ranges.len(), MAX_RANGES)?;
                h.push(u8::from(*last));
                h.extend_from_slice(&(ranges.len() as u32).to_be_bytes());
                for (o, l) in ranges {
                    h.extend_from_slice(&o.to_be_bytes());
                    h.extend_from_slice(&l.to_be_bytes());
                }
            }
            Msg::Data { offset, hash, data } => {
                bound("data", data.len(), MAX_DATA)?;
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&hash.to_be_bytes());
                tail = data;
            }
            Msg::Zero { offset, len } => {
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
            }
            Msg::Flush { id } | Msg::FwdFlush { id } => {
                h.extend_from_slice(&id.to_be_bytes());
            }
            Msg::Mirror {
                id,
                offset,
                hash,
                data,
            } => {
                bound("data", data.len(), MAX_DATA)?;
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&hash.to_be_bytes());
                tail = data;
            }
            Msg::MirrorZero { id, offset, len } => {
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
            }
            Msg::Commit { id, generation } => {
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&generation.to_be_bytes());
            }
            Msg::Abort { reason } => {
                let r = truncate(reason, MAX_TEXT);
                h.extend_from_slice(r.as_bytes());
            }
            Msg::HashReq {
                id,
                offset,
                len,
                block,
            } => {
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&block.to_be_bytes());
            }
            Msg::FwdRead { id, offset, len } => {
                bound("len", *len as usize, MAX_DATA)?;
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
            }
            Msg::FwdWrite {
                id,
                offset,
                flags,
                data,
            } => {
                bound("data", data.len(), MAX_DATA)?;
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.push(*flags);
                tail = data;
            }
            Msg::FwdZero {
                id,
                offset,
                len,
                flags,
            }
            | Msg::FwdDiscard {
                id,
                offset,
                len,
                flags,
            } => {
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.push(*flags);
            }
            Msg::Reply { id, code, body } => {
                bound("body", body.len(), MAX_DATA + 64)?;
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&code.to_be_bytes());
                tail = body;
            }
        }
        Ok((self.msg_type() as u16, h, tail))
    }

    /// Encode into one buffer (tests, fuzzing, small messages).
    pub fn to_vec(&self) -> Result<(u16, Vec<u8>), WireError> {
        let (t, mut h, tail) = self.encode()?;
        h.extend_from_slice(tail);
        Ok((t, h))
    }

    /// Decode a frame payload of type `msg_type`.
    pub fn decode(msg_type: u16, payload: &'a [u8]) -> Result<Msg<'a>, WireError> {
        let t = MsgType::from_u16(msg_type).ok_or(WireError::UnknownType(msg_type))?;
        let msg = match t {
            MsgType::Invalid => return Err(WireError::UnknownType(msg_type)),
            MsgType::Hello => {
                let mut r = Reader::new(payload, "Hello");
                let min_version = r.u16()?;
                let max_version = r.u16()?;
                if min_version == 0 || min_version > max_version {
                    return Err(WireError::Invalid {
                        what: "Hello",
                        field: "version range",
                    });
                }
                let migration_id = r.array::<16>()?;
                let disk_id = r.array::<16>()?;
                let generation = r.u64()?;
                let base_generation = r.u64()?;
                let size = r.u64()?;
                let format = r.u8()?;
                if format > 1 {
                    return Err(WireError::Invalid {
                        what: "Hello",
                        field: "format",
                    });
                }
                let granularity = r.u32()?;
                if !granularity.is_power_of_two() || granularity < 512 {
                    return Err(WireError::Invalid {
                        what: "Hello",
                        field: "granularity",
                    });
                }
                let n = r.u8()? as usize;
                let name = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| WireError::Invalid {
                        what: "Hello",
                        field: "name (not UTF-8)",
                    })?
                    .to_owned();
                if name.is_empty() || name.chars().any(char::is_control) {
                    return Err(WireError::Invalid {
                        what: "Hello",
                        field: "name",
                    });
                }
                // Later versions may append fields; version 1 ignores them.
                let _ = r.rest();
                Msg::Hello(Hello {
                    min_version,
                    max_version,
                    migration_id,
                    disk_id,
                    generation,
                    base_generation,
                    size,
                    format,
                    granularity,
                    name,
                })
            }
            MsgType::Welcome => {
                let mut r = Reader::new(payload, "Welcome");
                let version = r.u16()?;
                let start = Start::from_u8(r.u8()?).ok_or(WireError::Invalid {
                    what: "Welcome",
                    field: "start",
                })?;
                r.end()?;
                Msg::Welcome(Welcome { version, start })
            }
            MsgType::Have => {
                let mut r = Reader::new(payload, "Have");
                let last = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(WireError::Invalid {
                            what: "Have",
                            field: "last",
                        });
                    }
                };
                let n = r.u32()? as u64;
                let n = r.bounded("count", n, MAX_RANGES as u64)? as usize;
                // The payload must hold them all before anything is allocated.
                if r.remaining() != n * 16 {
                    return Err(WireError::Truncated { what: "Have" });
                }
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    let o = r.u64()?;
                    let l = r.u64()?;
                    check_range("Have", o, l)?;
                    ranges.push((o, l));
                }
                r.end()?;
                Msg::Have { ranges, last }
            }
            MsgType::Data => {
                let mut r = Reader::new(payload, "Data");
                let offset = r.u64()?;
                let hash = r.u64()?;
                let data = r.rest();
                r.bounded("data", data.len() as u64, MAX_DATA as u64)?;
                if data.is_empty() {
                    return Err(WireError::Invalid {
                        what: "Data",
                        field: "empty extent",
                    });
                }
                check_range("Data", offset, data.len() as u64)?;
                Msg::Data { offset, hash, data }
            }
            MsgType::Zero => {
                let mut r = Reader::new(payload, "Zero");
                let offset = r.u64()?;
                let len = r.u64()?;
                r.end()?;
                check_range("Zero", offset, len)?;
                Msg::Zero { offset, len }
            }
            MsgType::Flush | MsgType::FwdFlush => {
                let mut r = Reader::new(payload, "Flush");
                let id = r.u64()?;
                r.end()?;
                if t == MsgType::Flush {
                    Msg::Flush { id }
                } else {
                    Msg::FwdFlush { id }
                }
            }
            MsgType::Mirror => {
                let mut r = Reader::new(payload, "Mirror");
                let id = r.u64()?;
                let offset = r.u64()?;
                let hash = r.u64()?;
                let data = r.rest();
                r.bounded("data", data.len() as u64, MAX_DATA as u64)?;
                check_range("Mirror", offset, data.len() as u64)?;
                Msg::Mirror {
                    id,
                    offset,
                    hash,
                    data,
                }
            }
            MsgType::Commit => {
                let mut r = Reader::new(payload, "Commit");
                let id = r.u64()?;
                let generation = r.u64()?;
                r.end()?;
                Msg::Commit { id, generation }
            }
            MsgType::Abort => {
                let mut r = Reader::new(payload, "Abort");
                let rest = r.rest();
                let rest = &rest[..rest.len().min(MAX_TEXT)];
                Msg::Abort {
                    reason: sanitize(rest),
                }
            }
            MsgType::HashReq => {
                let mut r = Reader::new(payload, "HashReq");
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                let block = r.u32()?;
                r.end()?;
                check_range("HashReq", offset, len)?;
                if !block.is_power_of_two() || block < 512 || block as usize > MAX_DATA {
                    return Err(WireError::Invalid {
                        what: "HashReq",
                        field: "block",
                    });
                }
                r_bounded_blocks(len, block)?;
                Msg::HashReq {
                    id,
                    offset,
                    len,
                    block,
                }
            }
            MsgType::FwdRead => {
                let mut r = Reader::new(payload, "FwdRead");
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                r.bounded("len", len as u64, MAX_DATA as u64)?;
                r.end()?;
                check_range("FwdRead", offset, len as u64)?;
                Msg::FwdRead { id, offset, len }
            }
            MsgType::FwdWrite => {
                let mut r = Reader::new(payload, "FwdWrite");
                let id = r.u64()?;
                let offset = r.u64()?;
                let flags = r.u8()?;
                let data = r.rest();
                r.bounded("data", data.len() as u64, MAX_DATA as u64)?;
                check_range("FwdWrite", offset, data.len() as u64)?;
                Msg::FwdWrite {
                    id,
                    offset,
                    flags,
                    data,
                }
            }
            MsgType::MirrorZero => {
                let mut r = Reader::new(payload, "MirrorZero");
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                r.end()?;
                check_range("MirrorZero", offset, len)?;
                Msg::MirrorZero { id, offset, len }
            }
            MsgType::FwdZero | MsgType::FwdDiscard => {
                let mut r = Reader::new(payload, "FwdZero");
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                let flags = r.u8()?;
                r.end()?;
                check_range("FwdZero", offset, len)?;
                if t == MsgType::FwdZero {
                    Msg::FwdZero {
                        id,
                        offset,
                        len,
                        flags,
                    }
                } else {
                    Msg::FwdDiscard {
                        id,
                        offset,
                        len,
                        flags,
                    }
                }
            }
            MsgType::Reply => {
                let mut r = Reader::new(payload, "Reply");
                let id = r.u64()?;
                let code = r.u32()?;
                let body = r.rest();
                r.bounded("body", body.len() as u64, (MAX_DATA + 64) as u64)?;
                Msg::Reply { id, code, body }
            }
        };
        Ok(msg)
    }
}

fn r_bounded_blocks(len: u64, block: u32) -> Result<(), WireError> {
    let blocks = len.div_ceil(block as u64);
    if blocks > MAX_HASHES as u64 {
        return Err(WireError::Bounds {
            what: "HashReq",
            field: "blocks",
            value: blocks,
            max: MAX_HASHES as u64,
        });
    }
    Ok(())
}

/// Encode a hash reply body: per block, xxh3-64 and [`flags`] bits.
pub fn encode_hashes(entries: &[(u64, u8)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + entries.len() * 9);
    v.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (h, f) in entries {
        v.extend_from_slice(&h.to_be_bytes());
        v.push(*f);
    }
    v
}

/// Decode a hash reply body.
pub fn decode_hashes(body: &[u8]) -> Result<Vec<(u64, u8)>, WireError> {
    let mut r = Reader::new(body, "hash reply");
    let n = r.u32()? as u64;
    let n = r.bounded("count", n, MAX_HASHES as u64)? as usize;
    if r.remaining() != n * 9 {
        return Err(WireError::Truncated { what: "hash reply" });
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let h = r.u64()?;
        let f = r.u8()?;
        out.push((h, f));
    }
    r.end()?;
    Ok(out)
}

/// Text from the peer made safe to log: lossy UTF-8, control characters
/// replaced, bounded.
pub fn sanitize(bytes: &[u8]) -> String {
    let b = &bytes[..bytes.len().min(MAX_TEXT)];
    let s: String = String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    // Replacement characters can make it longer than the input.
    truncate(&s, MAX_TEXT).to_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Start::Fresh => "fresh",
            Start::Resume => "resume",
            Start::Incremental => "incremental",
            Start::HashResync => "hash-resync",
        })
    }
}

/// Pick the highest version both speak.
pub fn negotiate(min: u16, max: u16) -> Result<u16, WireError> {
    let lo = min.max(MIN_VERSION);
    let hi = max.min(MAX_VERSION);
    if lo > hi {
        return Err(WireError::NoCommonVersion { min, max });
    }
    Ok(hi)
}

#[cfg(test)]
mod tests;
