//! `serve --tls ...`: NBD over TLS (STARTTLS) for the daemon's exports.
//! The trust model and the certificate workflow are in docs/security.md.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use understudy_nbd_server::NbdTls;

/// Whether NBD clients speak TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused.
    Off,
    /// TLS is offered; plaintext clients are served too.
    On,
    /// Plaintext clients are refused (`NBD_REP_ERR_TLS_REQD`).
    Require,
}

/// TLS options of `understudy serve`.
#[derive(Debug, Clone, Args)]
pub struct NbdTlsArgs {
    /// NBD over TLS: off, on (offered) or require (plaintext refused).
    #[arg(long = "tls", value_enum, default_value = "off")]
    pub mode: TlsMode,
    /// The server's certificate chain (PEM), e.g. from `understudy certs issue`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates chaining to this CA (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl NbdTlsArgs {
    /// The NBD server's TLS settings, or `None` with `--tls off`.
    pub fn build(&self) -> Result<Option<NbdTls>> {
        let (cert, key) = match (self.mode, &self.tls_cert, &self.tls_key) {
            (TlsMode::Off, None, None) if self.tls_ca.is_none() => return Ok(None),
            (TlsMode::Off, ..) => bail!(
                "--tls-cert/--tls-key/--tls-ca were given but --tls is off: add --tls on or \
                 --tls require, or drop them"
            ),
            (_, Some(c), Some(k)) => (c, k),
            _ => bail!(
                "--tls {:?} needs both --tls-cert and --tls-key (make them with `understudy \
                 certs init` and `understudy certs issue`)",
                self.mode
            ),
        };
        let identity = understudy_tls::load_identity(cert, key)
            .with_context(|| format!("loading the NBD TLS identity {}", cert.display()))?;
        let ca = match &self.tls_ca {
            Some(p) => Some(
                understudy_tls::load_ca(p)
                    .with_context(|| format!("loading the client CA {}", p.display()))?,
            ),
            None => None,
        };
        let config = understudy_tls::server_config(&identity, ca.as_ref())
            .context("building the NBD TLS configuration")?;
        Ok(Some(NbdTls {
            config,
            required: self.mode == TlsMode::Require,
        }))
    }
}
