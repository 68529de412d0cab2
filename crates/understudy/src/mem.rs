//! `understudy mem record|replay`: memory traces of real guests and the
//! primary/backup replay that compares content patches with raw pages,
//! LZ4 and QEMU's XBZRLE.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use understudy_lab::{GuestArtefacts, RecordOptions, guest_cache_dir, record};
use understudy_memsync::replay::{ReplayOptions, run as replay_run};

/// `understudy mem ...`.
#[derive(Debug, Subcommand)]
pub enum MemCmd {
    /// Boot a small Linux guest under QEMU (TCG) with its RAM in a shared
    /// file, run a workload, and copy the RAM image into TRACE_DIR every
    /// INTERVAL of guest run time. Build the guest first with
    /// `scripts/guest/build.sh`.
    Record(RecordArgs),
    /// Run the primary/backup sync over a trace in one process, verify the
    /// rebuilt image after every checkpoint, and report bytes on the wire
    /// and throughput per method.
    Replay(ReplayArgs),
}

/// Arguments of `mem record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Workload inside the guest: kvstore, btree, textproc, churn or idle.
    #[arg(long)]
    pub workload: String,
    /// Guest run time between checkpoints.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Number of images to record.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u32,
    /// Directory with vmlinuz and initrd.gz (default: the cache of
    /// scripts/guest/build.sh, or $UNDERSTUDY_GUEST_CACHE).
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// Trace directory to create.
    pub out: PathBuf,
}

/// Arguments of `mem replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Trace directory (0000.ram, 0001.ram, ...).
    pub trace: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Use every N-th image (a 25 ms trace with stride 4 acts as 100 ms).
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Replay at most this many images.
    #[arg(long)]
    pub max: Option<usize>,
    /// Reference-store budget of the content-patch codec.
    #[arg(long, default_value = "64M")]
    pub store_budget: String,
    /// Skip the byte-for-byte check after every checkpoint (faster).
    #[arg(long)]
    pub no_verify: bool,
}

/// Run a `mem` subcommand.
pub fn run(cmd: MemCmd) -> Result<()> {
    match cmd {
        MemCmd::Record(a) => {
            let dir = a.guest_dir.unwrap_or_else(default_guest_dir);
            let GuestArtefacts { kernel, initrd } = GuestArtefacts::in_dir(&dir);
            anyhow::ensure!(
                kernel.exists() && initrd.exists(),
                "no guest kernel/initramfs in {}: run `bash scripts/guest/build.sh` first (or pass --guest-dir)",
                dir.display()
            );
            let mut o = RecordOptions::new(kernel, initrd, &a.workload, a.interval, a.count, a.out);
            o.mem_mib = a.mem_mib;
            let r = record(&o).context("recording the trace failed")?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        MemCmd::Replay(a) => {
            let o = ReplayOptions {
                store_budget_bytes: crate::spec::parse_size(&a.store_budget)?,
                max_checkpoints: a.max,
                stride: a.stride.max(1),
                verify: !a.no_verify,
                ..ReplayOptions::default()
            };
            let r = replay_run(&a.trace, &o)
                .with_context(|| format!("replaying trace {}", a.trace.display()))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{r}");
            }
        }
    }
    Ok(())
}

/// The guest cache of `scripts/guest/build.sh`: `$UNDERSTUDY_GUEST_CACHE`,
/// else `$HOME/.cache/understudy/guest`.
fn default_guest_dir() -> PathBuf {
    guest_cache_dir(
        std::env::var_os("UNDERSTUDY_GUEST_CACHE").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}
