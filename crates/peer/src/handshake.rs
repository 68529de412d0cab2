//! Sans-I/O handshake: hello exchange, version negotiation, mutual
//! pre-shared-key authentication bound to the transcript, and the session
//! key schedule.
//!
//! Both sides run the same machine; only the [`Role`] differs (it fixes the
//! transcript order and which proof and keys are whose):
//!
//! ```text
//!   new() ── queue our hello ──▶ HelloPrefix ─(10 bytes)─▶ HelloBody(L)
//!       ─(L bytes: parse, negotiate, queue our proof)─▶ Proof
//!       ─(32 bytes: verify, check node id)─▶ Done
//!   any failure ─▶ Failed (every later call: HandshakeOver)
//! ```
//!
//! The caller moves bytes: it sends [`Handshake::pending_output`], and reads
//! exactly [`Handshake::wants`] bytes to pass to [`Handshake::feed`]. The
//! machine never consumes bytes past its last message, so frames the peer
//! sends right after its proof stay in the caller's buffer.

use std::fmt;

use crate::error::PeerError;
use crate::frame::{DirectionKeys, Opener, Sealer};
use crate::key::PeerKey;
use crate::wire::{
    self, HELLO_MAX_BODY, HELLO_PREFIX_LEN, Hello, MAX_MAX_PAYLOAD, MIN_MAX_PAYLOAD, NONCE_LEN,
    PROOF_LEN, VersionRange,
};

// BLAKE3 key-derivation contexts: fixed, unique to this protocol version.
const CTX_TRANSCRIPT: &str = "understudy-peer v1 2026-11-22 transcript";
const CTX_PROOF_INITIATOR: &str = "understudy-peer v1 2026-11-22 initiator proof";
const CTX_PROOF_RESPONDER: &str = "understudy-peer v1 2026-11-22 responder proof";
const CTX_I2R_HEADER: &str = "understudy-peer v1 2026-11-22 initiator-to-responder header";
const CTX_I2R_FRAME: &str = "understudy-peer v1 2026-11-22 initiator-to-responder frame";
const CTX_R2I_HEADER: &str = "understudy-peer v1 2026-11-22 responder-to-initiator header";
const CTX_R2I_FRAME: &str = "understudy-peer v1 2026-11-22 responder-to-initiator frame";

/// Which end of the connection this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection.
    Initiator,
    /// Accepted the connection.
    Responder,
}

/// What this side announces in its hello.
#[derive(Clone, Debug)]
pub struct HandshakeParams {
    /// Our end of the connection.
    pub role: Role,
    /// Our node id (1..=64 printable ASCII bytes).
    pub node_id: String,
    /// The service the connection is for (`[a-z0-9._-]`, 1..=32 bytes).
    pub purpose: String,
    /// Largest frame payload we accept.
    pub max_payload: u32,
    /// Protocol versions we announce. Always [`VersionRange::SUPPORTED`]
    /// outside this crate's own tests.
    pub(crate) versions: VersionRange,
}

impl HandshakeParams {
    /// Parameters announcing every protocol version this build speaks.
    pub fn new(role: Role, node_id: &str, purpose: &str, max_payload: u32) -> HandshakeParams {
        HandshakeParams {
            role,
            node_id: node_id.to_string(),
            purpose: purpose.to_string(),
            max_payload,
            versions: VersionRange::SUPPORTED,
        }
    }
}

/// What the peer announced, after a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHello {
    /// The peer's node id.
    pub node_id: String,
    /// The service the peer asked for (or, seen from the initiator, the
    /// responder's own purpose string).
    pub purpose: String,
    /// The negotiated protocol version.
    pub version: u16,
    /// The versions the peer speaks.
    pub versions: VersionRange,
    /// Largest frame payload the peer accepts.
    pub max_payload: u32,
}

/// A finished handshake: the peer's identity and the two frame directions.
#[derive(Debug)]
pub struct Session {
    /// The peer's hello and the negotiated version.
    pub peer: PeerHello,
    /// Seals frames we send.
    pub sealer: Sealer,
    /// Opens frames we receive.
    pub opener: Opener,
}

