//! Two "daemons" in one process: each has NBD serving, a migration target
//! service and the hooks the real daemon implements.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use understudy_bitmap::{BitmapStore, Persister, StoreOptions};
use understudy_block::{Disk, Format, OpenOptions, open_disk};
use understudy_filter::FilterDisk;
use understudy_migration::{
    MigrateOptions, SourceExport, SourceHooks, SwitchDisk, TargetConfig, TargetHooks, TargetService,
};
use understudy_nbd_server::{Export, Server, ServerConfig};
use understudy_peer::{PeerConfig, PeerKey};

pub const KEY: &[u8] = b"0123456789abcdef0123456789ABCDEF-test-key";

pub fn peer_cfg(node: &str, key: &[u8]) -> PeerConfig {
    let mut c = PeerConfig::new(PeerKey::from_bytes(key).unwrap()).unwrap();
    c.node_id = node.into();
    c.read_timeout = Some(Duration::from_secs(10));
    c.keepalive = Some(Duration::from_secs(2));
    c
}

/// A daemon: NBD server + exports + migration target.
pub struct Node {
    pub id: String,
    pub dir: PathBuf,
    pub nbd: Server,
    pub nbd_addr: String,
    pub exports: Mutex<HashMap<String, SourceExport>>,
    pub persisters: Mutex<Vec<Persister>>,
    pub target: Mutex<Option<TargetService>>,
    pub committed: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

impl TargetHooks for Node {
    fn open_copy(&self, name: &str) -> Option<SourceExport> {
        self.exports
            .lock()
            .get(name)
            .filter(|e| !e.switch.is_local())
            .cloned()
    }
    fn serve(&self, export: SourceExport, persister: Option<Persister>) {
        self.nbd
            .exports()
            .insert(Export::new(export.name.clone(), export.switch.clone()));
        if let Some(p) = persister {
            self.persisters.lock().push(p);
        }
        self.exports.lock().insert(export.name.clone(), export);
    }
}

impl SourceHooks for Node {
    fn committed(&self, export: &str, _target: &str) {
        self.nbd.exports().remove(export);
        self.committed.lock().push(export.to_owned());
    }
}

impl Node {
    pub fn start(id: &str, dir: &Path) -> Arc<Node> {
        std::fs::create_dir_all(dir).unwrap();
        let nbd = Server::new(ServerConfig::default()).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let nbd_addr = l.local_addr().unwrap().to_string();
        let s = nbd.clone();
        std::thread::spawn(move || s.serve_tcp(l));
        Arc::new(Node {
            id: id.into(),
            dir: dir.to_owned(),
            nbd,
            nbd_addr,
            exports: Mutex::default(),
            persisters: Mutex::default(),
            target: Mutex::default(),
            committed: Mutex::default(),
        })
    }

    /// Serve an existing image as export `name` (as `serve --export` does).
    pub fn add_export(&self, name: &str, image: &Path) -> SourceExport {
        let inner = open_disk(&OpenOptions::new(image)).unwrap();
        let size = inner.size();
        let store = Arc::new(BitmapStore::open(image, size, StoreOptions::default()).unwrap());
        self.persisters
            .lock()
            .push(store.spawn_persister(Duration::from_secs(5)).unwrap());
        let filter = Arc::new(FilterDisk::new(inner, store.clone()));
        let switch = Arc::new(SwitchDisk::new(filter.clone()));
        let e = SourceExport {
            name: name.into(),
            image: image.into(),
            format: Format::Raw,
            switch: switch.clone(),
            filter,
            store,
            journal: None,
        };
        self.nbd.exports().insert(Export::new(name, switch));
        self.exports.lock().insert(name.into(), e.clone());
        e
    }

    pub fn export(&self, name: &str) -> SourceExport {
        self.exports.lock().get(name).cloned().unwrap()
    }

    pub fn listen(self: &Arc<Self>, key: &[u8]) -> String {
        self.listen_with(key, None)
    }

    pub fn listen_with(
        self: &Arc<Self>,
        key: &[u8],
        wrap: Option<understudy_migration::DiskWrapper>,
    ) -> String {
        let mut cfg = TargetConfig::new(self.dir.clone(), peer_cfg(&self.id, key));
        cfg.disk_wrapper = wrap;
        let t = TargetService::start("127.0.0.1:0", cfg, self.clone()).unwrap();
        let a = t.local_addr().to_owned();
        *self.target.lock() = Some(t);
        a
    }

    /// Listen with a fault armed for the next commit.
    pub fn listen_with_commit_fault(
        self: &Arc<Self>,
        key: &[u8],
        fault: understudy_migration::CommitFault,
    ) -> String {
        let mut cfg = TargetConfig::new(self.dir.clone(), peer_cfg(&self.id, key));
        cfg.commit_fault = Some(Arc::new(Mutex::new(Some(fault))));
        let t = TargetService::start("127.0.0.1:0", cfg, self.clone()).unwrap();
        let a = t.local_addr().to_owned();
        *self.target.lock() = Some(t);
        a
    }

    pub fn stop_listening(&self) {
        if let Some(t) = self.target.lock().take() {
            t.stop();
        }
    }

    pub fn nbd_url(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.nbd_addr)
    }

    pub fn opts(&self, to: &str) -> MigrateOptions {
        MigrateOptions::new(to, peer_cfg(&self.id, KEY))
    }
}

pub fn tool(name: &str) -> Command {
    // Tests that need a tool must fail (not skip) when it is missing.
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is required for this test: install qemu-utils"
    );
    Command::new(name)
}

