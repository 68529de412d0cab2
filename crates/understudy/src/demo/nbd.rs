//! `understudy demo nbd`: the block filter on its own.
//!
//! Creates a sparse raw image, serves it over NBD with a dirty bitmap on an
//! ephemeral loopback port, writes a few patterns through a real NBD
//! connection, reads them back, and prints the dirty map the block filter
//! recorded (as the control API reports it) plus the commands that let
//! outside tools see the same thing.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::control::proto::Request;
use crate::control::server::Handler;
use crate::nbd_client::NbdClient;
use crate::serve::{Daemon, ServeArgs};
use crate::spec::ExportSpec;

/// Arguments of `understudy demo nbd`.
#[derive(Debug, Clone, Args)]
pub struct NbdDemoArgs {
    /// Directory for the demo image (created if missing).
    #[arg(long, default_value = "demo")]
    pub dir: PathBuf,
    /// Size of the demo image.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// Keep serving after the demo until Ctrl-C, so outside tools can
    /// connect (the address is printed).
    #[arg(long)]
    pub stay: bool,
}

/// Run the demo.
pub fn run(args: NbdDemoArgs) -> Result<()> {
    let size = crate::spec::parse_size(&args.size)?;
    ensure!(size >= 16 << 20, "--size must be at least 16M");
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let image = args.dir.join("demo.raw");
    for p in understudy_stack::sidecars(&image) {
        let _ = std::fs::remove_file(p);
    }
    understudy_block::raw::RawDisk::create(&image, size)?;
    println!(
        "created sparse raw image {} ({} MiB)",
        image.display(),
        size >> 20
    );

    let spec: ExportSpec = format!(
        "name=demo,path={},format=raw,bitmap=changes:64k",
        image.display()
    )
    .parse()?;
    let serve = ServeArgs {
        listen: vec!["127.0.0.1:0".into()],
        socket: vec![],
        exports: vec![spec],
        control: args.dir.join("control.sock"),
        persist_interval: std::time::Duration::from_secs(5),
        intent_extent: "64M".into(),
        workers: None,
        tls: crate::nbd_tls::NbdTlsArgs {
            mode: crate::nbd_tls::TlsMode::Off,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        },
        migration: Default::default(),
        vm: Default::default(),
        metrics: None,
    };
    let daemon = Daemon::start(&serve)?;
    let addr = daemon.tcp_addrs[0].to_string();
    println!("serving export \"demo\" over NBD at nbd://{addr}/demo with dirty bitmap \"changes\"");

    let mut c = NbdClient::connect(&addr, "demo")?;
    ensure!(
        c.size() == size,
        "server reports size {} for a {size}-byte image",
        c.size()
    );
    let writes: [(u64, usize, u8); 4] = [
        (0, 4096, 0x11),
        (1 << 20, 200 << 10, 0x22),
        (size / 2 + 123, 10_000, 0x33),
        (size - 65536, 65536, 0x44),
    ];
    for &(off, len, byte) in &writes {
        c.write(off, &vec![byte; len])?;
        println!("  wrote {len:>7} bytes of 0x{byte:02x} at offset {off}");
    }
    c.flush()?;
    for &(off, len, byte) in &writes {
        let mut buf = vec![0u8; len];
        c.read(off, &mut buf)?;
        ensure!(
            buf.iter().all(|&b| b == byte),
            "read-back at {off} did not return what was written"
        );
    }
    println!("  read every range back over NBD: contents match");

    let resp = daemon.handle(&Request {
        id: 1,
        method: "bitmap.dirty".into(),
        params: serde_json::json!({"export": "demo", "name": "changes"}),
    });
    let result = resp
        .result
        .context("the control API did not return the dirty map")?;
    println!("\ndirty map of bitmap \"changes\" (granularity 64 KiB):");
    println!("{:>12} {:>12}", "OFFSET", "LENGTH");
    for run in result["runs"].as_array().into_iter().flatten() {
        println!(
            "{:>12} {:>12}",
            run["offset"].as_u64().unwrap_or(0),
            run["len"].as_u64().unwrap_or(0)
        );
    }
    println!("{} bytes marked dirty", result["dirty_bytes"]);
    print_grid(&result, size);

    if args.stay {
        println!("\nstill serving; try:");
        println!("  nbdinfo --map=qemu:dirty-bitmap:changes nbd://{addr}/demo");
        println!(
            "  understudy bitmap --control {} list",
            serve.control.display()
        );
        let control = crate::control::server::ControlServer::start(&serve.control, daemon.clone())?;
        let d2: Arc<Daemon> = daemon.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                d2.request_stop("signal");
            }
        });
        daemon.wait_for_stop();
        control.stop();
    } else {
        println!(
            "\nsee it with outside tools: `understudy demo nbd --stay`, then nbdinfo --map=qemu:dirty-bitmap:changes"
        );
    }
    drop(c);
    daemon.shutdown()?;
    daemon.join();
    println!(
        "stopped cleanly; bitmaps persisted next to {}",
        image.display()
    );
    Ok(())
}

/// One character per 1/64 of the disk: `#` where any block is dirty.
fn print_grid(result: &serde_json::Value, size: u64) {
    const CELLS: u64 = 64;
    let cell = size.div_ceil(CELLS);
    let mut grid = vec!['.'; CELLS as usize];
    for run in result["runs"].as_array().into_iter().flatten() {
        let (Some(off), Some(len)) = (run["offset"].as_u64(), run["len"].as_u64()) else {
            continue;
        };
        if len == 0 {
            continue;
        }
        let first = off / cell;
        let last = (off + len - 1) / cell;
        for i in first..=last.min(CELLS - 1) {
            grid[i as usize] = '#';
        }
    }
    println!(
        "[{}]  (each cell = {} KiB)",
        grid.iter().collect::<String>(),
        cell >> 10
    );
}
