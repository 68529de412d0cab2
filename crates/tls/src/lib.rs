//! Certificates and TLS 1.3 configurations for understudy's links.
//!
//! * [`certs`]: a small cluster CA (`ca.pem`, `ca-key.pem`) and node
//!   certificates (`NODE.pem`, `NODE-key.pem`) that name a node by a DNS
//!   subject alternative name and are good for both server and client
//!   authentication (peer links are symmetric), plus the file layout QEMU's
//!   `tls-creds-x509` expects.
//! * [`load_identity`], [`load_ca`]: read them back, with errors that say
//!   what to do.
//! * [`server_config`], [`client_config`]: rustls configurations, TLS 1.3
//!   only, ring provider, no session tickets or resumption. The client
//!   checks the server's name (or, with [`client_config_any_node`], only
//!   the chain, leaving the name to the caller); the server
//!   checks the client's chain, and [`check_peer_name`] checks its name
//!   after the handshake (rustls's client verifier checks chains only).
//! * [`classify`]: turns a rustls handshake error into a [`TlsError`] that
//!   says which certificate was wrong and how (expired, unknown CA, wrong
//!   name, or "the peer refused ours").
#![warn(missing_docs)]

pub mod certs;
mod config;
mod error;
mod load;

pub use config::{
    PLACEHOLDER_SERVER_NAME, check_peer_name, classify, client_config, client_config_any_node,
    peer_names, server_config,
};
pub use error::{CertProblem, TlsError};
pub use load::{Ca, Identity, load_ca, load_identity};

/// Re-exported so users name the same rustls version as this crate.
pub use rustls;
