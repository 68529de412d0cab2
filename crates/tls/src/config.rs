//! rustls configurations (TLS 1.3 only, ring provider) and the name checks
//! rustls does not do for us.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, Error, ServerConfig,
    SignatureScheme,
};

use crate::error::{CertProblem, TlsError};
use crate::load::{Ca, Identity};

/// The server name a client sends when it accepts any node certificate
/// from the CA ([`client_config_any_node`]); it is never checked.
pub const PLACEHOLDER_SERVER_NAME: &str = "any-node.understudy.invalid";

/// ring, with AES-128-GCM preferred: with AES-NI it is the cheapest
/// suite per byte, and 128-bit keys are ample for a session's lifetime.
/// AES-256-GCM and ChaCha20-Poly1305 stay available for peers that prefer
/// them (QEMU's GnuTLS, for one).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A TLS 1.3 server configuration presenting `identity`. With `client_ca`,
/// clients must present a certificate chaining to it (check its name with
/// [`check_peer_name`] after the handshake); without, no client
/// certificate is asked for. Session tickets and resumption are off: every
/// connection does a full handshake with certificates, and no
/// post-handshake messages are sent.
pub fn server_config(
    identity: &Identity,
    client_ca: Option<&Ca>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider())
                    .build()
                    .map_err(|source| TlsError::Verifier { source })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(identity.chain.clone(), identity.key())
        .map_err(|source| TlsError::Config { source })?;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 client configuration trusting `ca`, presenting
/// `client_identity` when the server asks. The server's certificate must
/// name the [`ServerName`] given to the connection.
pub fn client_config(
    ca: &Ca,
    client_identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider())
        .build()
        .map_err(|source| TlsError::Verifier { source })?;
    client_with_verifier(verifier, client_identity)
}

/// Like [`client_config`], but any server certificate that chains to `ca`
/// is accepted whatever node it names (connect with
/// [`PLACEHOLDER_SERVER_NAME`]). The caller MUST then check the
/// authenticated name itself ([`peer_names`], [`check_peer_name`]).
pub fn client_config_any_node(
    ca: &Ca,
    client_identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider())
        .build()
        .map_err(|source| TlsError::Verifier { source })?;
    client_with_verifier(Arc::new(AnyNodeVerifier { inner }), client_identity)
}

fn client_with_verifier(
    verifier: Arc<dyn ServerCertVerifier>,
    client_identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client_identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key())
            .map_err(|source| TlsError::Config { source })?,
        None => builder.with_no_client_auth(),
    };
    cfg.resumption = Resumption::disabled();
    // Node names are not secret, but there is no reason to send them.
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// Checks the chain, validity and usage like rustls's WebPKI verifier, but
/// not the name: webpki checks the name last, so a name error means
/// everything else passed.
#[derive(Debug)]
struct AnyNodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The DNS names (subject alternative names) a certificate carries;
/// empty when it cannot be parsed or has none.
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) => Some(s.to_string()),
            _ => None,
        })
        .collect()
}

/// Check that a verified peer chain (end-entity first, as
/// `Connection::peer_certificates` returns it) names `expected`. Exact,
/// case-insensitive match on a DNS SAN; wildcards are not honoured (node
/// certificates name one node).
pub fn check_peer_name(chain: &[CertificateDer<'_>], expected: &str) -> Result<(), TlsError> {
    let Some(ee) = chain.first() else {
        return Err(TlsError::NoPeerCertificate);
    };
    let presented = peer_names(ee);
    if presented.iter().any(|n| n.eq_ignore_ascii_case(expected)) {
        return Ok(());
    }
    Err(TlsError::PeerCertificate {
        problem: CertProblem::WrongName {
            expected: expected.to_string(),
            presented,
        },
    })
}

/// Turn a rustls handshake error into a [`TlsError`] that says which
/// certificate was wrong and how. `expected` is the node we expected, for
/// the wrong-name message.
pub fn classify(err: Error, expected: Option<&str>) -> TlsError {
    let expected = expected.unwrap_or("?").to_string();
    let problem = match err {
        Error::InvalidCertificate(ref ce) => match ce {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => CertProblem::Expired,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                CertProblem::UnknownCa
            }
            CertificateError::NotValidForName => CertProblem::WrongName {
                expected,
                presented: Vec::new(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => CertProblem::WrongName {
                expected,
                presented: presented.iter().map(|p| bare_name(p)).collect(),
            },
            other => CertProblem::Other(format!("{other:?}")),
        },
        Error::AlertReceived(alert) if is_certificate_alert(alert) => {
            return TlsError::PeerRefusedOurs {
                alert: format!("{alert:?}"),
            };
        }
        Error::NoCertificatesPresented => return TlsError::NoPeerCertificate,
        source => return TlsError::Handshake { source },
    };
    TlsError::PeerCertificate { problem }
}

/// rustls describes presented names as `DnsName("node-b")`: keep the name.
fn bare_name(presented: &str) -> String {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|s| s.strip_suffix("\")"))
        .unwrap_or(presented)
        .to_string()
}

fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            // What rustls sends for a certificate whose signature does not
            // verify (another CA with the same name).
            | AlertDescription::DecryptError
    )
}
