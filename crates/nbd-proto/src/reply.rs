//! Reply encoders (server side) and the matching decoders (client side,
//! for tests and tools).
//!
//! Headers are returned as fixed arrays or appended to a caller-owned
//! buffer, so a server can put a header directly in front of data it read
//! into the same buffer and send both with one write.

use crate::MAX_BLOCK_STATUS_EXTENTS;
use crate::errno::NbdErrno;
use crate::wire::*;

/// A simple reply header (followed by the data of a successful simple
/// `READ`).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header announcing `payload_len` bytes.
pub fn chunk_header(flags: u16, typ: u16, cookie: u64, payload_len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// Header of an `OFFSET_DATA` chunk carrying `data_len` bytes, which follow
/// it directly. `data_len` must be at most `u32::MAX - 8` (any valid
/// request length is).
pub fn offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    let h = chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    b[..CHUNK_HEADER_LEN].copy_from_slice(&h);
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A complete `OFFSET_HOLE` chunk (`hole_len` must be nonzero).
pub fn offset_hole_chunk(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> [u8; OFFSET_HOLE_CHUNK_LEN] {
    let mut b = [0u8; OFFSET_HOLE_CHUNK_LEN];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    b[CHUNK_HEADER_LEN + 8..].copy_from_slice(&hole_len.to_be_bytes());
    b
}

/// The final empty chunk.
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// Cut `msg` to at most [`MAX_STRING_LEN`] bytes on a character boundary.
pub fn truncate_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Append an `ERROR` chunk with a human-readable message (truncated to the
/// protocol's 4096-byte string limit).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: NbdErrno, message: &str, done: bool) {
    let msg = truncate_message(message);
    out.extend_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.as_u32().to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Builds one `BLOCK_STATUS` chunk in place in a buffer.
///
/// Extents are clamped to the requested range (so every descriptor length
/// fits in 32 bits and the sum never exceeds the request), neighbours with
/// equal flags are merged, and at most [`MAX_BLOCK_STATUS_EXTENTS`]
/// descriptors (1 with `REQ_ONE`) are written.
#[derive(Debug)]
pub struct BlockStatusBuilder<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    remaining: u32,
    max: u32,
    count: u32,
    last_flags: u32,
}

/// A block status chunk ended up without any extent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no extent was produced for a block status chunk; reply with an error chunk instead")]
pub struct EmptyBlockStatus;

impl<'a> BlockStatusBuilder<'a> {
    /// Start a chunk for `context_id` describing `request_len` bytes.
    pub fn new(
        out: &'a mut Vec<u8>,
        cookie: u64,
        context_id: u32,
        done: bool,
        request_len: u32,
        req_one: bool,
    ) -> Self {
        let start = out.len();
        out.extend_from_slice(&chunk_header(
            done_flag(done),
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            0,
        ));
        out.extend_from_slice(&context_id.to_be_bytes());
        Self {
            out,
            start,
            remaining: request_len,
            max: if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS },
            count: 0,
            last_flags: 0,
        }
    }

    /// Add the next extent (contiguous with the previous one). Returns
    /// whether more extents are wanted.
    pub fn push(&mut self, len: u64, flags: u32) -> bool {
        if self.remaining > 0 && len > 0 {
            let take = len.min(u64::from(self.remaining)) as u32;
            if self.count > 0 && flags == self.last_flags {
                let at = self.out.len() - 8;
                let prev = u32::from_be_bytes([
                    self.out[at],
                    self.out[at + 1],
                    self.out[at + 2],
                    self.out[at + 3],
                ]);
                // Cannot overflow: the sum is bounded by the request length.
                self.out[at..at + 4].copy_from_slice(&(prev + take).to_be_bytes());
                self.remaining -= take;
            } else if self.count < self.max {
                self.out.extend_from_slice(&take.to_be_bytes());
                self.out.extend_from_slice(&flags.to_be_bytes());
                self.count += 1;
                self.last_flags = flags;
                self.remaining -= take;
            } else {
                return false;
            }
        }
        self.wants_more()
    }

    /// Whether another extent would be used.
    pub fn wants_more(&self) -> bool {
        self.remaining > 0 && (self.count < self.max || self.count == 0)
    }

    /// Bytes of the request not yet described.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Finish the chunk, returning the number of descriptors. An empty
    /// chunk is invalid on the wire: it is removed from the buffer and an
    /// error returned.
    pub fn finish(self) -> Result<u32, EmptyBlockStatus> {
        if self.count == 0 {
            self.out.truncate(self.start);
            return Err(EmptyBlockStatus);
        }
        let len = 4 + 8 * self.count;
        self.out[self.start + 16..self.start + 20].copy_from_slice(&len.to_be_bytes());
        Ok(self.count)
    }
}

// ---------------------------------------------------------------------
// Client-side decoding.

/// A decoded structured chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type.
    pub typ: u16,
    /// Cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

/// Any reply header, told apart by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error (0 = success).
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// A structured chunk; its 20-byte header has been fully decoded.
    Chunk(ChunkHeader),
}