enum State {
    HelloPrefix,
    HelloBody(usize),
    Proof(Box<Pending>),
    Done(Box<Session>),
    Failed,
}

/// Everything derived once the peer's hello is in, kept until its proof
/// verifies.
struct Pending {
    expected_proof: blake3::Hash,
    peer: PeerHello,
    send: DirectionKeys,
    recv: DirectionKeys,
}

/// The handshake state machine for one connection.
pub struct Handshake {
    params: HandshakeParams,
    psk: [u8; 32],
    our_hello: Vec<u8>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    state: State,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::HelloPrefix => "hello-prefix",
            State::HelloBody(_) => "hello-body",
            State::Proof(_) => "proof",
            State::Done(_) => "done",
            State::Failed => "failed",
        };
        f.debug_struct("Handshake")
            .field("role", &self.params.role)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Start a handshake. `nonce` must be fresh random bytes for every
    /// connection ([`random_nonce`]); our hello is queued as output at once.
    pub fn new(
        params: HandshakeParams,
        key: &PeerKey,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Handshake, PeerError> {
        if !(MIN_MAX_PAYLOAD..=MAX_MAX_PAYLOAD).contains(&params.max_payload) {
            return Err(PeerError::Config {
                reason: format!(
                    "max_payload {} outside {MIN_MAX_PAYLOAD}..={MAX_MAX_PAYLOAD}",
                    params.max_payload
                ),
            });
        }
        if !params.versions.is_valid() {
            return Err(PeerError::Config {
                reason: format!("invalid version range {}", params.versions),
            });
        }
        let hello = Hello {
            versions: params.versions,
            nonce,
            max_payload: params.max_payload,
            node_id: params.node_id.clone(),
            purpose: params.purpose.clone(),
            extensions: Vec::new(),
        };
        let our_hello = hello.encode()?;
        Ok(Handshake {
            params,
            psk: *key.derived(),
            out: our_hello.clone(),
            our_hello,
            inbuf: Vec::with_capacity(HELLO_PREFIX_LEN + HELLO_MAX_BODY),
            state: State::HelloPrefix,
        })
    }

    /// Bytes waiting to be sent.
    pub fn pending_output(&self) -> &[u8] {
        &self.out
    }

    /// Mark the first `n` pending bytes as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Take every pending byte.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// How many more bytes the next step needs (0 when done or failed).
    pub fn wants(&self) -> usize {
        let step = match self.state {
            State::HelloPrefix => HELLO_PREFIX_LEN,
            State::HelloBody(len) => len,
            State::Proof(_) => PROOF_LEN,
            State::Done(_) | State::Failed => return 0,
        };
        step - self.inbuf.len()
    }

    /// Whether the handshake succeeded (take the result with
    /// [`Handshake::into_session`] once the output is sent).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// The peer's hello, once the proofs verified.
    pub fn peer(&self) -> Option<&PeerHello> {
        match &self.state {
            State::Done(s) => Some(&s.peer),
            _ => None,
        }
    }

    /// Consume received bytes. Returns how many were used; bytes past the
    /// end of the handshake are left to the caller. After an error the
    /// machine is dead.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<usize, PeerError> {
        let start = data.len();
        if matches!(self.state, State::Failed | State::Done(_)) {
            return Err(PeerError::HandshakeOver);
        }
        while !data.is_empty() && !matches!(self.state, State::Done(_)) {
            let take = self.wants().min(data.len());
            self.inbuf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.wants() == 0
                && let Err(e) = self.step()
            {
                self.state = State::Failed;
                self.inbuf.clear();
                self.out.clear();
                return Err(e);
            }
        }
        Ok(start - data.len())
    }

    /// The finished session.
    pub fn into_session(self) -> Result<Session, PeerError> {
        match self.state {
            State::Done(s) => Ok(*s),
            _ => Err(PeerError::HandshakeOver),
        }
    }

    /// Process the complete message in `inbuf`.
    fn step(&mut self) -> Result<(), PeerError> {
        let input = std::mem::take(&mut self.inbuf);
        match std::mem::replace(&mut self.state, State::Failed) {
            State::HelloPrefix => {
                let prefix: &[u8; HELLO_PREFIX_LEN] = input
                    .as_slice()
                    .try_into()
                    .map_err(|_| PeerError::HandshakeOver)?;
                let len = Hello::decode_prefix(prefix)?;
                // Keep the prefix: the transcript covers the whole hello.
                self.inbuf = input;
                self.state = State::HelloBody(len + HELLO_PREFIX_LEN);
            }
            State::HelloBody(_) => {
                let pending = self.on_peer_hello(&input)?;
                self.state = State::Proof(Box::new(pending));
            }
            State::Proof(pending) => {
                let got: [u8; PROOF_LEN] = input
                    .as_slice()
                    .try_into()
                    .map_err(|_| PeerError::HandshakeOver)?;
                // blake3::Hash compares in constant time.
                if blake3::Hash::from_bytes(got) != pending.expected_proof {
                    return Err(PeerError::Authentication);
                }
                // Checked only now that the claim is authenticated: a peer
                // that proves our key yet has our node id is either a
                // misconfigured twin or our own connection reflected back.
                if pending.peer.node_id == self.params.node_id {
                    return Err(PeerError::SelfConnection {
                        node_id: pending.peer.node_id,
                    });
                }
                let Pending {
                    peer, send, recv, ..
                } = *pending;
                let session = Session {
                    sealer: Sealer::new(send, peer.max_payload),
                    opener: Opener::new(recv, self.params.max_payload),
                    peer,
                };
                self.state = State::Done(Box::new(session));
            }
            State::Done(_) | State::Failed => return Err(PeerError::HandshakeOver),
        }
        Ok(())
    }

    fn on_peer_hello(&mut self, peer_bytes: &[u8]) -> Result<Pending, PeerError> {
        let hello = Hello::decode_body(&peer_bytes[HELLO_PREFIX_LEN..])?;
        let version = wire::negotiate(self.params.versions, hello.versions)?;
        if hello.max_payload < MIN_MAX_PAYLOAD {
            return Err(PeerError::MalformedHello {
                reason: format!(
                    "max payload {} below the minimum {MIN_MAX_PAYLOAD}",
                    hello.max_payload
                ),
            });
        }
        let (first, second) = match self.params.role {
            Role::Initiator => (self.our_hello.as_slice(), peer_bytes),
            Role::Responder => (peer_bytes, self.our_hello.as_slice()),
        };
        let keys = KeySchedule::derive(&self.psk, first, second, version);
        let (our_proof, their_proof, send, recv) = match self.params.role {
            Role::Initiator => (keys.proof_i, keys.proof_r, keys.i2r, keys.r2i),
            Role::Responder => (keys.proof_r, keys.proof_i, keys.r2i, keys.i2r),
        };
        self.out.extend_from_slice(&our_proof);
        Ok(Pending {
            expected_proof: blake3::Hash::from_bytes(their_proof),
            peer: PeerHello {
                node_id: hello.node_id,
                purpose: hello.purpose,
                version,
                versions: hello.versions,
                max_payload: hello.max_payload.min(MAX_MAX_PAYLOAD),
            },
            send,
            recv,
        })
    }
}

