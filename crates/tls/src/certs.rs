//! A small cluster CA and node certificates (rcgen).
//!
//! ```text
//!   DIR/ca.pem          the CA certificate: give it to every node
//!   DIR/ca-key.pem      the CA key (0600): keep it off the nodes if you can
//!   DIR/NODE.pem        NODE's certificate: DNS SAN = NODE,
//!                       EKU serverAuth + clientAuth (peer links are symmetric)
//!   DIR/NODE-key.pem    NODE's key (0600)
//! ```
//!
//! Keys are ECDSA P-256. Files are replaced atomically; key files are
//! created 0600 before any key byte is written.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use understudy_durable::{Durability, Step};

use crate::error::TlsError;

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca-key.pem";
/// Default validity of a node certificate: one year.
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// Default validity of the CA: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;

const DAY: Duration = Duration::from_secs(86_400);

/// `DIR/NODE.pem`.
pub fn cert_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.pem"))
}

/// `DIR/NODE-key.pem`.
pub fn key_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}-key.pem"))
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this.
    pub not_before: SystemTime,
    /// Not valid after this.
    pub not_after: SystemTime,
}

impl Validity {
    /// From one hour ago (tolerates small clock differences between hosts)
    /// for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + DAY * days,
        }
    }

    fn check(&self) -> Result<(), TlsError> {
        if self.not_after <= self.not_before {
            return Err(TlsError::Validity {
                reason: "it ends before it starts: give a positive number of days".into(),
            });
        }
        Ok(())
    }
}

/// Where QEMU's `tls-creds-x509` (`dir=`) should find its files, and for
/// which side: a server gets `server-cert.pem`/`server-key.pem`, a client
/// `client-cert.pem`/`client-key.pem`; both get `ca-cert.pem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuRole {
    /// `endpoint=server`: qemu-nbd or a QEMU NBD server.
    Server,
    /// `endpoint=client`: QEMU or qemu-img connecting to an NBD server.
    Client,
}

/// Options of [`issue`].
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Validity period. Default: [`DEFAULT_NODE_DAYS`] from now.
    pub validity: Validity,
    /// Also write the QEMU layout into this directory.
    pub qemu: Option<(PathBuf, QemuRole)>,
}

impl Default for IssueOptions {
    fn default() -> IssueOptions {
        IssueOptions {
            validity: Validity::days(DEFAULT_NODE_DAYS),
            qemu: None,
        }
    }
}

/// The files [`init_ca`] wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// `DIR/ca.pem`.
    pub cert: PathBuf,
    /// `DIR/ca-key.pem`.
    pub key: PathBuf,
}

/// The files [`issue`] wrote.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// `DIR/NODE.pem`.
    pub cert: PathBuf,
    /// `DIR/NODE-key.pem`.
    pub key: PathBuf,
    /// The QEMU-layout files, if asked for.
    pub qemu: Vec<PathBuf>,
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |source| TlsError::Generate { what, source }
}

fn to_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Create a new cluster CA in `dir` (created if missing), valid for
/// [`DEFAULT_CA_DAYS`]. Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path) -> Result<CaFiles, TlsError> {
    init_ca_with(dir, Validity::days(DEFAULT_CA_DAYS))
}

/// [`init_ca`] with an explicit validity.
pub fn init_ca_with(dir: &Path, validity: Validity) -> Result<CaFiles, TlsError> {
    validity.check()?;
    create_dir(dir)?;
    let files = CaFiles {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    for p in [&files.cert, &files.key] {
        if p.exists() {
            return Err(TlsError::CaExists { path: p.clone() });
        }
    }
    let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err("set up the CA"))?;
    let mut dn = DistinguishedName::new();
    // A distinct name per CA, so a certificate from another cluster's CA
    // is reported as "unknown issuer" rather than "bad signature".
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    dn.push(
        DnType::CommonName,
        format!("understudy cluster CA {}", created.as_nanos()),
    );
    dn.push(DnType::OrganizationName, "understudy");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_time(validity.not_before);
    params.not_after = to_time(validity.not_after);
    let cert = params.self_signed(&key).map_err(rcgen_err("sign the CA"))?;
    // Key first: a CA certificate without its key would block a retry.
    write_secret(&files.key, key.serialize_pem().as_bytes())?;
    write_public(&files.cert, cert.pem().as_bytes())?;
    tracing::info!(dir = %dir.display(), "created a cluster CA");
    Ok(files)
}

/// Issue (or reissue: rotation overwrites) `node`'s certificate, signed by
/// the CA in `dir`.
pub fn issue(dir: &Path, node: &str, opts: &IssueOptions) -> Result<NodeFiles, TlsError> {
    check_node_name(node)?;
    opts.validity.check()?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_pem = read_text("CA certificate", &ca_cert_path)?;
    let ca_key_pem = read_text("private key", &ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(rcgen_err("parse the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(rcgen_err("parse the CA"))?;

    let key = KeyPair::generate().map_err(rcgen_err("generate the node key"))?;
    let mut params = CertificateParams::new(vec![node.to_string()])
        .map_err(|_| TlsError::BadName { name: node.into() })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = to_time(opts.validity.not_before);
    params.not_after = to_time(opts.validity.not_after);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(rcgen_err("sign the node certificate"))?;

    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let mut files = NodeFiles {
        cert: cert_path(dir, node),
        key: key_path(dir, node),
        qemu: Vec::new(),
    };
    write_secret(&files.key, key_pem.as_bytes())?;
    write_public(&files.cert, cert_pem.as_bytes())?;
    if let Some((qdir, role)) = &opts.qemu {
        files.qemu = write_qemu_dir(qdir, *role, &ca_pem, &cert_pem, &key_pem)?;
    }
    tracing::info!(node, dir = %dir.display(), "issued a node certificate");
    Ok(files)
}

/// Write `ca-cert.pem` and `{server,client}-{cert,key}.pem` into `qdir`,
/// the names QEMU's `tls-creds-x509,dir=QDIR` looks for.
pub fn write_qemu_dir(
    qdir: &Path,
    role: QemuRole,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Vec<PathBuf>, TlsError> {
    create_dir(qdir)?;
    let side = match role {
        QemuRole::Server => "server",
        QemuRole::Client => "client",
    };
    let ca = qdir.join("ca-cert.pem");
    let cert = qdir.join(format!("{side}-cert.pem"));
    let key = qdir.join(format!("{side}-key.pem"));
    write_secret(&key, key_pem.as_bytes())?;
    write_public(&cert, cert_pem.as_bytes())?;
    write_public(&ca, ca_pem.as_bytes())?;
    Ok(vec![ca, cert, key])
}

/// A node name must be a DNS name (it goes into a DNS SAN and is matched
/// as one), not an IP address.
fn check_node_name(node: &str) -> Result<(), TlsError> {
    match ServerName::try_from(node) {
        Ok(ServerName::DnsName(_)) if !node.contains('/') => Ok(()),
        _ => Err(TlsError::BadName { name: node.into() }),
    }
}

fn read_text(what: &'static str, path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    understudy_durable::replace(path, data).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Atomically write a key: the temporary file is created 0600 before the
/// key is written into it, so no other user ever can read it.
fn write_secret(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let tmp = understudy_durable::temp_path(path);
    let owner_only = |step: Step| -> io::Result<()> {
        if step == Step::Write {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // An existing temporary keeps its old mode: force it.
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    understudy_durable::replace_with(path, data, Durability::Durable, owner_only).map_err(
        |source| TlsError::Write {
            path: path.to_owned(),
            source,
        },
    )
}
