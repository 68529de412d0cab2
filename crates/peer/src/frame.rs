//! Sans-I/O frame sealing and opening with keyed BLAKE3.
//!
//! A [`Sealer`] turns payloads into authenticated frames for one direction;
//! the matching [`Opener`] on the other side checks them. Both come out of a
//! finished [`crate::Handshake`] as part of a [`crate::Session`].
//!
//! Checks on receipt, in order:
//! 1. the 8-byte header check (keyed), so a corrupted length is caught
//!    before we wait for or allocate a payload;
//! 2. flags (none are defined), sequence number (exactly the next one),
//!    payload length (at most our limit);
//! 3. the 16-byte MAC over header and payload.
//!
//! Any failure kills the opener: later calls return [`PeerError::LinkDead`].
//!
//! Over TLS the transport already authenticates every byte (AEAD), so the
//! frame MAC is not computed: the 16 MAC bytes are sent as zeros and must
//! be zeros on receipt, keeping one frame format for both modes. The header
//! check and the sequence numbers stay (cheap, and they catch framing
//! bugs); payload checksums are the services' own (migration's xxh3 per
//! extent).

use crate::error::PeerError;
use crate::wire::{FrameHeader, HEADER_CHECK_LEN, HEADER_LEN, MAC_LEN};

/// The two keys protecting one direction of a link.
#[derive(Clone)]
pub(crate) struct DirectionKeys {
    /// Keys the 8-byte header check.
    pub(crate) header: [u8; 32],
    /// Keys the 16-byte frame MAC.
    pub(crate) frame: [u8; 32],
}

fn header_check(keys: &DirectionKeys, fields: &[u8]) -> [u8; HEADER_CHECK_LEN] {
    let h = blake3::keyed_hash(&keys.header, fields);
    let mut out = [0u8; HEADER_CHECK_LEN];
    out.copy_from_slice(&h.as_bytes()[..HEADER_CHECK_LEN]);
    out
}

fn frame_mac<'a>(
    keys: &DirectionKeys,
    header: &[u8; HEADER_LEN],
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> [u8; MAC_LEN] {
    let mut h = blake3::Hasher::new_keyed(&keys.frame);
    h.update(header);
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..MAC_LEN]);
    out
}

/// Compare without an early exit, so timing does not reveal how many
/// leading bytes of a forged tag were right.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Header and trailing MAC of a sealed frame; the payload goes between them
/// unchanged, so large payloads are never copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedFrame {
    /// The 24 header bytes.
    pub header: [u8; HEADER_LEN],
    /// The 16 MAC bytes that follow the payload.
    pub mac: [u8; MAC_LEN],
}

/// Seals outgoing frames for one direction.
pub struct Sealer {
    keys: DirectionKeys,
    next_seq: u64,
    peer_max_payload: u32,
    /// False over TLS: the MAC bytes are zeros.
    mac: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next_seq", &self.next_seq)
            .field("peer_max_payload", &self.peer_max_payload)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub(crate) fn new(keys: DirectionKeys, peer_max_payload: u32) -> Sealer {
        Sealer {
            keys,
            next_seq: 0,
            peer_max_payload,
            mac: true,
        }
    }

    /// Stop computing frame MACs: the transport (TLS) authenticates.
    pub(crate) fn transport_authenticated(&mut self) {
        self.mac = false;
    }

    /// Sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Largest payload the peer accepts (from its hello).
    pub fn peer_max_payload(&self) -> u32 {
        self.peer_max_payload
    }

    /// Pretend the peer accepts payloads of up to `max` bytes. Only for
    /// tests that need to put an oversize frame on the wire.
    #[doc(hidden)]
    pub fn override_peer_max_payload(&mut self, max: u32) {
        self.peer_max_payload = max;
    }

