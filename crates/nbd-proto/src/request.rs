//! Transmission requests: the 28-byte header, and validation against the
//! negotiated export, kept apart from dispatch.

use crate::MAX_REQUEST_LEN;
use crate::errno::NbdErrno;
use crate::wire::*;

/// A request header as read from the wire (not yet validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload for `CMD_WRITE`).
    pub length: u32,
}

/// The header cannot be a request: the stream is unsynchronised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Wrong magic number.
    #[error(
        "request has magic {0:#010x} instead of {REQUEST_MAGIC:#010x}; the stream is out of sync: close the connection"
    )]
    Magic(u32),
}

impl Request {
    /// Parse a header. Only the magic can make this fail; everything else
    /// is judged by [`validate_request`].
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, RequestError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(RequestError::Magic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encode the header (client side; used by tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire. Only
    /// `CMD_WRITE` carries one; the reader must consume (or, when above
    /// [`MAX_REQUEST_LEN`], refuse by closing) exactly this many bytes
    /// whether or not the request is valid, to stay in sync.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What validation needs to know about the negotiated export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransmissionInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// At least one metadata context was selected.
    pub has_meta_contexts: bool,
    /// The `understudy:order` context was selected, so `CMD_ORDER` is
    /// allowed.
    pub order: bool,
}

impl TransmissionInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A validated operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes; `df` forbids fragmenting the reply.
    Read {
        /// Offset.
        offset: u64,
        /// Length (may be 0).
        len: u32,
        /// Don't fragment.
        df: bool,
    },
    /// Write the `len`-byte payload.
    Write {
        /// Offset.
        offset: u64,
        /// Length (may be 0).
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Soft disconnect.
    Disc,
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
        /// Holes may be punched (no `NO_HOLE`).
        may_unmap: bool,
        /// Fail fast with `ENOTSUP` instead of writing zero buffers.
        fast_only: bool,
    },
    /// Write-order barrier (`CMD_ORDER`, negotiated extension): writes
    /// completed before it reach stable storage before writes after it.
    Order {
        /// Also make everything before it durable before the reply
        /// (write-flush).
        fua: bool,
    },
    /// Block status for every selected context.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length (never 0).
        len: u32,
        /// One extent per context.
        req_one: bool,
    },
}

/// A request that passed [`validate_request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidRequest {
    /// The client's cookie.
    pub cookie: u64,
    /// What to do.
    pub op: Op,
}

