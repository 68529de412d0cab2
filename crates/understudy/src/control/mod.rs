//! The control API of a running server: a Unix socket speaking JSON lines.
//!
//! The server side is generic over a [`Handler`], so later subsystems
//! (migration, replication) add methods without touching the transport.

pub mod client;
pub mod proto;
pub mod server;
