//! Serve one raw or qcow2 image over NBD (for manual tests and benchmarks).
//!
//! `cargo run --release -p understudy-nbd-server --example serve -- IMAGE [ADDR] [NAME]`
//! ADDR defaults to 127.0.0.1:10809, NAME to "disk". Stops on Ctrl-C (the
//! process exits) or when stdin is closed.

use std::io::Read;
use std::net::TcpListener;

use understudy_block::{OpenOptions, open_disk};
use understudy_nbd_server::{Export, Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(image) = args.next() else {
        eprintln!("usage: serve IMAGE [ADDR] [NAME]");
        std::process::exit(2);
    };
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "disk".into());
    let disk = open_disk(&OpenOptions::new(&image))?;
    let server = Server::new(ServerConfig::default())?;
    server.exports().insert(Export::new(name, disk));
    let listener = TcpListener::bind(&addr)?;
    eprintln!("serving {image} on nbd://{addr}");
    let stop = server.shutdown_handle();
    let s = server.clone();
    let accept = std::thread::spawn(move || s.serve_tcp(listener));
    // Stop when stdin closes (lets scripts end the server cleanly).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    stop.shutdown();
    accept.join().map_err(|_| "accept loop panicked")??;
    eprintln!("{:?}", server.stats());
    Ok(())
}
