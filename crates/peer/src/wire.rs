//! Byte layouts: the hello record, the frame header and the message-type
//! registry. Pure functions on byte slices, no I/O.
//!
//! Every integer on the wire is big-endian (network order, as in NBD).

use std::fmt;
use std::ops::RangeInclusive;

use crate::error::PeerError;

/// First eight bytes each side sends. Never changes between protocol
/// versions, so any two releases can at least tell each other apart.
pub const MAGIC: [u8; 8] = *b"USTDYPR1";

/// Oldest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Newest protocol version this build speaks.
///
/// Compatibility window: each release speaks its own protocol version and
/// the previous one, so a cluster can be upgraded one node at a time.
pub const MAX_PROTOCOL_VERSION: u16 = 1;

/// Length of the fixed hello prefix: magic plus the u16 body length.
pub const HELLO_PREFIX_LEN: usize = 10;
/// Smallest legal hello body (one-byte node id and purpose, no extensions).
pub const HELLO_MIN_BODY: usize = 44;
/// Largest hello body accepted. Bounds what an unauthenticated peer can make
/// us buffer; the slack after the known fields is for future extensions.
pub const HELLO_MAX_BODY: usize = 1024;
/// Fixed fields of the hello body before the node id.
const HELLO_FIXED: usize = 41;
/// Longest node id.
pub const MAX_NODE_ID_LEN: usize = 64;
/// Longest purpose (service) string.
pub const MAX_PURPOSE_LEN: usize = 32;
/// Length of the handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an authentication proof.
pub const PROOF_LEN: usize = 32;

/// Length of a frame header: length, type, flags, sequence, header check.
pub const HEADER_LEN: usize = 24;
/// Length of the keyed-BLAKE3 tag that ends every frame.
pub const MAC_LEN: usize = 16;
/// Length of the keyed check over the first 16 header bytes.
pub const HEADER_CHECK_LEN: usize = 8;

/// Default largest payload a link accepts: a 16 MiB data chunk plus room
/// for a service's own request header.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024 * 1024 + 64 * 1024;
/// Largest value `max_payload` may be configured to.
pub const MAX_MAX_PAYLOAD: u32 = 256 * 1024 * 1024;
/// Smallest value `max_payload` may be configured to: control messages
/// (an error text of up to 1 KiB) must always fit.
pub const MIN_MAX_PAYLOAD: u32 = 4096;

/// Inclusive range of protocol versions a side speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VersionRange {
    /// Oldest version.
    pub min: u16,
    /// Newest version.
    pub max: u16,
}

impl VersionRange {
    /// The range this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: MAX_PROTOCOL_VERSION,
    };

    /// Whether `min <= max` and version 0 (reserved) is not included.
    pub fn is_valid(&self) -> bool {
        self.min >= 1 && self.min <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// Pick the highest version both sides speak.
///
/// Both sides run this on the same two hellos, so they agree on the result
/// (or both fail with the same two ranges in the message).
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, PeerError> {
    let high = ours.max.min(theirs.max);
    let low = ours.min.max(theirs.min);
    if high < low {
        return Err(PeerError::VersionMismatch { ours, theirs });
    }
    Ok(high)
}

/// The record each side sends first, before any authentication.
///
/// Layout (the first 10 bytes and the fixed body fields are frozen for all
/// protocol versions; later versions may only append extension bytes):
///
/// ```text
/// off  len  field
///   0    8  magic "USTDYPR1"
///   8    2  body length L, 44 <= L <= 1024
///  10    2  min protocol version
///  12    2  max protocol version
///  14   32  nonce (fresh random per connection)
///  46    4  max payload this side accepts per frame
///  50    1  node id length n, 1..=64
///  51    n  node id (printable ASCII)
///   ..   1  purpose length p, 1..=32
///   ..   p  purpose ([a-z0-9._-])
///   ..  ..  extensions (ignored by version 1, but bound into the transcript)
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    /// Versions the sender speaks.
    pub versions: VersionRange,
    /// Fresh random challenge.
    pub nonce: [u8; NONCE_LEN],
    /// Largest frame payload the sender accepts.
    pub max_payload: u32,
    /// The sender's node id.
    pub node_id: String,
    /// The service the connection is for.
    pub purpose: String,
    /// Bytes after the known fields (empty for version 1 senders).
    pub extensions: Vec<u8>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("versions", &self.versions)
            .field("max_payload", &self.max_payload)
            .field("node_id", &self.node_id)
            .field("purpose", &self.purpose)
            .field("extensions", &self.extensions.len())
            .finish_non_exhaustive()
    }
}

