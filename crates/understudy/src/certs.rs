//! `understudy certs init|issue`: a small cluster CA and node certificates
//! for the TLS peer link (and NBD over TLS).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use understudy_tls::certs::{self, IssueOptions, QemuRole, Validity};

/// `understudy certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a cluster CA: DIR/ca.pem (give it to every node) and
    /// DIR/ca-key.pem (0600; keep it safe, ideally off the nodes).
    /// Refuses to overwrite an existing CA.
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue (or reissue, to rotate) NODE's certificate, signed by the CA
    /// in DIR: DIR/NODE.pem and DIR/NODE-key.pem (0600). The certificate
    /// names NODE (the node id peers expect) and is good for both ends of
    /// a peer link.
    Issue {
        /// Directory holding the CA (from `certs init`).
        #[arg(long)]
        dir: PathBuf,
        /// The node name: a DNS name such as `host-a` or `a.example.org`.
        node: String,
        /// Validity in days, from now.
        #[arg(long, default_value_t = certs::DEFAULT_NODE_DAYS)]
        days: u32,
        /// Also write the layout QEMU's `tls-creds-x509,dir=QDIR` expects
        /// (ca-cert.pem and ROLE-cert.pem / ROLE-key.pem).
        #[arg(long)]
        qemu_dir: Option<PathBuf>,
        /// Which side QEMU plays with these files.
        #[arg(long, value_enum, default_value_t = Role::Client, requires = "qemu_dir")]
        qemu_role: Role,
    },
}

/// `--qemu-role`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// QEMU (or qemu-nbd) serves.
    Server,
    /// QEMU (or qemu-img) connects.
    Client,
}

/// Run a `certs` subcommand.
pub fn run(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init { dir } => {
            let files = certs::init_ca(&dir)
                .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
            println!("CA certificate: {}", files.cert.display());
            println!("CA key (keep it secret): {}", files.key.display());
        }
        CertsCmd::Issue {
            dir,
            node,
            days,
            qemu_dir,
            qemu_role,
        } => {
            if days == 0 {
                anyhow::bail!("--days must be at least 1");
            }
            let role = match qemu_role {
                Role::Server => QemuRole::Server,
                Role::Client => QemuRole::Client,
            };
            let opts = IssueOptions {
                validity: Validity::days(days),
                qemu: qemu_dir.map(|q| (q, role)),
            };
            let files = certs::issue(&dir, &node, &opts)
                .with_context(|| format!("cannot issue a certificate for {node}"))?;
            println!("certificate: {}", files.cert.display());
            println!("key (keep it secret): {}", files.key.display());
            for f in files.qemu {
                println!("qemu: {}", f.display());
            }
        }
    }
    Ok(())
}
