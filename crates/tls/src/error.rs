//! Errors of the TLS crate.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What was wrong with a certificate the peer presented, as far as our
/// verifier is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertProblem {
    /// Outside its validity period (expired, or not yet valid).
    Expired,
    /// Does not chain to our CA.
    UnknownCa,
    /// Chains to our CA but names another node.
    WrongName {
        /// The node we expected.
        expected: String,
        /// The names the certificate carries.
        presented: Vec<String>,
    },
    /// Revoked, bad signature, wrong usage, unparsable, ...
    Other(String),
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::Expired => f.write_str(
                "has expired (or is not yet valid): reissue it with `understudy certs issue` \
                 and check both hosts' clocks",
            ),
            CertProblem::UnknownCa => f.write_str(
                "is not signed by our CA: give both nodes certificates from the same \
                 `understudy certs init` directory",
            ),
            CertProblem::WrongName {
                expected,
                presented,
            } => write!(
                f,
                "names {presented:?}, not the expected node {expected:?}: dial the right \
                 node, or issue its certificate with `understudy certs issue {expected}`"
            ),
            CertProblem::Other(what) => write!(f, "is unacceptable: {what}"),
        }
    }
}

/// A failed TLS operation.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error(
        "cannot read the {what} file {path}: create it with `understudy certs init --dir DIR` \
         (CA) or `understudy certs issue --dir DIR NODE` (node), or fix the path"
    )]
    Read {
        /// "certificate", "private key" or "CA certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("{path} is not a valid PEM file: expected the output of `understudy certs issue`")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error(
        "{path} holds no certificate (no -----BEGIN CERTIFICATE----- block): run \
         `understudy certs issue --dir DIR NODE` and point at NODE.pem"
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error(
        "{path} holds no private key (no -----BEGIN PRIVATE KEY----- block): point at the \
         NODE-key.pem written by `understudy certs issue`"
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key does not belong to the certificate, or is of a kind
    /// we cannot use.
    #[error(
        "the key {key} does not match the certificate {cert} (or is of an unsupported kind): \
         use the NODE.pem and NODE-key.pem pair written together by `understudy certs issue`"
    )]
    BadKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A CA file holds a certificate rustls will not use as a trust anchor.
    #[error(
        "{path} is not a usable CA certificate: use the ca.pem written by `understudy certs init`"
    )]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client-certificate verifier from the CA")]
    Verifier {
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// A rustls configuration could not be built.
    #[error("cannot build the TLS configuration (TLS 1.3 with the ring provider)")]
    Config {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A node name is not usable as a DNS name in a certificate.
    #[error(
        "{name:?} is not a valid node name for a certificate: use letters, digits, '-' and '.' \
         (a DNS name)"
    )]
    BadName {
        /// The name.
        name: String,
    },
    /// The peer presented a certificate our verifier refused.
    #[error("the peer's certificate {problem}")]
    PeerCertificate {
        /// What was wrong with it.
        problem: CertProblem,
    },
    /// The peer refused our certificate (we received its alert).
    #[error(
        "the peer refused our certificate ({alert}): it may have expired, be from another CA, \
         or name another node than the peer expects; check with `openssl x509 -in NODE.pem \
         -noout -text` and reissue with `understudy certs issue`"
    )]
    PeerRefusedOurs {
        /// The TLS alert, e.g. `CertificateExpired`, `UnknownCA`.
        alert: String,
    },
    /// The peer presented no certificate although one is required.
    #[error("the peer presented no certificate: configure it with its node certificate and key")]
    NoPeerCertificate,
    /// Any other handshake failure (protocol error, not TLS, ...).
    #[error("TLS handshake failed (is the peer speaking TLS 1.3 with the same settings?)")]
    Handshake {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// Generating a key or signing a certificate failed.
    #[error("cannot {what}")]
    Generate {
        /// What we were making.
        what: &'static str,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// The CA already exists; `init` never overwrites it.
    #[error(
        "{path} already exists: refusing to overwrite the cluster CA (every node certificate \
         depends on it); use another --dir, or delete it deliberately to start a new CA"
    )]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A directory could not be created.
    #[error("cannot create the directory {path}: check the path and permissions")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The failed step.
        #[source]
        source: understudy_durable::ReplaceError,
    },
    /// A validity period is unusable.
    #[error("bad validity period: {reason}")]
    Validity {
        /// Why.
        reason: String,
    },
}
