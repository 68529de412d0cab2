//! Test fixtures: an in-process server over raw disks in a tempdir, helpers
//! to run the real NBD tools, and a minimal raw-socket client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use understudy_block::raw::RawDisk;
use understudy_block::{Disk, WriteOpts};
use understudy_nbd_proto::Request;
use understudy_nbd_proto::reply::{
    ChunkHeader, encode_option, parse_chunk_header, parse_option_reply, parse_simple_reply,
};
use understudy_nbd_proto::wire::*;
use understudy_nbd_server::{Export, MemoryDirtyMap, Server, ServerConfig, ServerError};

pub const MIB: u64 = 1 << 20;

pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub sock: PathBuf,
    threads: Vec<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::new(config).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let sock = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&sock).unwrap();
        let s1 = server.clone();
        let s2 = server.clone();
        let threads = vec![
            std::thread::spawn(move || s1.serve_tcp(tcp)),
            std::thread::spawn(move || s2.serve_unix(unix)),
        ];
        Self {
            server,
            dir,
            port,
            sock,
            threads,
        }
    }

    /// Create a sparse raw disk file `NAME.raw` and export it as NAME.
    pub fn add_disk(&self, name: &str, size: u64) -> (PathBuf, Arc<dyn Disk>) {
        let path = self.dir.path().join(format!("{name}.raw"));
        let disk: Arc<dyn Disk> = Arc::new(RawDisk::create(&path, size).unwrap());
        self.server
            .exports()
            .insert(Export::new(name, disk.clone()).with_description(format!("test disk {name}")));
        (path, disk)
    }

    pub fn add_disk_with_bitmaps(
        &self,
        name: &str,
        size: u64,
        map: Arc<MemoryDirtyMap>,
    ) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.raw"));
        let disk: Arc<dyn Disk> = Arc::new(RawDisk::create(&path, size).unwrap());
        self.server
            .exports()
            .insert(Export::new(name, disk).with_dirty(map));
        path
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// qemu's legacy filename syntax, which accepts an export name.
    pub fn qemu_target(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.server.shutdown_handle().shutdown();
        for t in self.threads.drain(..) {
            t.join().unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// Run an external tool; a missing tool fails the test (CI installs them).
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} (install it: qemu-utils / libnbd-bin / nbdkit): {e}")
    })
}

/// Run a tool and require success; returns stdout.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// qemu-io reports failed commands on stdout/stderr but may still exit 0.
pub fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(target);
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmds:?} failed: {text}");
    text
}

pub fn assert_qemu_io_clean(text: &str) {
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error") && !lower.contains("mismatch"),
        "qemu-io reported a problem:\n{text}"
    );
}

pub fn write_pattern(disk: &dyn Disk, offset: u64, len: usize, seed: u8) {
    let buf: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    disk.write_at(&buf, offset, WriteOpts::default()).unwrap();
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// Number of threads of this process.
/// Poll `cond` until it holds; panic naming `what` if it does not within
/// `deadline` (generous: it only bounds a broken test).
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn thread_count() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A minimal client speaking raw NBD, for malformed-input tests.
pub struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connect and read the greeting.
    pub fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Self { s };
        let g = c.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        c
    }

    /// Connect, send flags, optionally negotiate structured replies and meta
    /// contexts, then GO. Returns the transmission flags.
    pub fn connect_go(
        addr: &str,
        export: &str,
        structured: bool,
        contexts: &[&str],
    ) -> (Self, u16, u64) {
        let mut c = Self::connect(addr);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            c.send(&encode_option(OPT_STRUCTURED_REPLY, &[]));
            assert_eq!(c.option_reply().1, REP_ACK);
        }
        if !contexts.is_empty() {
            let mut d = (export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            c.send(&encode_option(OPT_SET_META_CONTEXT, &d));
            loop {
                let (_, typ, _) = c.option_reply();
                if typ == REP_ACK {
                    break;
                }
                assert_eq!(typ, REP_META_CONTEXT);
            }
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send(&encode_option(OPT_GO, &d));
        let (mut flags, mut size) = (0, 0);
        loop {
            let (_, typ, data) = c.option_reply();
            match typ {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!(
                    "GO failed with reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        (c, flags, size)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// (option, type, data)
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        let h = parse_option_reply(h[..].try_into().unwrap()).expect("option reply magic");
        let d = self.read_n(h.length as usize);
        (h.option, h.typ, d)
    }

    pub fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&r.encode());
    }

    /// (error, cookie)
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        parse_simple_reply(h[..].try_into().unwrap()).expect("simple reply magic")
    }

    pub fn chunk(&mut self) -> (ChunkHeader, Vec<u8>) {
        let h = self.read_n(20);
        let h = parse_chunk_header(h[..].try_into().unwrap()).expect("chunk magic");
        let d = self.read_n(h.length as usize);
        (h, d)
    }

    /// True if the server closed the connection (EOF or reset) within the
    /// read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}