/// Check a request against the export and the negotiated features.
///
/// Rules (in this order): unknown command → `EINVAL`; a data-changing
/// command on a read-only export → `EPERM`; a command whose transmission
/// flag was not advertised → `EINVAL`; any command flag not valid for the
/// command (or not advertised: `FUA`, `DF`, `FAST_ZERO`) → `EINVAL`;
/// `READ`/`WRITE` longer than [`MAX_REQUEST_LEN`] → `EOVERFLOW`; a range
/// past the end (including `offset + length` overflowing) → `ENOSPC` for
/// `WRITE`/`WRITE_ZEROES`, `EINVAL` otherwise; `FLUSH` with a nonzero offset
/// or length → `EINVAL`; `BLOCK_STATUS` without a selected context or with
/// length 0 → `EINVAL`. `ORDER` (extension) is an unknown command (`EINVAL`)
/// unless `understudy:order` was negotiated; it takes only `FUA` and needs
/// offset and length 0, else `EINVAL`. Zero-length `READ`, `WRITE`, `TRIM`, `CACHE` and
/// `WRITE_ZEROES` inside the export are valid no-ops. `DISC` is always
/// accepted (the connection ends either way).
pub fn validate_request(
    req: &Request,
    export: &TransmissionInfo,
) -> Result<ValidRequest, NbdErrno> {
    let ro = export.has(FLAG_READ_ONLY);
    let fua_ok = if export.has(FLAG_SEND_FUA) {
        CMD_FLAG_FUA
    } else {
        0
    };
    let (allowed, writes) = match req.command {
        CMD_READ => (
            fua_ok
                | if export.has(FLAG_SEND_DF) {
                    CMD_FLAG_DF
                } else {
                    0
                },
            false,
        ),
        CMD_WRITE => (fua_ok, true),
        CMD_DISC => {
            return Ok(ValidRequest {
                cookie: req.cookie,
                op: Op::Disc,
            });
        }
        CMD_FLUSH | CMD_CACHE => (fua_ok, false),
        CMD_TRIM => (fua_ok, true),
        CMD_WRITE_ZEROES => (
            fua_ok
                | CMD_FLAG_NO_HOLE
                | if export.has(FLAG_SEND_FAST_ZERO) {
                    CMD_FLAG_FAST_ZERO
                } else {
                    0
                },
            true,
        ),
        CMD_BLOCK_STATUS => (fua_ok | CMD_FLAG_REQ_ONE, false),
        // Never negotiated by standard clients: to them it stays unknown.
        CMD_ORDER if export.order => (fua_ok, false),
        _ => return Err(NbdErrno::Inval),
    };
    if writes && ro {
        return Err(NbdErrno::Perm);
    }
    let advertised = match req.command {
        CMD_FLUSH => export.has(FLAG_SEND_FLUSH),
        CMD_TRIM => export.has(FLAG_SEND_TRIM),
        CMD_WRITE_ZEROES => export.has(FLAG_SEND_WRITE_ZEROES),
        CMD_BLOCK_STATUS => export.structured && export.has_meta_contexts,
        _ => true,
    };
    if !advertised {
        return Err(NbdErrno::Inval);
    }
    if req.flags & !allowed != 0 {
        return Err(NbdErrno::Inval);
    }
    let (offset, len) = (req.offset, req.length);
    if matches!(req.command, CMD_READ | CMD_WRITE) && len > MAX_REQUEST_LEN {
        return Err(NbdErrno::Overflow);
    }
    let in_bounds = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= export.size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let op = match req.command {
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(NbdErrno::Inval);
            }
            Op::Flush
        }
        CMD_ORDER => {
            if offset != 0 || len != 0 {
                return Err(NbdErrno::Inval);
            }
            Op::Order { fua }
        }
        _ if !in_bounds => {
            return Err(if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                NbdErrno::NoSpc
            } else {
                NbdErrno::Inval
            });
        }
        CMD_READ => Op::Read {
            offset,
            len,
            df: req.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Op::Write { offset, len, fua },
        CMD_TRIM => Op::Trim { offset, len, fua },
        CMD_CACHE => Op::Cache { offset, len },
        CMD_WRITE_ZEROES => Op::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if len == 0 {
                return Err(NbdErrno::Inval);
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return Err(NbdErrno::Inval),
    };
    Ok(ValidRequest {
        cookie: req.cookie,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: TransmissionInfo = TransmissionInfo {
        size: 1 << 20,
        flags: FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_DF,
        structured: true,
        has_meta_contexts: true,
        order: false,
    };

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 42,
            offset,
            length,
        }
    }

    fn v(r: Request, e: &TransmissionInfo) -> Result<Op, NbdErrno> {
        validate_request(&r, e).map(|v| {
            assert_eq!(v.cookie, 42);
            v.op
        })
    }

    #[test]
    fn header_round_trip_and_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 0x0102_0304_0506_0708, 0x0a0b_0c0d);
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b).unwrap(), r);
        assert_eq!(r.payload_len(), 0x0a0b_0c0d);
        assert_eq!(req(CMD_READ, 0, 0, 99).payload_len(), 0);
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(Request::parse(&bad), Err(RequestError::Magic(0x0060_9513)));
    }

    #[test]
    fn bounds_and_overflow() {
        let size = RW.size;
        assert!(v(req(CMD_READ, 0, size - 10, 10), &RW).is_ok());
        assert_eq!(
            v(req(CMD_READ, 0, size - 10, 11), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            v(req(CMD_WRITE, 0, size - 10, 11), &RW),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, 0, size, 1), &RW),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(v(req(CMD_TRIM, 0, size, 1), &RW), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_READ, 0, u64::MAX, 1), &RW), Err(NbdErrno::Inval));
        assert_eq!(
            v(req(CMD_WRITE, 0, u64::MAX - 2, 4), &RW),
            Err(NbdErrno::NoSpc)
        );
        // Zero-length at the very end is a valid no-op; past the end is not.
        assert!(v(req(CMD_READ, 0, size, 0), &RW).is_ok());
        assert_eq!(v(req(CMD_READ, 0, size + 1, 0), &RW), Err(NbdErrno::Inval));
        let big = TransmissionInfo {
            size: u64::MAX,
            ..RW
        };
        assert_eq!(
            v(req(CMD_READ, 0, 0, MAX_REQUEST_LEN + 1), &big),
            Err(NbdErrno::Overflow)
        );
        assert_eq!(
            v(req(CMD_WRITE, 0, 0, MAX_REQUEST_LEN + 1), &big),
            Err(NbdErrno::Overflow)
        );
        assert!(v(req(CMD_READ, 0, 0, MAX_REQUEST_LEN), &big).is_ok());
        // Commands without payload may exceed the payload limit.
        assert!(v(req(CMD_WRITE_ZEROES, 0, 0, u32::MAX), &big).is_ok());
        assert!(v(req(CMD_TRIM, 0, 0, u32::MAX), &big).is_ok());
    }

    #[test]
    fn flags_per_command() {
        assert_eq!(
            v(req(CMD_READ, CMD_FLAG_DF, 0, 1), &RW),
            Ok(Op::Read {
                offset: 0,
                len: 1,
                df: true
            })
        );
        assert_eq!(
            v(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            v(req(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 1), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(v(req(CMD_READ, 1 << 9, 0, 1), &RW), Err(NbdErrno::Inval));
        assert_eq!(
            v(
                req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                    0,
                    8
                ),
                &RW
            ),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 8,
                fua: true,
                may_unmap: false,
                fast_only: true
            })
        );
        let no_fast = TransmissionInfo {
            flags: RW.flags & !FLAG_SEND_FAST_ZERO,
            ..RW
        };
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8), &no_fast),
            Err(NbdErrno::Inval)
        );
        let no_df = TransmissionInfo {
            flags: RW.flags & !FLAG_SEND_DF,
            ..RW
        };
        assert_eq!(
            v(req(CMD_READ, CMD_FLAG_DF, 0, 1), &no_df),
            Err(NbdErrno::Inval)
        );
        let no_fua = TransmissionInfo {
            flags: RW.flags & !FLAG_SEND_FUA,
            ..RW
        };
        assert_eq!(
            v(req(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &no_fua),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            v(req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &RW),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 1,
                req_one: true
            })
        );
    }

    #[test]
    fn read_only_and_unadvertised() {
        let ro = TransmissionInfo {
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH,
            ..RW
        };
        assert_eq!(v(req(CMD_WRITE, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        assert_eq!(v(req(CMD_TRIM, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        assert_eq!(v(req(CMD_WRITE_ZEROES, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        assert!(v(req(CMD_READ, 0, 0, 1), &ro).is_ok());
        assert_eq!(v(req(CMD_FLUSH, 0, 0, 0), &ro), Ok(Op::Flush));
        let bare = TransmissionInfo {
            flags: FLAG_HAS_FLAGS,
            structured: false,
            has_meta_contexts: false,
            ..RW
        };
        assert_eq!(v(req(CMD_FLUSH, 0, 0, 0), &bare), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_TRIM, 0, 0, 1), &bare), Err(NbdErrno::Inval));
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, 0, 0, 1), &bare),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            v(req(CMD_BLOCK_STATUS, 0, 0, 1), &bare),
            Err(NbdErrno::Inval)
        );
        let no_ctx = TransmissionInfo {
            has_meta_contexts: false,
            ..RW
        };
        assert_eq!(
            v(req(CMD_BLOCK_STATUS, 0, 0, 1), &no_ctx),
            Err(NbdErrno::Inval)
        );
    }

    #[test]
    fn order_only_when_negotiated() {
        // Not negotiated: unknown command, whatever the flags or range.
        assert_eq!(v(req(CMD_ORDER, 0, 0, 0), &RW), Err(NbdErrno::Inval));
        let ord = TransmissionInfo { order: true, ..RW };
        assert_eq!(
            v(req(CMD_ORDER, 0, 0, 0), &ord),
            Ok(Op::Order { fua: false })
        );
        assert_eq!(
            v(req(CMD_ORDER, CMD_FLAG_FUA, 0, 0), &ord),
            Ok(Op::Order { fua: true })
        );
        assert_eq!(v(req(CMD_ORDER, 0, 1, 0), &ord), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_ORDER, 0, 0, 1), &ord), Err(NbdErrno::Inval));
        for f in [CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, 1 << 15] {
            assert_eq!(v(req(CMD_ORDER, f, 0, 0), &ord), Err(NbdErrno::Inval));
        }
        let no_fua = TransmissionInfo {
            flags: ord.flags & !FLAG_SEND_FUA,
            ..ord
        };
        assert_eq!(
            v(req(CMD_ORDER, CMD_FLAG_FUA, 0, 0), &no_fua),
            Err(NbdErrno::Inval)
        );
        // No payload, so the stream stays in sync even when refused.
        assert_eq!(req(CMD_ORDER, 0, 0, 4096).payload_len(), 0);
        // Negotiating ORDER changes nothing for the standard commands.
        for cmd in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES] {
            for (o, l) in [(0, 0), (0, 512), (RW.size, 1)] {
                let r = req(cmd, 0, o, l);
                assert_eq!(v(r, &RW), v(r, &ord), "{cmd} {o} {l}");
            }
        }
    }

    #[test]
    fn command_specific_rules() {
        assert_eq!(v(req(CMD_FLUSH, 0, 1, 0), &RW), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_FLUSH, 0, 0, 1), &RW), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_BLOCK_STATUS, 0, 0, 0), &RW), Err(NbdErrno::Inval));
        assert_eq!(v(req(CMD_DISC, 0xffff, 7, 7), &RW), Ok(Op::Disc));
        assert_eq!(v(req(CMD_RESIZE, 0, 0, 0), &RW), Err(NbdErrno::Inval));
        assert_eq!(v(req(999, 0, 0, 0), &RW), Err(NbdErrno::Inval));
        assert_eq!(
            v(req(CMD_CACHE, 0, 0, 4096), &RW),
            Ok(Op::Cache {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, 0, 0, 0), &RW),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 0,
                fua: false,
                may_unmap: true,
                fast_only: false
            })
        );
    }
}