/// A hello field (node id or purpose) that breaks its rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// Node id empty or too long.
    #[error("node id must be 1 to {MAX_NODE_ID_LEN} bytes, got {len}")]
    NodeIdLength {
        /// Bytes given.
        len: usize,
    },
    /// Node id with spaces, control or non-ASCII characters.
    #[error("node id must be printable ASCII without spaces")]
    NodeIdCharacters,
    /// Purpose empty or too long.
    #[error("purpose must be 1 to {MAX_PURPOSE_LEN} bytes, got {len}")]
    PurposeLength {
        /// Bytes given.
        len: usize,
    },
    /// Purpose with characters outside `[a-z0-9._-]`.
    #[error("purpose may only contain a-z, 0-9, '.', '_' and '-'")]
    PurposeCharacters,
}

/// Check a node id: 1..=64 bytes of printable ASCII (no spaces), so it is
/// safe to print in logs.
pub fn check_node_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() || id.len() > MAX_NODE_ID_LEN {
        return Err(FieldError::NodeIdLength { len: id.len() });
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::NodeIdCharacters);
    }
    Ok(())
}

/// Check a purpose string: 1..=32 bytes of `[a-z0-9._-]`.
pub fn check_purpose(purpose: &str) -> Result<(), FieldError> {
    if purpose.is_empty() || purpose.len() > MAX_PURPOSE_LEN {
        return Err(FieldError::PurposeLength { len: purpose.len() });
    }
    if !purpose
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(FieldError::PurposeCharacters);
    }
    Ok(())
}