struct KeySchedule {
    proof_i: [u8; 32],
    proof_r: [u8; 32],
    i2r: DirectionKeys,
    r2i: DirectionKeys,
}

impl KeySchedule {
    /// transcript = H(initiator hello || responder hello || version);
    /// secret = keyed_H(psk, transcript); every proof and key is a separate
    /// derivation from the secret.
    fn derive(psk: &[u8; 32], first: &[u8], second: &[u8], version: u16) -> KeySchedule {
        let mut t = blake3::Hasher::new_derive_key(CTX_TRANSCRIPT);
        // Each hello starts with its own length, so the concatenation is
        // unambiguous.
        t.update(first);
        t.update(second);
        t.update(&version.to_be_bytes());
        let transcript = t.finalize();
        let secret = blake3::keyed_hash(psk, transcript.as_bytes());
        let d = |ctx| blake3::derive_key(ctx, secret.as_bytes());
        KeySchedule {
            proof_i: d(CTX_PROOF_INITIATOR),
            proof_r: d(CTX_PROOF_RESPONDER),
            i2r: DirectionKeys {
                header: d(CTX_I2R_HEADER),
                frame: d(CTX_I2R_FRAME),
            },
            r2i: DirectionKeys {
                header: d(CTX_R2I_HEADER),
                frame: d(CTX_R2I_FRAME),
            },
        }
    }
}