/// Run qemu-io commands against `target` (`-f raw` file or NBD URL); panic
/// with its output if any command failed.
pub fn qemu_io(target: &str, cmds: &[String]) -> String {
    let mut c = tool("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(target);
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("failed")
            && !text.contains("error")
            && !text.contains("Pattern verification"),
        "qemu-io on {target} failed: {text}"
    );
    text
}

pub fn create_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// qemu-img compare; panics with its output when the images differ.
pub fn assert_same(a: &Path, b: &Path) {
    let out = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seed an image with a few allocated extents and holes between them.
pub fn seed(path: &Path) -> Vec<String> {
    let cmds: Vec<String> = vec![
        "write -P 0xa1 0 4M".into(),
        "write -P 0xa2 8M 3M".into(),
        "write -P 0xa3 20M 1M".into(),
        "write -P 0xa4 30M 64k".into(),
    ];
    qemu_io(path.to_str().unwrap(), &cmds);
    cmds
}

/// A writer script: `n` writes of `len` bytes with distinct patterns at
/// pseudo-random aligned offsets, `sleep_ms` apart, then reads of every
/// region written last (checking the client sees its own writes).
pub fn writer_script(seed: u64, n: usize, len: u64, sleep_ms: u64, size: u64) -> Vec<String> {
    let mut x = seed | 1;
    let mut last: HashMap<u64, u8> = HashMap::new();
    let mut cmds = Vec::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / len)) * len;
        let pat = (i % 250 + 1) as u8;
        cmds.push(format!("write -P {pat} {off} {len}"));
        last.insert(off, pat);
        if sleep_ms > 0 {
            cmds.push(format!("sleep {sleep_ms}"));
        }
    }
    let mut offs: Vec<_> = last.into_iter().collect();
    offs.sort_unstable();
    for (off, pat) in offs {
        cmds.push(format!("read -P {pat} {off} {len}"));
    }
    cmds
}

/// A TCP proxy that can be cut.
pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    pub bytes: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(to: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let (to, c2, cut2, b2) = (to.to_owned(), conns.clone(), cut.clone(), bytes.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { return };
                if cut2.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(b) = TcpStream::connect(&to) else {
                    continue;
                };
                c2.lock().push(a.try_clone().unwrap());
                c2.lock().push(b.try_clone().unwrap());
                for (mut r, mut w, count) in [
                    (
                        a.try_clone().unwrap(),
                        b.try_clone().unwrap(),
                        Some(b2.clone()),
                    ),
                    (b, a, None),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match r.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if w.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                    if let Some(c) = &count {
                                        c.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        let _ = w.shutdown(Shutdown::Both);
                        let _ = r.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            bytes,
        }
    }

    /// Break every connection now and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// A cutter usable from a fault hook.
    pub fn cutter(&self) -> impl Fn() + Send + Sync + 'static {
        let (cut, conns) = (self.cut.clone(), self.conns.clone());
        move || {
            cut.store(true, Ordering::SeqCst);
            for c in conns.lock().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Poll `cond` until it holds; fail the test with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `N`, `Nk` or `Nm` bytes, as qemu-io reads them.
fn qemu_size(s: &str) -> u64 {
    let (n, mul) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<u64>().unwrap() * mul
}

fn region(image: &Path, off: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len as usize];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

/// Spawn qemu-io running `cmds` against `url` (which serves the raw
/// `image`), and return once its first command, a write, has changed the
/// image: the writer is running.
pub fn spawn_running_writer(
    image: &Path,
    url: String,
    cmds: Vec<String>,
) -> std::thread::JoinHandle<String> {
    let first: Vec<&str> = cmds[0].split_whitespace().collect();
    assert_eq!(first[0], "write", "the script must start with a write");
    let off = qemu_size(first[first.len() - 2]);
    let len = qemu_size(first[first.len() - 1]);
    let before = region(image, off, len);
    let writer = spawn_writer(url, cmds);
    wait_until(
        "the writer's first write is visible in the image",
        Duration::from_secs(30),
        || region(image, off, len) != before || writer.is_finished(),
    );
    writer
}

/// Wait until nothing holds the bitmap sidecar of `image` any more (the
/// session that had it open has ended).
pub fn wait_sidecar_free(image: &Path) {
    let mut p = image.as_os_str().to_owned();
    p.push(".bitmaps-intent");
    let p = PathBuf::from(p);
    wait_until(
        "the old session released the image's bitmap sidecar",
        Duration::from_secs(30),
        || match std::fs::OpenOptions::new().read(true).write(true).open(&p) {
            Ok(f) => f.try_lock().is_ok(),
            Err(_) => true,
        },
    );
}

/// Spawn qemu-io running `cmds` against `url` in the background.
pub fn spawn_writer(url: String, cmds: Vec<String>) -> std::thread::JoinHandle<String> {
    let _ = tool("qemu-io");
    std::thread::spawn(move || qemu_io(&url, &cmds))
}

/// Apply `cmds` (writes only) to a copy of `orig`: the expected result.
pub fn expected_image(orig_copy: &Path, cmds: &[String]) {
    let w: Vec<String> = cmds
        .iter()
        .filter(|c| c.starts_with("write"))
        .cloned()
        .collect();
    for chunk in w.chunks(200) {
        qemu_io(orig_copy.to_str().unwrap(), chunk);
    }
}

pub fn image_of(d: &Arc<dyn Disk>) -> u64 {
    d.size()
}
