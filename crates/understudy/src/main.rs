//! `understudy`: keep a second copy of a running VM's disk, memory and
//! device state in step on another host.

mod certs;
mod control;
mod demo;
mod mem;
mod metrics;
mod migrate;
mod nbd_client;
mod nbd_tls;
mod replicate;
mod serve;
mod spec;
mod vm;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Default control socket, used by `serve` and by the client commands.
const DEFAULT_CONTROL: &str = "/tmp/understudy.sock";

#[derive(Debug, Parser)]
#[command(name = "understudy", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `understudy=debug`.
    #[arg(long, global = true, env = "UNDERSTUDY_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines (for machines) instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disk images over NBD through the block filter.
    Serve(Box<serve::ServeArgs>),
    /// Manage the dirty bitmaps of a running server.
    Bitmap {
        /// Control socket of the server.
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        #[command(subcommand)]
        cmd: BitmapCmd,
    },
    /// Show the exports of a running server: where requests go, whether
    /// the export arrived by migration, its journal and bitmaps.
    Export {
        /// Control socket of the server.
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// Move an export to another server while its clients keep writing
    /// (through the control socket of the server that has it).
    Migrate(migrate::MigrateArgs),
    /// Run the built-in demo: a tiny guest printing a counter moves live
    /// between two daemons and back (`demo nbd`: the block filter alone).
    Demo(demo::DemoArgs),
    /// Memory checkpoint sync: record guest memory traces and replay them.
    Mem {
        #[command(subcommand)]
        cmd: mem::MemCmd,
    },
    /// Run QEMU guests under a running server, their disks served by it
    /// through the block filter (docs/vm.md).
    Vm {
        /// Control socket of the server.
        #[arg(long, global = true, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        #[command(subcommand)]
        cmd: vm::VmCmd,
    },
    /// Replicate an export continuously to a backup server, and fail over
    /// to it (docs/replication.md).
    Replicate {
        /// Control socket of the server.
        #[arg(long, global = true, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        #[command(subcommand)]
        cmd: replicate::ReplicateCmd,
    },
    /// Make a cluster CA and node certificates for TLS links.
    Certs {
        #[command(subcommand)]
        cmd: certs::CertsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ExportCmd {
    /// List the exports.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BitmapCmd {
    /// Add a bitmap to an export (starts enabled and empty).
    Add {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
        /// Bytes per bit: a power of two from 4k to 64M.
        #[arg(long, default_value = "64k")]
        granularity: String,
    },
    /// Remove a bitmap and its persistent state.
    Remove {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
    },
    /// Mark every block of a bitmap clean.
    Clear {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
    },
    /// Start recording writes.
    Enable {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
    },
    /// Stop recording writes (contents are kept).
    Disable {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
    },
    /// List the bitmaps of one export, or of all exports.
    List {
        /// Export name; all exports when absent.
        export: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the dirty ranges of a bitmap.
    Dirty {
        /// Export name.
        export: String,
        /// Bitmap name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Serve(args) => serve::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Mem { cmd } => mem::run(cmd),
        Command::Certs { cmd } => certs::run(cmd),
        Command::Bitmap { control, cmd } => bitmap_cmd(&control, cmd),
        Command::Export { control, cmd } => export_cmd(&control, cmd),
        Command::Vm { control, cmd } => vm::run(&control, cmd),
        Command::Replicate { control, cmd } => replicate::run(&control, cmd),
    }
}

fn export_cmd(control: &std::path::Path, cmd: ExportCmd) -> Result<()> {
    let mut c = control::client::Client::connect(control)?;
    match cmd {
        ExportCmd::List { json } => {
            let r = c.call("export.list", serde_json::json!({}))?;
            let exports: Vec<control::proto::ExportEntry> = serde_json::from_value(r)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&exports)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<7} {:>14} {:<10} {:<9} {:<28} {:>7}  PATH",
                "EXPORT", "FORMAT", "SIZE", "SERVING", "RECEIVED", "JOURNAL", "BITMAPS"
            );
            for e in &exports {
                let journal = match &e.journal {
                    None => "-".to_string(),
                    Some(j) => format!(
                        "{} e{} durable e{}",
                        match j.interval_ms {
                            Some(ms) => format!("{}:{ms}ms", j.flush),
                            None => j.flush.clone(),
                        },
                        j.current_epoch,
                        j.durable_epoch
                    ),
                };
                println!(
                    "{:<16} {:<7} {:>14} {:<10} {:<9} {:<28} {:>7}  {}",
                    e.name,
                    e.format,
                    e.size,
                    if e.read_only {
                        format!("{} (ro)", e.serving)
                    } else {
                        e.serving.clone()
                    },
                    e.received,
                    journal,
                    e.bitmaps.len(),
                    e.path
                );
            }
        }
    }
    Ok(())
}