/// Fresh random nonce from the operating system.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], PeerError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| PeerError::Random {
        source: std::io::Error::other(e),
    })?;
    Ok(n)
}

/// Run two handshakes against each other in memory. For tests of code that
/// sits on top of a session, and for the fuzz targets.
pub fn handshake_in_memory(
    initiator: HandshakeParams,
    responder: HandshakeParams,
    key_i: &PeerKey,
    key_r: &PeerKey,
    nonces: ([u8; NONCE_LEN], [u8; NONCE_LEN]),
) -> Result<(Session, Session), (Option<PeerError>, Option<PeerError>)> {
    let mut a = Handshake::new(initiator, key_i, nonces.0).map_err(|e| (Some(e), None))?;
    let mut b = Handshake::new(responder, key_r, nonces.1).map_err(|e| (None, Some(e)))?;
    let (mut err_a, mut err_b) = (None, None);
    // Each round moves everything pending both ways; three rounds cover
    // hello and proof.
    for _ in 0..3 {
        let to_b = a.take_output();
        let to_a = b.take_output();
        if err_b.is_none() && !to_b.is_empty() {
            err_b = b.feed(&to_b).err();
        }
        if err_a.is_none() && !to_a.is_empty() {
            err_a = a.feed(&to_a).err();
        }
    }
    if err_a.is_some() || err_b.is_some() {
        return Err((err_a, err_b));
    }
    match (a.into_session(), b.into_session()) {
        (Ok(x), Ok(y)) => Ok((x, y)),
        (x, y) => Err((x.err(), y.err())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::Decoded;

    fn key(seed: u8) -> PeerKey {
        let bytes: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(seed))
            .collect();
        PeerKey::from_bytes(&bytes).unwrap()
    }

    fn params(role: Role, node: &str) -> HandshakeParams {
        HandshakeParams::new(role, node, "migrate", 1 << 20)
    }

    fn run(
        a: HandshakeParams,
        b: HandshakeParams,
        ka: &PeerKey,
        kb: &PeerKey,
    ) -> Result<(Session, Session), (Option<PeerError>, Option<PeerError>)> {
        handshake_in_memory(a, b, ka, kb, ([1; 32], [2; 32]))
    }

    #[test]
    fn success_gives_matching_sessions_in_both_directions() {
        let (mut i, mut r) = run(
            params(Role::Initiator, "a"),
            HandshakeParams::new(Role::Responder, "b", "listener", 4096),
            &key(0),
            &key(0),
        )
        .unwrap();
        assert_eq!(i.peer.node_id, "b");
        assert_eq!(i.peer.purpose, "listener");
        assert_eq!(i.peer.max_payload, 4096);
        assert_eq!(r.peer.node_id, "a");
        assert_eq!(r.peer.purpose, "migrate");
        assert_eq!(r.peer.version, 1);
        assert_eq!(i.sealer.peer_max_payload(), 4096);

        let f = i.sealer.seal_to_vec(0x100, b"to responder").unwrap();
        assert!(matches!(
            r.opener.decode(&f).unwrap(),
            Decoded::Frame {
                payload: b"to responder",
                ..
            }
        ));
        let g = r.sealer.seal_to_vec(0x100, b"to initiator").unwrap();
        assert!(matches!(
            i.opener.decode(&g).unwrap(),
            Decoded::Frame {
                payload: b"to initiator",
                ..
            }
        ));
    }

    #[test]
    fn reflected_frame_does_not_open() {
        let (mut i, _) = run(
            params(Role::Initiator, "a"),
            params(Role::Responder, "b"),
            &key(0),
            &key(0),
        )
        .unwrap();
        // A frame sent by the initiator, bounced back to it.
        let f = i.sealer.seal_to_vec(0x100, b"x").unwrap();
        assert!(matches!(
            i.opener.decode(&f),
            Err(PeerError::Integrity { .. })
        ));
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (ea, eb) = run(
            params(Role::Initiator, "a"),
            params(Role::Responder, "b"),
            &key(0),
            &key(1),
        )
        .unwrap_err();
        assert!(matches!(ea, Some(PeerError::Authentication)), "{ea:?}");
        assert!(matches!(eb, Some(PeerError::Authentication)), "{eb:?}");
    }

    #[test]
    fn version_mismatch_fails_on_both_sides_naming_both_ranges() {
        let mut newer = params(Role::Responder, "b");
        newer.versions = VersionRange { min: 3, max: 4 };
        let (ea, eb) = run(params(Role::Initiator, "a"), newer, &key(0), &key(0)).unwrap_err();
        assert_eq!(
            ea.unwrap().to_string(),
            "peer speaks protocol versions 3..4, we speak 1..1: upgrade the older side"
        );
        assert_eq!(
            eb.unwrap().to_string(),
            "peer speaks protocol versions 1..1, we speak 3..4: upgrade the older side"
        );
    }

    #[test]
    fn negotiates_highest_common_version() {
        let mut a = params(Role::Initiator, "a");
        a.versions = VersionRange { min: 1, max: 3 };
        let mut b = params(Role::Responder, "b");
        b.versions = VersionRange { min: 2, max: 5 };
        let (i, r) = run(a, b, &key(0), &key(0)).unwrap();
        assert_eq!((i.peer.version, r.peer.version), (3, 3));
    }

    #[test]
    fn same_node_id_is_refused_after_authentication() {
        let (ea, eb) = run(
            params(Role::Initiator, "same"),
            params(Role::Responder, "same"),
            &key(0),
            &key(0),
        )
        .unwrap_err();
        assert!(
            matches!(ea, Some(PeerError::SelfConnection { .. })),
            "{ea:?}"
        );
        assert!(
            matches!(eb, Some(PeerError::SelfConnection { .. })),
            "{eb:?}"
        );
        // With the wrong key, authentication is what fails.
        let (ea, _) = run(
            params(Role::Initiator, "same"),
            params(Role::Responder, "same"),
            &key(0),
            &key(1),
        )
        .unwrap_err();
        assert!(matches!(ea, Some(PeerError::Authentication)), "{ea:?}");
    }

    #[test]
    fn two_initiators_do_not_authenticate() {
        let (ea, eb) = run(
            params(Role::Initiator, "a"),
            params(Role::Initiator, "b"),
            &key(0),
            &key(0),
        )
        .unwrap_err();
        assert!(matches!(ea, Some(PeerError::Authentication)));
        assert!(matches!(eb, Some(PeerError::Authentication)));
    }

    #[test]
    fn tampered_hello_breaks_authentication() {
        // A man in the middle that rewrites the initiator's purpose (same
        // length) must make both proofs fail.
        let mut a = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
        let mut b = Handshake::new(params(Role::Responder, "b"), &key(0), [2; 32]).unwrap();
        let mut hello_a = a.take_output();
        let pos = hello_a.windows(7).position(|w| w == b"migrate").unwrap();
        hello_a[pos..pos + 7].copy_from_slice(b"memsync");
        let hello_b = b.take_output();
        b.feed(&hello_a).unwrap();
        a.feed(&hello_b).unwrap();
        let (pa, pb) = (a.take_output(), b.take_output());
        assert!(matches!(b.feed(&pa), Err(PeerError::Authentication)));
        assert!(matches!(a.feed(&pb), Err(PeerError::Authentication)));
    }

    #[test]
    fn replayed_proof_from_another_session_fails() {
        // Record a full initiator transcript, then replay it against a
        // responder with a fresh nonce.
        let mut a = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
        let mut b = Handshake::new(params(Role::Responder, "b"), &key(0), [2; 32]).unwrap();
        let hello_a = a.take_output();
        let hello_b = b.take_output();
        b.feed(&hello_a).unwrap();
        a.feed(&hello_b).unwrap();
        let proof_a = a.take_output();
        let mut b2 = Handshake::new(params(Role::Responder, "b"), &key(0), [3; 32]).unwrap();
        b2.feed(&hello_a).unwrap();
        assert!(matches!(b2.feed(&proof_a), Err(PeerError::Authentication)));
    }

    #[test]
    fn feed_stops_at_the_end_of_the_handshake() {
        let mut a = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
        let mut b = Handshake::new(params(Role::Responder, "b"), &key(0), [2; 32]).unwrap();
        let hello_a = a.take_output();
        b.feed(&hello_a).unwrap();
        let mut from_b = b.take_output(); // hello + proof
        assert_eq!(a.feed(&hello_a[..0]).unwrap(), 0);
        from_b.extend_from_slice(b"trailing frame bytes");
        let used = a.feed(&from_b).unwrap();
        assert_eq!(used, from_b.len() - 20);
        assert!(a.is_done());
        assert!(matches!(a.feed(b"x"), Err(PeerError::HandshakeOver)));
    }

    #[test]
    fn byte_at_a_time_feeding_works() {
        let mut a = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
        let mut b = Handshake::new(params(Role::Responder, "b"), &key(0), [2; 32]).unwrap();
        let hello_a = a.take_output();
        for byte in &hello_a {
            assert_eq!(b.feed(std::slice::from_ref(byte)).unwrap(), 1);
        }
        let from_b = b.take_output();
        for byte in &from_b {
            a.feed(std::slice::from_ref(byte)).unwrap();
        }
        assert!(a.is_done());
        b.feed(&a.take_output()).unwrap();
        assert!(b.is_done());
    }

    #[test]
    fn garbage_is_refused() {
        let mut a = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
        let r = a.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert!(
            matches!(r, Err(PeerError::BadMagic { got }) if &got == b"HTTP/1.1"),
            "{r:?}"
        );
        assert_eq!(a.wants(), 0);
        assert!(matches!(a.feed(b"USTDYPR1"), Err(PeerError::HandshakeOver)));
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(matches!(
            Handshake::new(
                HandshakeParams::new(Role::Initiator, "a", "migrate", 10),
                &key(0),
                [0; 32]
            ),
            Err(PeerError::Config { .. })
        ));
        assert!(matches!(
            Handshake::new(
                HandshakeParams::new(Role::Initiator, "", "migrate", 1 << 20),
                &key(0),
                [0; 32]
            ),
            Err(PeerError::Config { .. })
        ));
        assert!(matches!(
            Handshake::new(
                HandshakeParams::new(Role::Initiator, "a", "MIGRATE", 1 << 20),
                &key(0),
                [0; 32]
            ),
            Err(PeerError::Config { .. })
        ));
    }

    proptest! {
        #[test]
        fn feeding_arbitrary_bytes_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8),
            valid_prefix: bool,
        ) {
            let mut h = Handshake::new(params(Role::Responder, "b"), &key(0), [2; 32]).unwrap();
            if valid_prefix {
                let mut peer = Handshake::new(params(Role::Initiator, "a"), &key(0), [1; 32]).unwrap();
                let hello = peer.take_output();
                let _ = h.feed(&hello[..hello.len() / 2]);
            }
            for c in &chunks {
                match h.feed(c) {
                    Ok(n) => prop_assert!(n <= c.len()),
                    Err(_) => prop_assert_eq!(h.wants(), 0),
                }
            }
        }
    }
}
