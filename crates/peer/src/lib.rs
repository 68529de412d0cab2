//! The authenticated peer link between understudy daemons.
//!
//! Live disk migration, memory checkpoint sync and (later) replication all
//! talk over this one layer. It
//!
//! * authenticates both peers before any data moves, either
//!   - with TLS 1.3 and mutual certificates ([`PeerAuth::Tls`]): encrypted;
//!     each certificate chains to the cluster CA and names its node id, or
//!   - with a pre-shared key ([`PeerAuth::Psk`]): keyed BLAKE3
//!     challenge-response over both nonces and both hellos, no key material
//!     on the wire; authenticated, NOT encrypted,
//! * negotiates a protocol version (each release speaks its own version and
//!   the previous one),
//! * frames messages with bounded sizes, a per-direction sequence number and
//!   a 16-byte keyed-BLAKE3 MAC per frame (end-to-end checksum and
//!   integrity in one; over TLS the AEAD does that and the MAC is skipped).
//!
//! ```text
//!   sans-I/O core                      blocking I/O wrapper
//!   ─────────────                      ────────────────────
//!   wire      (hello, frame header,    Link ── LinkSender (Clone, many threads)
//!              message registry)         └──── LinkReceiver (one thread)
//!   handshake (Handshake → Session)    PeerListener (bind, accept + handshake)
//!   frame     (Sealer, Opener)         Stream: TCP, Unix, TLS (TlsStream)
//! ```
//!
//! The byte layouts, the state machine and the security argument are in
//! `docs/peer-link.md`; the trust model and certificates in
//! `docs/security.md`.
//!
//! ```no_run
//! # fn main() -> Result<(), understudy_peer::PeerError> {
//! use understudy_peer::{Link, PeerConfig, PeerKey, PeerListener};
//! let key = PeerKey::load("/etc/understudy/peer.key".as_ref())?;
//! let cfg = PeerConfig::new(key)?;
//! // Target side:
//! let listener = PeerListener::bind("0.0.0.0:7410", &cfg)?;
//! // Source side:
//! let link = Link::connect("target:7410", &cfg, "migrate")?;
//! link.send(0x0101, b"hello")?;
//! # Ok(()) }
//! ```
//!
//! Over TLS, from the files `understudy certs issue` writes:
//!
//! ```no_run
//! # fn main() -> Result<(), understudy_peer::PeerError> {
//! use understudy_peer::{Link, PeerConfig};
//! let cfg = PeerConfig::from_tls_files(
//!     "pki/host-a.pem".as_ref(),
//!     "pki/host-a-key.pem".as_ref(),
//!     "pki/ca.pem".as_ref(),
//! )?;
//! let link = Link::connect_to_node("host-b:7410", "host-b", &cfg, "migrate")?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod codec;
mod config;
mod error;
pub mod frame;
pub mod handshake;
mod key;
mod link;
mod listener;
mod stream;
mod tls;
pub mod wire;

pub use config::{PeerAuth, PeerConfig};
pub use error::PeerError;
pub use frame::{Decoded, Opener, SealedFrame, Sealer};
pub use handshake::{
    Handshake, HandshakeParams, PeerHello, Role, Session, handshake_in_memory, random_nonce,
};
pub use key::{KeyProblem, MAX_KEY_LEN, MIN_KEY_LEN, PeerKey, generate_key_file};
pub use link::{Frame, Link, LinkReceiver, LinkSender, RESPONDER_PURPOSE};
pub use listener::{Acceptor, DEFAULT_MAX_HANDSHAKES, PeerListener};
pub use stream::Stream;
pub use tls::TlsPeer;
pub use understudy_tls;
pub use wire::{MsgType, Service, VersionRange, error_code};

/// Result type of the peer link.
pub type Result<T, E = PeerError> = std::result::Result<T, E>;
