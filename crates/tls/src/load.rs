//! Reading certificates, keys and CAs from PEM files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TlsError;

/// A node's certificate chain and private key.
pub struct Identity {
    /// End-entity certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Where the certificate came from, for messages.
    pub cert_path: PathBuf,
}

impl Identity {
    /// The private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The DNS names the end-entity certificate carries.
    pub fn names(&self) -> Vec<String> {
        self.chain
            .first()
            .map(crate::config::peer_names)
            .unwrap_or_default()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_path: self.cert_path.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_path", &self.cert_path)
            .field("names", &self.names())
            .field("key", &"<secret>")
            .finish()
    }
}

/// The trust anchors (the cluster CA) peers must chain to.
#[derive(Clone)]
pub struct Ca {
    /// The root store built from the file.
    pub roots: Arc<RootCertStore>,
    /// Where it came from, for messages.
    pub path: PathBuf,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("path", &self.path)
            .field("roots", &self.roots.len())
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs_in(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let pem_err = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(pem_err)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Load a node's certificate chain (`NODE.pem`) and key (`NODE-key.pem`)
/// and check that they belong together.
pub fn load_identity(cert_pem: &Path, key_pem: &Path) -> Result<Identity, TlsError> {
    let chain = certs_in("certificate", cert_pem)?;
    let key_bytes = read("private key", key_pem)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_bytes) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key_pem.to_owned(),
            });
        }
        Err(source) => {
            return Err(TlsError::Pem {
                path: key_pem.to_owned(),
                source,
            });
        }
    };
    let bad_key = |source| TlsError::BadKey {
        cert: cert_pem.to_owned(),
        key: key_pem.to_owned(),
        source,
    };
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(bad_key)?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(bad_key)?;
    Ok(Identity {
        chain,
        key,
        cert_path: cert_pem.to_owned(),
    })
}

/// Load the cluster CA certificate(s) (`ca.pem`).
pub fn load_ca(ca_pem: &Path) -> Result<Ca, TlsError> {
    let certs = certs_in("CA certificate", ca_pem)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|source| TlsError::BadCa {
            path: ca_pem.to_owned(),
            source,
        })?;
    }
    Ok(Ca {
        roots: Arc::new(roots),
        path: ca_pem.to_owned(),
    })
}
