//! Copy rate of the peer link over TCP loopback: pre-shared key with a
//! keyed-BLAKE3 MAC per frame (authenticated, NOT encrypted) against TLS
//! 1.3 with mutual certificates (AES-GCM or ChaCha20-Poly1305 via ring,
//! no frame MAC), 1 MiB frames, the two modes interleaved three times.
//!
//! `cargo run --release -p understudy-peer --example link_rate [GiB]`

use std::thread;
use std::time::{Duration, Instant};

use understudy_peer::understudy_tls::certs::{self, IssueOptions};
use understudy_peer::{Link, PeerConfig, PeerError, PeerKey, PeerListener};

const FRAME: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1.0);
    let frames = (gib * 1024.0).round().max(1.0) as usize;
    let dir = tempfile::tempdir()?;
    certs::init_ca(dir.path())?;
    for n in ["bench-source", "bench-target"] {
        certs::issue(dir.path(), n, &IssueOptions::default())?;
    }
    let tls = |node: &str| {
        PeerConfig::from_tls_files(
            &certs::cert_path(dir.path(), node),
            &certs::key_path(dir.path(), node),
            &dir.path().join("ca.pem"),
        )
    };
    let key = PeerKey::from_bytes(&(0..32u8).map(|i| i * 37 + 1).collect::<Vec<_>>())?;
    let mut psk_target = PeerConfig::new(key.clone())?;
    psk_target.node_id = "bench-target".into();
    let mut psk_source = PeerConfig::new(key)?;
    psk_source.node_id = "bench-source".into();
    let modes = [
        ("psk+mac", psk_source, psk_target),
        ("tls1.3", tls("bench-source")?, tls("bench-target")?),
    ];
    let data: Vec<u8> = (0..FRAME).map(|i| (i * 31 + i / 977) as u8).collect();
    println!("{frames} frames of 1 MiB per run");
    for round in 1..=3 {
        for (name, source, target) in &modes {
            let cpu0 = cpu_seconds();
            let took = run(&data, frames, source.clone(), target.clone())?;
            let cpu = cpu_seconds() - cpu0;
            let mb = (frames * FRAME) as f64 / 1e6;
            println!(
                "round {round} {name:<8} {:>8.1} MB/s ({:.2} s wall, {:.2} s CPU: {:.0} MB per CPU-second)",
                mb / took.as_secs_f64(),
                took.as_secs_f64(),
                cpu,
                mb / cpu.max(0.01)
            );
        }
    }
    Ok(())
}

/// CPU time of this process (both ends of the link), from /proc: a
/// steadier measure than wall time on a shared machine. 0 if unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which ends with ')'): utime and stime
    // are the 12th and 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

fn run(
    data: &[u8],
    frames: usize,
    mut source: PeerConfig,
    mut target: PeerConfig,
) -> Result<Duration, PeerError> {
    // Keep the keepalive threads out of the measurement.
    source.keepalive = None;
    target.keepalive = None;
    let listener = PeerListener::bind("127.0.0.1:0", &target)?;
    let addr = listener.local_addr()?;
    let reader = thread::spawn(move || -> Result<(), PeerError> {
        let (mut link, _) = listener.accept()?;
        let mut buf = Vec::new();
        for _ in 0..frames {
            link.recv_into(&mut buf)?;
        }
        Ok(())
    });
    let link = Link::connect_to_node(&addr, "bench-target", &source, "migrate")?;
    let start = Instant::now();
    for _ in 0..frames {
        link.send(0x0101, data)?;
    }
    reader.join().map_err(|_| PeerError::LinkDead)??;
    Ok(start.elapsed())
}