fn bitmap_cmd(control: &std::path::Path, cmd: BitmapCmd) -> Result<()> {
    use serde_json::json;
    let mut c = control::client::Client::connect(control)?;
    match cmd {
        BitmapCmd::Add {
            export,
            name,
            granularity,
        } => {
            let g = spec::check_granularity(spec::parse_size(&granularity)?)?;
            c.call(
                "bitmap.add",
                json!({"export": export, "name": name, "granularity": g}),
            )?;
            println!("added bitmap {name} to {export} (granularity {g})");
        }
        BitmapCmd::Remove { export, name } => {
            c.call("bitmap.remove", json!({"export": export, "name": name}))?;
            println!("removed bitmap {name} from {export}");
        }
        BitmapCmd::Clear { export, name } => {
            c.call("bitmap.clear", json!({"export": export, "name": name}))?;
            println!("cleared bitmap {name} of {export}");
        }
        BitmapCmd::Enable { export, name } => {
            c.call("bitmap.enable", json!({"export": export, "name": name}))?;
            println!("enabled bitmap {name} of {export}");
        }
        BitmapCmd::Disable { export, name } => {
            c.call("bitmap.disable", json!({"export": export, "name": name}))?;
            println!("disabled bitmap {name} of {export}");
        }
        BitmapCmd::List { export, json } => {
            let r = c.call("export.list", json!({}))?;
            let exports: Vec<control::proto::ExportEntry> = serde_json::from_value(r)?;
            let exports: Vec<_> = exports
                .into_iter()
                .filter(|e| export.as_ref().is_none_or(|n| *n == e.name))
                .collect();
            if let Some(n) = &export
                && exports.is_empty()
            {
                anyhow::bail!("no export named {n:?}: `understudy bitmap list` shows them all");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&exports)?);
            } else {
                println!(
                    "{:<16} {:<16} {:>11} {:>8} {:>14} {:>9}",
                    "EXPORT", "BITMAP", "GRANULARITY", "ENABLED", "DIRTY BYTES", "RECOVERED"
                );
                for e in &exports {
                    for b in &e.bitmaps {
                        println!(
                            "{:<16} {:<16} {:>11} {:>8} {:>14} {:>9}",
                            e.name, b.name, b.granularity, b.enabled, b.dirty_bytes, b.recovered
                        );
                    }
                }
            }
        }
        BitmapCmd::Dirty { export, name, json } => {
            let r = c.call("bitmap.dirty", json!({"export": export, "name": name}))?;
            let runs: Vec<control::proto::DirtyRun> = serde_json::from_value(r["runs"].clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let total: u64 = runs.iter().map(|r| r.len).sum();
                println!("{:>14} {:>14}", "OFFSET", "LENGTH");
                for run in &runs {
                    println!("{:>14} {:>14}", run.offset, run.len);
                }
                println!("{} dirty bytes in {} runs", total, runs.len());
            }
        }
    }
    Ok(())
}
