//! Link configuration.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::error::PeerError;
use crate::key::PeerKey;
use crate::tls::TlsPeer;
use crate::wire::{self, DEFAULT_MAX_PAYLOAD, MAX_MAX_PAYLOAD, MIN_MAX_PAYLOAD};

/// How the two ends of a link prove who they are.
#[derive(Clone)]
pub enum PeerAuth {
    /// A pre-shared key: both ends prove the key, every frame carries a
    /// keyed MAC. Authenticated and integrity-checked, NOT encrypted:
    /// anyone on the network path can read every disk block and memory
    /// page.
    Psk(PeerKey),
    /// TLS 1.3 with mutual certificate authentication: encrypted, and each
    /// end's certificate must chain to the cluster CA and name its node id.
    Tls(Box<TlsPeer>),
}

impl PeerAuth {
    /// Words for logs.
    pub fn describe(&self) -> &'static str {
        match self {
            PeerAuth::Psk(_) => "pre-shared key: authenticated, NOT encrypted",
            PeerAuth::Tls(_) => "TLS 1.3, mutual certificates: encrypted and authenticated",
        }
    }
}

impl fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAuth::Psk(_) => f.write_str("Psk(<key redacted>; authenticated, NOT encrypted)"),
            PeerAuth::Tls(t) => f.debug_tuple("Tls").field(t).finish(),
        }
    }
}

/// Settings shared by every link a daemon opens or accepts.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// This node's id, announced in the hello and checked against the
    /// peer's (two nodes with one id are refused). Over TLS it must be a
    /// name in our certificate, because the peer checks that.
    /// Default: a random UUID (version 4) made by [`PeerConfig::new`]; the
    /// certificate's first name with [`PeerConfig::with_tls`].
    pub node_id: String,
    /// How the peers authenticate. No default.
    pub auth: PeerAuth,
    /// Largest frame payload we accept (and announce).
    /// Default: 16 MiB + 64 KiB ([`DEFAULT_MAX_PAYLOAD`]); allowed
    /// 4 KiB..=256 MiB.
    pub max_payload: u32,
    /// How long a TCP connect may take.
    /// Default: 10 s.
    pub connect_timeout: Duration,
    /// How long the whole handshake may take. Bounds how long an
    /// unauthenticated client can hold an accepting thread.
    /// Default: 10 s.
    pub handshake_timeout: Duration,
    /// How long one read may wait for the peer (`None`: forever).
    /// Default: 60 s.
    pub read_timeout: Option<Duration>,
    /// How long one write may wait for the peer to take data
    /// (`None`: forever).
    /// Default: 60 s.
    pub write_timeout: Option<Duration>,
    /// Send a keepalive after this long without sending anything, so the
    /// peer's read timeout only fires when we are really gone (`None`:
    /// never; then the application must keep traffic flowing).
    /// Default: 15 s. At most half of `read_timeout`.
    pub keepalive: Option<Duration>,
}

impl PeerConfig {
    /// Pre-shared-key mode (authenticated, NOT encrypted), defaults, a
    /// random node id.
    pub fn new(key: PeerKey) -> Result<PeerConfig, PeerError> {
        PeerConfig::with_auth(random_uuid()?, PeerAuth::Psk(key))
    }

    /// TLS mode, defaults; the node id is the certificate's first name.
    pub fn with_tls(tls: TlsPeer) -> Result<PeerConfig, PeerError> {
        let node_id = tls.node_name().ok_or_else(|| PeerError::Config {
            reason: format!(
                "the certificate {} names no node (no DNS subject alternative name): issue it \
                 with `understudy certs issue NODE`",
                tls.identity().cert_path.display()
            ),
        })?;
        PeerConfig::with_auth(node_id, PeerAuth::Tls(Box::new(tls)))
    }

    /// TLS mode from the three files `serve --peer-tls-cert/-key/-ca`
    /// name: this node's certificate and key, and the cluster CA.
    pub fn from_tls_files(cert: &Path, key: &Path, ca: &Path) -> Result<PeerConfig, PeerError> {
        PeerConfig::with_tls(TlsPeer::load(cert, key, ca)?)
    }

    fn with_auth(node_id: String, auth: PeerAuth) -> Result<PeerConfig, PeerError> {
        Ok(PeerConfig {
            node_id,
            auth,
            max_payload: DEFAULT_MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            read_timeout: Some(Duration::from_secs(60)),
            write_timeout: Some(Duration::from_secs(60)),
            keepalive: Some(Duration::from_secs(15)),
        })
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), PeerError> {
        let bad = |reason: String| Err(PeerError::Config { reason });
        if let Err(e) = wire::check_node_id(&self.node_id) {
            return bad(e.to_string());
        }
        if let PeerAuth::Tls(t) = &self.auth
            && !t
                .names()
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&self.node_id))
        {
            return bad(format!(
                "node id {:?} is not a name in our certificate {} (it names {:?}), so peers \
                 would refuse us: use the certificate's name as the node id",
                self.node_id,
                t.identity().cert_path.display(),
                t.names()
            ));
        }
        if !(MIN_MAX_PAYLOAD..=MAX_MAX_PAYLOAD).contains(&self.max_payload) {
            return bad(format!(
                "max_payload {} outside {MIN_MAX_PAYLOAD}..={MAX_MAX_PAYLOAD}",
                self.max_payload
            ));
        }
        let zero = Duration::ZERO;
        for (name, d) in [
            ("connect_timeout", Some(self.connect_timeout)),
            ("handshake_timeout", Some(self.handshake_timeout)),
            ("read_timeout", self.read_timeout),
            ("write_timeout", self.write_timeout),
            ("keepalive", self.keepalive),
        ] {
            if d == Some(zero) {
                return bad(format!("{name} must not be zero (use None for no limit)"));
            }
        }
        if let (Some(ka), Some(rt)) = (self.keepalive, self.read_timeout)
            && ka * 2 > rt
        {
            return bad(format!(
                "keepalive {ka:?} must be at most half of read_timeout {rt:?}, or an idle but \
                 healthy peer would time out"
            ));
        }
        Ok(())
    }
}

/// A random UUID version 4 in the usual text form.
fn random_uuid() -> Result<String, PeerError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| PeerError::Random {
        source: std::io::Error::other(e),
    })?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PeerConfig {
        PeerConfig::new(PeerKey::from_bytes(&(0..32u8).collect::<Vec<_>>()).unwrap()).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_ids_are_uuids() {
        let a = cfg();
        a.validate().unwrap();
        assert_eq!(a.node_id.len(), 36);
        assert_eq!(&a.node_id[14..15], "4");
        assert_ne!(a.node_id, cfg().node_id);
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = cfg();
        c.keepalive = Some(Duration::from_secs(40));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("half of read_timeout")
        );
        let mut c = cfg();
        c.read_timeout = Some(Duration::ZERO);
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.max_payload = MAX_MAX_PAYLOAD + 1;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.node_id = "bad id".into();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.read_timeout = None;
        c.validate().unwrap();
    }
}
