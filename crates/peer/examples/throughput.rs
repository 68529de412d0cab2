//! Throughput of 1 MiB frames over TCP loopback, against raw TCP.
//!
//! `cargo run --release -p understudy-peer --example throughput [MiB]`
//!
//! Prints MiB/s for raw TCP writes, for the link (keyed-BLAKE3 MAC on both
//! ends), and for BLAKE3 alone, best of three runs each.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use understudy_peer::{Link, PeerConfig, PeerError, PeerKey, PeerListener};

const CHUNK: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1024);
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 31 + i / 977) as u8).collect();
    let best = |f: &dyn Fn() -> Result<Duration, Box<dyn std::error::Error>>| {
        (0..3)
            .map(|_| f())
            .try_fold(Duration::MAX, |b, d| d.map(|d| b.min(d)))
    };
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();

    let raw = best(&|| raw_tcp(&data, mib))?;
    println!("raw TCP, 1 MiB writes: {:>8.0} MiB/s", rate(raw));
    let link = best(&|| peer_link(&data, mib).map_err(Into::into))?;
    println!("peer link, 1 MiB frames: {:>6.0} MiB/s", rate(link));
    let hash = best(&|| {
        let key = [7u8; 32];
        let start = Instant::now();
        for _ in 0..mib {
            std::hint::black_box(blake3::keyed_hash(&key, &data));
        }
        Ok(start.elapsed())
    })?;
    println!("keyed BLAKE3 alone: {:>11.0} MiB/s", rate(hash));
    let per = handshakes(100)?;
    println!(
        "connect + handshake: {:>9.0} us each (100 sequential)",
        per.as_secs_f64() * 1e6
    );
    Ok(())
}

fn raw_tcp(data: &[u8], mib: usize) -> Result<Duration, Box<dyn std::error::Error>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..mib {
            s.read_exact(&mut buf)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(data)?;
    }
    reader.join().map_err(|_| "reader panicked")??;
    Ok(start.elapsed())
}

fn configs() -> Result<(PeerConfig, PeerConfig), PeerError> {
    let key = PeerKey::from_bytes(&(0..32u8).map(|i| i * 37 + 1).collect::<Vec<_>>())?;
    let mut server_cfg = PeerConfig::new(key.clone())?;
    server_cfg.node_id = "bench-target".into();
    let mut client_cfg = PeerConfig::new(key)?;
    client_cfg.node_id = "bench-source".into();
    // Keep the per-link keepalive thread out of the measurement.
    server_cfg.keepalive = None;
    client_cfg.keepalive = None;
    Ok((server_cfg, client_cfg))
}

fn handshakes(n: u32) -> Result<Duration, PeerError> {
    let (server_cfg, client_cfg) = configs()?;
    let listener = PeerListener::bind("127.0.0.1:0", &server_cfg)?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> Result<(), PeerError> {
        for _ in 0..n {
            listener.accept()?;
        }
        Ok(())
    });
    let start = Instant::now();
    for _ in 0..n {
        Link::connect(&addr, &client_cfg, "migrate")?;
    }
    let took = start.elapsed();
    server.join().map_err(|_| PeerError::LinkDead)??;
    Ok(took / n)
}

fn peer_link(data: &[u8], mib: usize) -> Result<Duration, PeerError> {
    let (server_cfg, client_cfg) = configs()?;
    let listener = PeerListener::bind("127.0.0.1:0", &server_cfg)?;
    let addr = listener.local_addr()?;
    let reader = thread::spawn(move || -> Result<(), PeerError> {
        let (mut link, _) = listener.accept()?;
        let mut buf = Vec::new();
        for _ in 0..mib {
            link.recv_into(&mut buf)?;
        }
        Ok(())
    });
    let link = Link::connect(&addr, &client_cfg, "migrate")?;
    let start = Instant::now();
    for _ in 0..mib {
        link.send(0x0101, data)?;
    }
    reader.join().map_err(|_| PeerError::LinkDead)??;
    Ok(start.elapsed())
}
