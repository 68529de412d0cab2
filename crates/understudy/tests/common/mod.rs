//! Helpers for tests that run the real `understudy` binary and real NBD
//! clients. External tools are required: a missing tool fails the test
//! (the test command installs them).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_understudy")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Run an external tool, failing the test with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = run_raw(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run an external tool and return its output whatever the status.
pub fn run_raw(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} (is it installed? run scripts/install-deps.sh): {e}")
    })
}

/// A running `understudy serve`.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub control: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Server {
    /// Start `understudy serve` with `extra` arguments on a free port and a
    /// control socket in `dir`; waits until it accepts connections.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        let control = dir.join(format!("ctl-{port}.sock"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--control".into(),
            control.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(dir, port, control, args)
    }

    fn start_args(dir: &Path, port: u16, control: PathBuf, args: Vec<String>) -> Server {
        // A killed server leaves its socket file behind; readiness below
        // waits for the new server to create it again.
        let _ = std::fs::remove_file(&control);
        let log = dir.join(format!("server-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(&args)
            .env("UNDERSTUDY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut s = Server {
            child,
            port,
            control,
            args,
            log,
        };
        s.wait_ready();
        s
    }

    /// Start again with the same arguments (same port and control socket).
    pub fn restart(&self, dir: &Path) -> Server {
        Self::start_args(dir, self.port, self.control.clone(), self.args.clone())
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("server exited early ({st}): {}", self.log_text());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.control.exists()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not start: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Run an `understudy` client subcommand against this server's control
    /// socket.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut full = vec![args[0], "--control"];
        let c = self.control.display().to_string();
        full.push(&c);
        full.extend(&args[1..]);
        Command::new(bin()).args(&full).output().unwrap()
    }

    /// Like [`Server::ctl`] but asserts success and returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "understudy {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Dirty runs of a bitmap as (offset, len).
    pub fn dirty_runs(&self, export: &str, bitmap: &str) -> Vec<(u64, u64)> {
        let out = self.ctl_ok(&["bitmap", "dirty", export, bitmap, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["offset"].as_u64().unwrap(), r["len"].as_u64().unwrap()))
            .collect()
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        // SAFETY-free: use the kill command rather than libc.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not stop on SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What is needed to start this server again after it is gone.
    pub fn restart_args_for_check(&self) -> Restart {
        Restart {
            port: self.port,
            control: self.control.clone(),
            args: self.args.clone(),
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `[off, off+len)` is inside the union of `runs`.
pub fn covered(runs: &[(u64, u64)], off: u64, len: u64) -> bool {
    let mut pos = off;
    let end = off + len;
    let mut sorted = runs.to_vec();
    sorted.sort();
    for (o, l) in sorted {
        if o <= pos && pos < o + l {
            pos = o + l;
            if pos >= end {
                return true;
            }
        }
    }
    pos >= end
}

/// Arguments of a server that was stopped or killed.
pub struct Restart {
    port: u16,
    control: PathBuf,
    args: Vec<String>,
}

impl Restart {
    /// Start it again.
    pub fn start(self, dir: &Path) -> Server {
        Server::start_args(dir, self.port, self.control, self.args)
    }
}