    /// Seal a frame whose payload is the concatenation of `parts`.
    /// Consumes a sequence number.
    pub fn seal(&mut self, msg_type: u16, parts: &[&[u8]]) -> Result<SealedFrame, PeerError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len > u64::from(self.peer_max_payload) {
            return Err(PeerError::PayloadTooLarge {
                len,
                max: self.peer_max_payload,
            });
        }
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).ok_or_else(|| PeerError::Protocol {
            reason: "sequence numbers exhausted".into(),
        })?;
        let fields = FrameHeader {
            len: len as u32,
            msg_type,
            flags: 0,
            seq,
        }
        .encode_fields();
        let mut header = [0u8; HEADER_LEN];
        header[..16].copy_from_slice(&fields);
        header[16..].copy_from_slice(&header_check(&self.keys, &fields));
        let mac = if self.mac {
            frame_mac(&self.keys, &header, parts.iter().copied())
        } else {
            [0u8; MAC_LEN]
        };
        Ok(SealedFrame { header, mac })
    }

    /// Seal a frame into one contiguous buffer (header, payload, MAC).
    pub fn seal_to_vec(&mut self, msg_type: u16, payload: &[u8]) -> Result<Vec<u8>, PeerError> {
        let sealed = self.seal(msg_type, &[payload])?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + MAC_LEN);
        out.extend_from_slice(&sealed.header);
        out.extend_from_slice(payload);
        out.extend_from_slice(&sealed.mac);
        Ok(out)
    }
}

/// Result of [`Opener::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// At least this many more bytes are needed.
    NeedMore(usize),
    /// A verified frame.
    Frame {
        /// Message type.
        msg_type: u16,
        /// Payload, borrowed from the input.
        payload: &'a [u8],
        /// Bytes of input the frame took.
        consumed: usize,
    },
}

