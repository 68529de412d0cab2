//! Serve one raw or qcow2 image over NBD (for manual tests and benchmarks).
//!
//! `cargo run --release -p understudy-nbd-server --example serve -- IMAGE [ADDR] [NAME]`
//! ADDR defaults to 127.0.0.1:10809, NAME to "disk". Stops on Ctrl-C (the
//! process exits) or when stdin is closed.
//!
//! `NBD_TLS_DIR=DIR` requires TLS with `DIR/server-cert.pem` and
//! `DIR/server-key.pem` (QEMU's server layout); `NBD_TLS_VERIFY=1` also
//! requires client certificates from `DIR/ca-cert.pem`.

use std::io::Read;
use std::net::TcpListener;

use std::path::Path;

use understudy_block::{OpenOptions, open_disk};
use understudy_nbd_server::{Export, NbdTls, Server, ServerConfig};

/// TLS settings from `NBD_TLS_DIR` / `NBD_TLS_VERIFY`, if set.
fn tls_from_env() -> Result<Option<NbdTls>, Box<dyn std::error::Error>> {
    let Some(dir) = std::env::var_os("NBD_TLS_DIR") else {
        return Ok(None);
    };
    let dir = Path::new(&dir);
    let id =
        understudy_tls::load_identity(&dir.join("server-cert.pem"), &dir.join("server-key.pem"))?;
    let ca = match std::env::var("NBD_TLS_VERIFY").as_deref() {
        Ok("1") => Some(understudy_tls::load_ca(&dir.join("ca-cert.pem"))?),
        _ => None,
    };
    let config = understudy_tls::server_config(&id, ca.as_ref())?;
    Ok(Some(NbdTls {
        config,
        required: true,
    }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(image) = args.next() else {
        eprintln!("usage: serve IMAGE [ADDR] [NAME]");
        std::process::exit(2);
    };
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "disk".into());
    let disk = open_disk(&OpenOptions::new(&image))?;
    let server = Server::new(ServerConfig {
        tls: tls_from_env()?,
        ..ServerConfig::default()
    })?;
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
