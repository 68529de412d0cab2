//! The NBD protocol, without I/O: wire constants, the server handshake as a
//! state machine, request parsing and validation, and reply encoders.
//!
//! Specification: `doc/proto.md` of the NetworkBlockDevice project, plus
//! QEMU's `qemu:dirty-bitmap:NAME` metadata context (bit 0 = dirty).
//!
//! ```text
//!  client bytes ──► handshake::Handshake::feed ──► option replies
//!                          │ Event::Transmission(Negotiated)
//!                          ▼
//!  28-byte header ─► Request::parse ─► validate_request ─► ValidRequest
//!                                          │ Err(NbdErrno)        │ (server does the I/O)
//!                                          ▼                      ▼
//!                          reply::simple_reply / reply::error_chunk / offset_data_header / BlockStatusBuilder
//! ```
//!
//! Scope: fixed newstyle only (no oldstyle), compact headers only
//! (`OPT_EXTENDED_HEADERS` is answered with `REP_ERR_UNSUP`; its constants
//! exist so it can be added without reshaping the API). TLS is negotiated
//! here (`OPT_STARTTLS`, [`TlsPolicy`]) and run by the I/O layer.
//!
//! Every length or count read from the peer is checked against one of the
//! `MAX_*` limits below before it is used; nothing here allocates more than
//! [`MAX_OPTION_LEN`] bytes on behalf of a client.
#![warn(missing_docs)]

pub mod errno;
pub mod handshake;
pub mod meta;
pub mod reply;
pub mod request;
pub mod wire;

pub use errno::NbdErrno;
pub use handshake::{
    BlockSize, Event, ExportCatalog, ExportDescriptor, Handshake, HandshakeError, Listing,
    Negotiated, Progress, TlsPolicy,
};
pub use meta::{MetaContext, SelectedContext};
pub use request::{Op, Request, RequestError, TransmissionInfo, ValidRequest, validate_request};

/// Largest option payload buffered during the handshake (64 KiB). Enough
/// for any export name (4 KiB max) plus info requests, or 15+ maximal
/// metadata context queries.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Options longer than [`MAX_OPTION_LEN`] but at most this long (1 MiB)
/// are skipped without being stored and refused with `REP_ERR_TOO_BIG`;
/// longer ones close the connection.
pub const MAX_OPTION_DISCARD: u32 = 1024 * 1024;

/// Most options accepted in one handshake (256); more close the
/// connection. `nbdinfo --list` uses about three per export.
pub const MAX_OPTIONS: u32 = 256;

/// Most queries in one `LIST/SET_META_CONTEXT` (128); more get
/// `REP_ERR_TOO_BIG`.
pub const MAX_META_QUERIES: u32 = 128;

/// Most metadata contexts one `SET_META_CONTEXT` may select (64); more
/// get `REP_ERR_TOO_BIG`.
pub const MAX_SELECTED_CONTEXTS: usize = 64;

/// Largest `READ` or `WRITE` payload (32 MiB), also advertised as the
/// maximum block size. Longer reads get `EOVERFLOW`; a longer write cannot
/// be skipped safely and closes the connection.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;

/// Most descriptors in one `BLOCK_STATUS` chunk: 1 MiB worth of 8-byte
/// descriptors (131072), like QEMU. Clients ask again for the rest.
pub const MAX_BLOCK_STATUS_EXTENTS: u32 = (1024 * 1024) / 8;
