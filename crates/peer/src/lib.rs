//! The authenticated peer link between understudy daemons.
//!
//! Live disk migration, memory checkpoint sync and (later) replication all
//! talk over this one layer. It
//!
//! * authenticates both peers with a pre-shared key before any data moves
//!   (keyed BLAKE3 challenge-response over both nonces and both hellos; no
//!   key material on the wire),
//! * negotiates a protocol version (each release speaks its own version and
//!   the previous one),
//! * frames messages with bounded sizes, a per-direction sequence number and
//!   a 16-byte keyed-BLAKE3 MAC per frame (end-to-end checksum and
//!   integrity in one).
//!
//! ```text
//!   sans-I/O core                      blocking I/O wrapper
//!   ─────────────                      ────────────────────
//!   wire      (hello, frame header,    Link ── LinkSender (Clone, many threads)
//!              message registry)         └──── LinkReceiver (one thread)
//!   handshake (Handshake → Session)    PeerListener (bind, accept + handshake)
//!   frame     (Sealer, Opener)         Stream: TCP, Unix, later TLS
//! ```
//!
//! The byte layouts, the state machine and the security argument are in
//! `docs/peer-link.md`.
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
#![warn(missing_docs)]

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