/// Checks incoming frames for one direction.
pub struct Opener {
    keys: DirectionKeys,
    next_seq: u64,
    max_payload: u32,
    dead: bool,
    /// False over TLS: the MAC bytes must be zeros.
    mac: bool,
    /// Header accepted by [`Opener::open_header`], waiting for its payload.
    pending: Option<[u8; HEADER_LEN]>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("next_seq", &self.next_seq)
            .field("max_payload", &self.max_payload)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Opener {
    pub(crate) fn new(keys: DirectionKeys, max_payload: u32) -> Opener {
        Opener {
            keys,
            next_seq: 0,
            max_payload,
            dead: false,
            mac: true,
            pending: None,
        }
    }

    /// Stop checking frame MACs: the transport (TLS) authenticates.
    pub(crate) fn transport_authenticated(&mut self) {
        self.mac = false;
    }

    /// Sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Largest payload accepted.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Whether an earlier frame failed a check.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Check a header without changing state.
    fn check_header(&self, bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, PeerError> {
        if self.dead {
            return Err(PeerError::LinkDead);
        }
        let fields: &[u8; 16] = bytes[..16].try_into().map_err(|_| PeerError::LinkDead)?;
        if !ct_eq(&header_check(&self.keys, fields), &bytes[16..]) {
            return Err(PeerError::Integrity { seq: self.next_seq });
        }
        let h = FrameHeader::decode_fields(fields);
        if h.seq != self.next_seq {
            return Err(PeerError::Sequence {
                expected: self.next_seq,
                got: h.seq,
            });
        }
        if h.flags != 0 {
            return Err(PeerError::Protocol {
                reason: format!("unknown frame flags {:#06x}", h.flags),
            });
        }
        if h.len > self.max_payload {
            return Err(PeerError::FrameTooLarge {
                len: u64::from(h.len),
                max: self.max_payload,
            });
        }
        Ok(h)
    }

    fn fail<T>(&mut self, e: PeerError) -> Result<T, PeerError> {
        self.dead = true;
        self.pending = None;
        Err(e)
    }

    /// Verify a received header. On success its payload (`len` bytes) and
    /// MAC follow; pass them to [`Opener::open_payload`].
    pub fn open_header(&mut self, bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, PeerError> {
        if self.pending.is_some() {
            return self.fail(PeerError::Protocol {
                reason: "open_header called twice without open_payload".into(),
            });
        }
        match self.check_header(bytes) {
            Ok(h) => {
                self.pending = Some(*bytes);
                Ok(h)
            }
            Err(e) => self.fail(e),
        }
    }

    /// Verify the payload and MAC of the header accepted last. Advances the
    /// expected sequence number.
    pub fn open_payload(&mut self, payload: &[u8], mac: &[u8; MAC_LEN]) -> Result<(), PeerError> {
        if self.dead {
            return Err(PeerError::LinkDead);
        }
        let Some(header) = self.pending.take() else {
            return self.fail(PeerError::Protocol {
                reason: "open_payload called without an accepted header".into(),
            });
        };
        let fields: &[u8; 16] = header[..16].try_into().map_err(|_| PeerError::LinkDead)?;
        if FrameHeader::decode_fields(fields).len as usize != payload.len() {
            return self.fail(PeerError::Protocol {
                reason: "payload length differs from the header".into(),
            });
        }
        let ok = if self.mac {
            ct_eq(&frame_mac(&self.keys, &header, [payload]), mac)
        } else {
            *mac == [0u8; MAC_LEN]
        };
        if !ok {
            return self.fail(PeerError::Integrity { seq: self.next_seq });
        }
        self.next_seq += 1;
        Ok(())
    }

    /// Decode one frame from the front of `buf`. Returns how many more bytes
    /// are needed when `buf` holds less than a whole frame; a header that
    /// fails its checks fails at once, before the payload is awaited.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Decoded<'a>, PeerError> {
        if self.dead {
            return Err(PeerError::LinkDead);
        }
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(Decoded::NeedMore(HEADER_LEN - buf.len()));
        };
        let h = match self.check_header(header) {
            Ok(h) => h,
            Err(e) => return self.fail(e),
        };
        let total = HEADER_LEN + h.len as usize + MAC_LEN;
        if buf.len() < total {
            return Ok(Decoded::NeedMore(total - buf.len()));
        }
        let payload = &buf[HEADER_LEN..HEADER_LEN + h.len as usize];
        let mac: &[u8; MAC_LEN] = buf[total - MAC_LEN..total]
            .try_into()
            .map_err(|_| PeerError::LinkDead)?;
        self.pending = Some(*header);
        self.open_payload(payload, mac)?;
        Ok(Decoded::Frame {
            msg_type: h.msg_type,
            payload,
            consumed: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn keys(seed: u8) -> DirectionKeys {
        DirectionKeys {
            header: [seed; 32],
            frame: [seed.wrapping_add(1); 32],
        }
    }

    fn pair(max: u32) -> (Sealer, Opener) {
        (Sealer::new(keys(1), max), Opener::new(keys(1), max))
    }

    fn frame(msg_type: u16, payload: &[u8]) -> Vec<u8> {
        pair(1 << 20).0.seal_to_vec(msg_type, payload).unwrap()
    }

    #[test]
    fn round_trip_and_sequence() {
        let (mut s, mut o) = pair(1024);
        for i in 0..5u8 {
            let f = s.seal_to_vec(0x100 + u16::from(i), &[i; 10]).unwrap();
            assert_eq!(
                o.decode(&f).unwrap(),
                Decoded::Frame {
                    msg_type: 0x100 + u16::from(i),
                    payload: &[i; 10],
                    consumed: f.len()
                }
            );
        }
        assert_eq!(o.next_seq(), 5);
    }

    #[test]
    fn seal_parts_equals_seal_whole() {
        let (mut a, _) = pair(1024);
        let (mut b, _) = pair(1024);
        let whole = a.seal(0x200, &[b"hello world"]).unwrap();
        let parts = b.seal(0x200, &[b"hello", b" ", b"", b"world"]).unwrap();
        assert_eq!(whole, parts);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let f = frame(0x123, b"payload bytes");
        for bit in 0..f.len() * 8 {
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            let (_, mut o) = pair(1 << 20);
            let r = o.decode(&g);
            assert!(
                matches!(r, Err(PeerError::Integrity { seq: 0 })),
                "bit {bit}: {r:?}"
            );
            assert!(o.is_dead());
            assert!(matches!(o.decode(&f), Err(PeerError::LinkDead)));
        }
    }

    #[test]
    fn wrong_key_is_integrity_error() {
        let f = frame(0x100, b"x");
        let mut o = Opener::new(keys(9), 1 << 20);
        assert!(matches!(o.decode(&f), Err(PeerError::Integrity { .. })));
    }

    #[test]
    fn replay_reorder_and_drop_are_sequence_errors() {
        let (mut s, _) = pair(1024);
        let f0 = s.seal_to_vec(0x100, b"a").unwrap();
        let f1 = s.seal_to_vec(0x100, b"b").unwrap();
        let f2 = s.seal_to_vec(0x100, b"c").unwrap();

        let (_, mut o) = pair(1024);
        o.decode(&f0).unwrap();
        let r = o.decode(&f0);
        assert!(
            matches!(
                r,
                Err(PeerError::Sequence {
                    expected: 1,
                    got: 0
                })
            ),
            "{r:?}"
        );

        let (_, mut o) = pair(1024);
        let r = o.decode(&f1);
        assert!(
            matches!(
                r,
                Err(PeerError::Sequence {
                    expected: 0,
                    got: 1
                })
            ),
            "{r:?}"
        );

        let (_, mut o) = pair(1024);
        o.decode(&f0).unwrap();
        let r = o.decode(&f2);
        assert!(
            matches!(
                r,
                Err(PeerError::Sequence {
                    expected: 1,
                    got: 2
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn oversize_header_fails_before_payload_arrives() {
        let mut s = Sealer::new(keys(1), u32::MAX);
        let sealed = s.seal(0x100, &[&vec![0u8; 5000]]).unwrap();
        let mut o = Opener::new(keys(1), 4096);
        // Only the header: the decoder must refuse rather than ask for more.
        let r = o.decode(&sealed.header);
        assert!(
            matches!(
                r,
                Err(PeerError::FrameTooLarge {
                    len: 5000,
                    max: 4096
                })
            ),
            "{r:?}"
        );
        // The sender refuses to exceed the peer's limit.
        let mut s = Sealer::new(keys(1), 4096);
        assert!(matches!(
            s.seal(0x100, &[&[0u8; 4000], &[0u8; 97]]),
            Err(PeerError::PayloadTooLarge {
                len: 4097,
                max: 4096
            })
        ));
        assert_eq!(
            s.next_seq(),
            0,
            "a refused frame must not use a sequence number"
        );
    }

    #[test]
    fn need_more_counts_are_exact() {
        let f = frame(0x100, &[5u8; 100]);
        let (_, mut o) = pair(1 << 20);
        assert_eq!(
            o.decode(&f[..10]).unwrap(),
            Decoded::NeedMore(HEADER_LEN - 10)
        );
        assert_eq!(
            o.decode(&f[..HEADER_LEN]).unwrap(),
            Decoded::NeedMore(100 + MAC_LEN)
        );
        assert_eq!(o.decode(&f[..f.len() - 1]).unwrap(), Decoded::NeedMore(1));
        assert!(matches!(o.decode(&f).unwrap(), Decoded::Frame { .. }));
    }

    #[test]
    fn split_open_api_matches_decode() {
        let (mut s, mut o) = pair(1024);
        let sealed = s.seal(0x300, &[b"abc"]).unwrap();
        let h = o.open_header(&sealed.header).unwrap();
        assert_eq!((h.len, h.msg_type, h.seq), (3, 0x300, 0));
        assert!(matches!(
            o.open_payload(b"abd", &sealed.mac),
            Err(PeerError::Integrity { .. })
        ));

        let (mut s, mut o) = pair(1024);
        let sealed = s.seal(0x300, &[b"abc"]).unwrap();
        o.open_header(&sealed.header).unwrap();
        o.open_payload(b"abc", &sealed.mac).unwrap();
        // Payload without a header is a misuse that kills the opener.
        assert!(o.open_payload(b"abc", &sealed.mac).is_err());
        assert!(o.is_dead());
    }

    proptest! {
        #[test]
        fn codec_round_trips(frames in proptest::collection::vec(
            (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8)) {
            let (mut s, mut o) = pair(1024);
            let mut stream = Vec::new();
            for (t, p) in &frames {
                stream.extend(s.seal_to_vec(*t, p).unwrap());
            }
            let mut pos = 0;
            for (t, p) in &frames {
                match o.decode(&stream[pos..]).unwrap() {
                    Decoded::Frame { msg_type, payload, consumed } => {
                        prop_assert_eq!(msg_type, *t);
                        prop_assert_eq!(payload, &p[..]);
                        pos += consumed;
                    }
                    Decoded::NeedMore(n) => prop_assert!(false, "need {} more", n),
                }
            }
            prop_assert_eq!(pos, stream.len());
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let (_, mut o) = pair(1024);
            let mut pos = 0;
            while let Ok(Decoded::Frame { consumed, .. }) = o.decode(&bytes[pos..]) {
                pos += consumed;
            }
        }

        #[test]
        fn any_corruption_is_rejected(payload in proptest::collection::vec(any::<u8>(), 0..200),
                                      idx: prop::sample::Index, xor in 1u8..=255) {
            let mut f = frame(0x100, &payload);
            let i = idx.index(f.len());
            f[i] ^= xor;
            let (_, mut o) = pair(1 << 20);
            prop_assert!(o.decode(&f).is_err());
        }
    }
}