impl Hello {
    /// Serialise, prefix included. Fails if a field is out of bounds.
    pub fn encode(&self) -> Result<Vec<u8>, PeerError> {
        let config = |e: FieldError| PeerError::Config {
            reason: e.to_string(),
        };
        check_node_id(&self.node_id).map_err(config)?;
        check_purpose(&self.purpose).map_err(config)?;
        let body_len =
            HELLO_FIXED + self.node_id.len() + 1 + self.purpose.len() + self.extensions.len();
        if body_len > HELLO_MAX_BODY {
            return Err(PeerError::Config {
                reason: format!("hello extensions too long ({body_len} > {HELLO_MAX_BODY} bytes)"),
            });
        }
        let mut out = Vec::with_capacity(HELLO_PREFIX_LEN + body_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.extend_from_slice(&self.versions.min.to_be_bytes());
        out.extend_from_slice(&self.versions.max.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.max_payload.to_be_bytes());
        out.push(self.node_id.len() as u8);
        out.extend_from_slice(self.node_id.as_bytes());
        out.push(self.purpose.len() as u8);
        out.extend_from_slice(self.purpose.as_bytes());
        out.extend_from_slice(&self.extensions);
        Ok(out)
    }

    /// Parse the 10-byte prefix and return the body length that follows.
    pub fn decode_prefix(prefix: &[u8; HELLO_PREFIX_LEN]) -> Result<usize, PeerError> {
        let mut got = [0u8; 8];
        got.copy_from_slice(&prefix[..8]);
        if got != MAGIC {
            // A TLS record header: handshake (0x16), version 3.x.
            if got[0] == 0x16 && got[1] == 0x03 {
                return Err(PeerError::PeerSpeaksTls);
            }
            return Err(PeerError::BadMagic { got });
        }
        let len = usize::from(u16::from_be_bytes([prefix[8], prefix[9]]));
        if !(HELLO_MIN_BODY..=HELLO_MAX_BODY).contains(&len) {
            return Err(PeerError::MalformedHello {
                reason: format!(
                    "body length {len} outside {HELLO_MIN_BODY}..={HELLO_MAX_BODY} bytes"
                ),
            });
        }
        Ok(len)
    }

    /// Parse a hello body (the bytes after the prefix).
    pub fn decode_body(body: &[u8]) -> Result<Hello, PeerError> {
        let bad = |reason: String| PeerError::MalformedHello { reason };
        if !(HELLO_MIN_BODY..=HELLO_MAX_BODY).contains(&body.len()) {
            return Err(bad(format!("body of {} bytes", body.len())));
        }
        let u16_at = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
        let versions = VersionRange {
            min: u16_at(0),
            max: u16_at(2),
        };
        if !versions.is_valid() {
            return Err(bad(format!("invalid version range {versions}")));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&body[4..4 + NONCE_LEN]);
        let max_payload = u32::from_be_bytes([body[36], body[37], body[38], body[39]]);
        let mut pos = 40;
        let node_id = take_string(body, &mut pos, "node id")?;
        check_node_id(&node_id).map_err(|e| bad(e.to_string()))?;
        let purpose = take_string(body, &mut pos, "purpose")?;
        check_purpose(&purpose).map_err(|e| bad(e.to_string()))?;
        Ok(Hello {
            versions,
            nonce,
            max_payload,
            node_id,
            purpose,
            extensions: body[pos..].to_vec(),
        })
    }
}

/// Read a u8-length-prefixed string at `*pos`, bounds-checked.
fn take_string(body: &[u8], pos: &mut usize, what: &str) -> Result<String, PeerError> {
    let bad = |reason: String| PeerError::MalformedHello { reason };
    let len = usize::from(
        *body
            .get(*pos)
            .ok_or_else(|| bad(format!("{what} length missing")))?,
    );
    let start = *pos + 1;
    let bytes = body
        .get(start..start + len)
        .ok_or_else(|| bad(format!("{what} of {len} bytes runs past the end")))?;
    *pos = start + len;
    String::from_utf8(bytes.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
}

/// A decoded frame header (the 8-byte header check is verified separately).
///
/// ```text
/// off  len  field
///   0    4  payload length
///   4    2  message type
///   6    2  flags (all reserved: must be 0 in version 1)
///   8    8  sequence number (0, 1, 2, ... per direction)
///  16    8  header check: keyed BLAKE3 of bytes 0..16, truncated
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// Message type (see [`MsgType`] and [`Service`]).
    pub msg_type: u16,
    /// Flags; none are defined in version 1.
    pub flags: u16,
    /// Sequence number.
    pub seq: u64,
}

impl FrameHeader {
    /// The first 16 header bytes (everything but the header check).
    pub fn encode_fields(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.len.to_be_bytes());
        out[4..6].copy_from_slice(&self.msg_type.to_be_bytes());
        out[6..8].copy_from_slice(&self.flags.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// Decode the fields from the first 16 header bytes.
    pub fn decode_fields(b: &[u8; 16]) -> FrameHeader {
        FrameHeader {
            len: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            msg_type: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            seq: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Message types the link layer itself defines. Services define their own
/// `#[repr(u16)]` enums inside the ranges of [`Service`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// Never valid on the wire (catches zeroed buffers).
    Invalid = 0x0000,
    /// `{u32 code, u16 len, len bytes of UTF-8 text}`: the peer reports a
    /// failure. Does not close the link by itself.
    Error = 0x0001,
    /// Empty payload, no reply. Sent when a side has been idle for the
    /// keepalive interval so the other side's read timeout only fires when
    /// the peer is really gone.
    Keepalive = 0x0002,
    /// Optional UTF-8 reason (at most 1 KiB): the sender is closing the link
    /// cleanly and will send nothing more.
    Goodbye = 0x0003,
}

impl MsgType {
    /// The link-layer message with this number, if any.
    pub fn from_u16(v: u16) -> Option<MsgType> {
        match v {
            0x0000 => Some(MsgType::Invalid),
            0x0001 => Some(MsgType::Error),
            0x0002 => Some(MsgType::Keepalive),
            0x0003 => Some(MsgType::Goodbye),
            _ => None,
        }
    }
}

impl From<MsgType> for u16 {
    fn from(t: MsgType) -> u16 {
        t as u16
    }
}

/// Who owns a range of message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// The link layer's own control messages, `0x0001..=0x00ff`.
    Link,
    /// Live disk migration, `0x0100..=0x01ff`.
    Migration,
    /// Memory checkpoint sync, `0x0200..=0x02ff`.
    Memsync,
    /// Primary/backup replication, `0x0300..=0x03ff`.
    Replication,
    /// Not yet assigned, `0x0400..=0xffff`: passed to the application.
    Unassigned,
}

impl Service {
    /// The message types this service owns.
    pub const fn range(self) -> RangeInclusive<u16> {
        match self {
            Service::Link => 0x0001..=0x00ff,
            Service::Migration => 0x0100..=0x01ff,
            Service::Memsync => 0x0200..=0x02ff,
            Service::Replication => 0x0300..=0x03ff,
            Service::Unassigned => 0x0400..=0xffff,
        }
    }

    /// Which service a message type belongs to; `None` for 0 (invalid).
    pub fn of(msg_type: u16) -> Option<Service> {
        match msg_type {
            0 => None,
            0x0001..=0x00ff => Some(Service::Link),
            0x0100..=0x01ff => Some(Service::Migration),
            0x0200..=0x02ff => Some(Service::Memsync),
            0x0300..=0x03ff => Some(Service::Replication),
            _ => Some(Service::Unassigned),
        }
    }
}

/// Largest text carried by an Error or Goodbye message.
pub const MAX_CONTROL_TEXT: usize = 1024;

/// Error codes carried by [`MsgType::Error`]. Services may define more
/// codes from [`error_code::SERVICE_BASE`] up.
pub mod error_code {
    /// The peer sent something that violates the protocol.
    pub const PROTOCOL: u32 = 1;
    /// The request or purpose is not supported by this side.
    pub const UNSUPPORTED: u32 = 2;
    /// This side is busy (for example a migration is already running).
    pub const BUSY: u32 = 3;
    /// This side refuses the request (policy, state).
    pub const REFUSED: u32 = 4;
    /// An internal failure on this side.
    pub const INTERNAL: u32 = 5;
    /// First code free for services.
    pub const SERVICE_BASE: u32 = 0x1_0000;
}

/// Encode an Error payload; the text is cut at [`MAX_CONTROL_TEXT`] bytes
/// (on a character boundary).
pub fn encode_error(code: u32, message: &str) -> Vec<u8> {
    let text = truncate_utf8(message, MAX_CONTROL_TEXT);
    let mut out = Vec::with_capacity(6 + text.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// An Error payload that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorPayloadError {
    /// Shorter than the code and length fields.
    #[error("error message of {len} bytes is too short")]
    TooShort {
        /// Payload bytes.
        len: usize,
    },
    /// The text length field disagrees with the payload (or is too long).
    #[error("error message text length {text_len} does not match payload of {len} bytes")]
    LengthMismatch {
        /// Text length the payload claims.
        text_len: usize,
        /// Payload bytes.
        len: usize,
    },
}

/// Decode an Error payload. The text is made safe to log (lossy UTF-8,
/// control characters replaced).
pub fn decode_error(payload: &[u8]) -> Result<(u32, String), ErrorPayloadError> {
    if payload.len() < 6 {
        return Err(ErrorPayloadError::TooShort { len: payload.len() });
    }
    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
    if len > MAX_CONTROL_TEXT || payload.len() != 6 + len {
        return Err(ErrorPayloadError::LengthMismatch {
            text_len: len,
            len: payload.len(),
        });
    }
    Ok((code, sanitize_text(&payload[6..])))
}

/// Lossy UTF-8 with control characters replaced, at most
/// [`MAX_CONTROL_TEXT`] bytes of input: for text a peer chose.
pub fn sanitize_text(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_CONTROL_TEXT)];
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hello() -> Hello {
        Hello {
            versions: VersionRange { min: 1, max: 2 },
            nonce: [7; 32],
            max_payload: DEFAULT_MAX_PAYLOAD,
            node_id: "node-a".into(),
            purpose: "migrate".into(),
            extensions: vec![],
        }
    }

    fn decode_full(bytes: &[u8]) -> Result<Hello, PeerError> {
        let prefix: &[u8; HELLO_PREFIX_LEN] = bytes[..HELLO_PREFIX_LEN].try_into().unwrap();
        let len = Hello::decode_prefix(prefix)?;
        assert_eq!(len, bytes.len() - HELLO_PREFIX_LEN);
        Hello::decode_body(&bytes[HELLO_PREFIX_LEN..])
    }

    #[test]
    fn hello_layout_is_as_documented() {
        let b = hello().encode().unwrap();
        assert_eq!(&b[..8], b"USTDYPR1");
        assert_eq!(u16::from_be_bytes([b[8], b[9]]) as usize, b.len() - 10);
        assert_eq!(&b[10..14], &[0, 1, 0, 2]);
        assert_eq!(&b[14..46], &[7; 32]);
        assert_eq!(b[50], 6);
        assert_eq!(&b[51..57], b"node-a");
        assert_eq!(b[57], 7);
        assert_eq!(&b[58..65], b"migrate");
        assert_eq!(b.len(), 65);
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let mut h = hello();
        h.node_id = "has space".into();
        assert!(h.encode().is_err());
        let mut h = hello();
        h.purpose = "Migrate".into();
        assert!(h.encode().is_err());
        let mut h = hello();
        h.node_id = "x".repeat(65);
        assert!(h.encode().is_err());
        let mut h = hello();
        h.extensions = vec![0; HELLO_MAX_BODY];
        assert!(h.encode().is_err());
    }

    #[test]
    fn hello_decode_rejects_bad_magic_and_lengths() {
        let mut b = hello().encode().unwrap();
        b[0] = b'X';
        assert!(matches!(decode_full(&b), Err(PeerError::BadMagic { .. })));

        let mut prefix = [0u8; HELLO_PREFIX_LEN];
        prefix[..8].copy_from_slice(&MAGIC);
        prefix[8..].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(
            Hello::decode_prefix(&prefix),
            Err(PeerError::MalformedHello { .. })
        ));

        // Node id length pointing past the end.
        let mut b = hello().encode().unwrap();
        b[50] = 200;
        assert!(matches!(
            Hello::decode_body(&b[10..]),
            Err(PeerError::MalformedHello { .. })
        ));
        // Version range with min > max.
        let mut b = hello().encode().unwrap();
        b[11] = 9;
        assert!(matches!(
            Hello::decode_body(&b[10..]),
            Err(PeerError::MalformedHello { .. })
        ));
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        let r = |min, max| VersionRange { min, max };
        assert_eq!(negotiate(r(1, 3), r(2, 5)).unwrap(), 3);
        assert_eq!(negotiate(r(1, 1), r(1, 1)).unwrap(), 1);
        assert_eq!(negotiate(r(4, 9), r(1, 4)).unwrap(), 4);
        let e = negotiate(r(1, 2), r(3, 4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "peer speaks protocol versions 3..4, we speak 1..2: upgrade the older side"
        );
    }

    #[test]
    fn error_payload_round_trip_and_sanitising() {
        let p = encode_error(42, "disk\ttoo small\n");
        assert_eq!(
            decode_error(&p).unwrap(),
            (42, "disk?too small?".to_string())
        );
        let long = "é".repeat(1000);
        let p = encode_error(1, &long);
        let (_, text) = decode_error(&p).unwrap();
        assert_eq!(text.len(), MAX_CONTROL_TEXT);
        assert!(decode_error(&p[..p.len() - 1]).is_err());
        assert!(decode_error(&[0, 0, 0]).is_err());
    }

    #[test]
    fn service_ranges_partition_the_space() {
        for t in [
            0x0001u16, 0x00ff, 0x0100, 0x01ff, 0x0200, 0x0300, 0x03ff, 0x0400, 0xffff,
        ] {
            let s = Service::of(t).unwrap();
            assert!(s.range().contains(&t), "{t:#x} -> {s:?}");
        }
        assert_eq!(Service::of(0), None);
        assert_eq!(Service::of(0x0150), Some(Service::Migration));
        assert_eq!(MsgType::from_u16(2), Some(MsgType::Keepalive));
        assert_eq!(MsgType::from_u16(4), None);
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            1u16..100,
            0u16..100,
            any::<[u8; 32]>(),
            any::<u32>(),
            "[!-~]{1,64}",
            "[a-z0-9._-]{1,32}",
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(
                |(min, extra, nonce, max_payload, node_id, purpose, extensions)| Hello {
                    versions: VersionRange {
                        min,
                        max: min + extra,
                    },
                    nonce,
                    max_payload,
                    node_id,
                    purpose,
                    extensions,
                },
            )
    }

    proptest! {
        #[test]
        fn hello_round_trips(h in arb_hello()) {
            let bytes = h.encode().unwrap();
            prop_assert_eq!(decode_full(&bytes).unwrap(), h);
        }

        #[test]
        fn hello_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if bytes.len() >= HELLO_PREFIX_LEN {
                let prefix: [u8; HELLO_PREFIX_LEN] = bytes[..HELLO_PREFIX_LEN].try_into().unwrap();
                let _ = Hello::decode_prefix(&prefix);
            }
            let _ = Hello::decode_body(&bytes);
        }

        #[test]
        fn header_fields_round_trip(len: u32, msg_type: u16, flags: u16, seq: u64) {
            let h = FrameHeader { len, msg_type, flags, seq };
            prop_assert_eq!(FrameHeader::decode_fields(&h.encode_fields()), h);
        }

        #[test]
        fn negotiate_is_symmetric_and_within_both(a in 1u16..20, b in 0u16..5, c in 1u16..20, d in 0u16..5) {
            let x = VersionRange { min: a, max: a + b };
            let y = VersionRange { min: c, max: c + d };
            match (negotiate(x, y), negotiate(y, x)) {
                (Ok(v), Ok(w)) => {
                    prop_assert_eq!(v, w);
                    prop_assert!((x.min..=x.max).contains(&v) && (y.min..=y.max).contains(&v));
                    // No higher common version exists.
                    prop_assert!(!((v + 1)..=x.max).any(|u| (y.min..=y.max).contains(&u)));
                }
                (Err(_), Err(_)) => {
                    prop_assert!(!(x.min..=x.max).any(|u| (y.min..=y.max).contains(&u)));
                }
                _ => prop_assert!(false, "asymmetric result"),
            }
        }
    }
}