/// Decode a simple reply header.
pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Option<(u32, u64)> {
    (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == SIMPLE_REPLY_MAGIC).then(|| {
        (
            u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        )
    })
}

/// Decode a structured chunk header.
pub fn parse_chunk_header(b: &[u8; CHUNK_HEADER_LEN]) -> Option<ChunkHeader> {
    (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == STRUCTURED_REPLY_MAGIC).then(|| ChunkHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        typ: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        length: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
    })
}

/// Decode a `BLOCK_STATUS` payload into its context id and descriptors.
pub fn parse_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return None;
    }
    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let ext = payload[4..]
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    Some((id, ext))
}

/// Decode an `ERROR` payload into the error and its message.
pub fn parse_error_payload(payload: &[u8]) -> Option<(u32, &str)> {
    let err = u32::from_be_bytes(payload.get(0..4)?.try_into().ok()?);
    let len = u16::from_be_bytes(payload.get(4..6)?.try_into().ok()?) as usize;
    let msg = std::str::from_utf8(payload.get(6..6 + len)?).ok()?;
    Some((err, msg))
}

/// Encode a client option (client side; used by tests and tools).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A decoded option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option being answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub typ: u32,
    /// Payload length.
    pub length: u32,
}

/// Decode an option reply header.
pub fn parse_option_reply(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<OptionReplyHeader> {
    let magic = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    (magic == OPTION_REPLY_MAGIC).then(|| OptionReplyHeader {
        option: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        typ: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        length: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_layouts() {
        let s = simple_reply(0x1122_3344_5566_7788, 22);
        assert_eq!(
            s,
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        let d = offset_data_header(7, 4096, 512, true);
        let h = parse_chunk_header(d[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                typ: REPLY_TYPE_OFFSET_DATA,
                cookie: 7,
                length: 520
            }
        );
        assert_eq!(u64::from_be_bytes(d[20..28].try_into().unwrap()), 4096);
        let hole = offset_hole_chunk(9, 100, 200, false);
        let h = parse_chunk_header(hole[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.flags, h.typ, h.length), (0, REPLY_TYPE_OFFSET_HOLE, 12));
        assert_eq!(u32::from_be_bytes(hole[28..32].try_into().unwrap()), 200);
        let n = parse_chunk_header(&none_chunk(3)).unwrap();
        assert_eq!(
            (n.flags, n.typ, n.length),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        );
    }

    #[test]
    fn error_chunk_truncates_on_char_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        error_chunk(&mut out, 1, NbdErrno::Io, &long, true);
        let h = parse_chunk_header(out[..20].try_into().unwrap()).unwrap();
        assert_eq!(h.length as usize, out.len() - 20);
        let (err, msg) = parse_error_payload(&out[20..]).unwrap();
        assert_eq!(err, 5);
        assert_eq!(msg.len(), 4096);
        assert!(msg.chars().all(|c| c == 'é'));
    }

    #[test]
    fn block_status_merges_clamps_and_limits() {
        let mut out = vec![0xAA]; // pre-existing bytes must survive
        let mut b = BlockStatusBuilder::new(&mut out, 5, 2, true, 100, false);
        assert!(b.push(10, 0));
        assert!(b.push(20, 0)); // merged
        assert!(b.push(0, 3)); // ignored
        assert!(b.push(30, 3));
        assert!(!b.push(1 << 40, 1)); // clamped to 40, range complete
        assert_eq!(b.finish(), Ok(3));
        assert_eq!(out[0], 0xAA);
        let h = parse_chunk_header(out[1..21].try_into().unwrap()).unwrap();
        assert_eq!(
            (h.flags, h.typ, h.cookie, h.length),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5, 28)
        );
        let (id, ext) = parse_block_status(&out[21..]).unwrap();
        assert_eq!(id, 2);
        assert_eq!(ext, vec![(30, 0), (30, 3), (40, 1)]);
    }

    #[test]
    fn block_status_req_one_and_empty() {
        let mut out = Vec::new();
        let mut b = BlockStatusBuilder::new(&mut out, 5, 1, false, 100, true);
        assert!(!b.push(1000, 2));
        assert!(!b.push(10, 0));
        assert_eq!(b.finish(), Ok(1));
        let (_, ext) = parse_block_status(&out[20..]).unwrap();
        assert_eq!(ext, vec![(100, 2)]);

        let mut out = vec![1, 2, 3];
        let b = BlockStatusBuilder::new(&mut out, 5, 1, false, 100, false);
        assert_eq!(b.finish(), Err(EmptyBlockStatus));
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn block_status_caps_extent_count() {
        let mut out = Vec::new();
        let mut b = BlockStatusBuilder::new(&mut out, 5, 1, true, u32::MAX, false);
        let mut n = 0u64;
        while b.push(1, (n % 2) as u32) {
            n += 1;
        }
        assert_eq!(b.finish(), Ok(MAX_BLOCK_STATUS_EXTENTS));
        assert_eq!(out.len(), 24 + 8 * MAX_BLOCK_STATUS_EXTENTS as usize);
    }
}
