//! A small blocking QMP (QEMU Machine Protocol) client.
//!
//! QMP is line-delimited JSON over a Unix socket (`-qmp unix:PATH,server,nowait`):
//! the server greets with `{"QMP": {...}}`, the client sends
//! `{"execute":"qmp_capabilities"}`, then commands, each answered by
//! `{"return": ...}` or `{"error": {"class", "desc"}}`. Asynchronous
//! `{"event": ...}` lines may arrive at any time; they are queued and can be
//! read with [`Qmp::take_events`].
//!
//! Every command carries an `id` so that a reply can be matched to it.
//! Lines longer than [`MAX_LINE`] are refused (QEMU is a peer process: a
//! runaway reply must not exhaust memory).
//!
//! The client only connects to a socket that a running QEMU serves; it
//! never starts QEMU (that is the caller's job, e.g. the trace recorder in
//! `understudy-lab`).
#![warn(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest accepted JSON line (16 MiB).
pub const MAX_LINE: usize = 16 << 20;
/// Events kept before the oldest are dropped.
const MAX_EVENTS: usize = 1024;

/// Failures of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error(
        "cannot connect to QMP socket {path}; is QEMU running with -qmp unix:{path},server,nowait?"
    )]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up the connected socket (timeout, second handle) failed.
    #[error("cannot set up the QMP socket; QEMU may have exited")]
    Socket(#[source] std::io::Error),
    /// Sending a command failed.
    #[error("cannot send {command} to QEMU over QMP; QEMU may have exited")]
    Send {
        /// Command name.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading from the socket failed.
    #[error("reading from the QMP socket failed; QEMU may have exited")]
    Receive(#[source] std::io::Error),
    /// The server closed the connection.
    #[error("QEMU closed the QMP connection; check its log for the reason")]
    Closed,
    /// A line exceeded [`MAX_LINE`].
    #[error("QMP line longer than {MAX_LINE} bytes; refusing it")]
    LineTooLong,
    /// A line was not JSON.
    #[error("QMP sent invalid JSON")]
    Json(#[source] serde_json::Error),
    /// The first line was not a greeting.
    #[error("QMP greeting missing (got {0}); is this a QMP socket?")]
    NoGreeting(String),
    /// QEMU answered with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// Command name.
        command: String,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// A reply did not look like QMP.
    #[error("unexpected QMP reply {0}")]
    Unexpected(String),
    /// A wait exceeded its deadline.
    #[error("timed out after {0:?} waiting for QEMU; it may be hung")]
    Timeout(Duration),
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: Vec<Value>,
    greeting: Value,
}

impl Qmp {
    /// Connect to `path`, read the greeting and negotiate capabilities.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_stream(s)
    }

    /// Connect, retrying until `timeout` (QEMU creates the socket a little
    /// after it starts).
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let t0 = Instant::now();
        loop {
            match Self::connect(path) {
                Ok(q) => return Ok(q),
                Err(e) if t0.elapsed() >= timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Use an already connected stream (for tests and socket pairs).
    pub fn from_stream(s: UnixStream) -> Result<Self, QmpError> {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(QmpError::Socket)?;
        let writer = s.try_clone().map_err(QmpError::Socket)?;
        let mut q = Self {
            reader: BufReader::new(s),
            writer,
            next_id: 1,
            events: Vec::new(),
            greeting: Value::Null,
        };
        let g = q.read_value()?;
        if g.get("QMP").is_none() {
            return Err(QmpError::NoGreeting(g.to_string()));
        }
        q.greeting = g;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The server's greeting (contains the QEMU version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Set the timeout for each read from QEMU.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), QmpError> {
        self.writer
            .set_read_timeout(Some(t))
            .map_err(QmpError::Socket)
    }

    fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let buf = self.reader.fill_buf().map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => QmpError::Timeout(
                    self.writer
                        .read_timeout()
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                ),
                _ => QmpError::Receive(e),
            })?;
            if buf.is_empty() {
                return Err(QmpError::Closed);
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if line.len() + take > MAX_LINE {
                return Err(QmpError::LineTooLong);
            }
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if done {
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    line.clear();
                    continue;
                }
                return serde_json::from_slice(trimmed).map_err(QmpError::Json);
            }
        }
    }

    fn push_event(&mut self, v: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(v);
    }

    /// Run `command` with optional `arguments`; returns the `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Send {
                command: command.to_string(),
                source,
            })?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.push_event(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Unexpected(v.to_string()));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Unexpected(v.to_string()));
        }
    }

    /// Events received so far (oldest first); clears the queue.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Pause the guest's vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(|_| ())
    }

    /// Resume the guest's vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(|_| ())
    }

    /// The run state (`running`, `paused`, `inmigrate`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Unexpected(v.to_string()))
    }

    /// Ask QEMU to exit. The connection closes as it does.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A scripted fake QMP server on a socket pair.
    fn fake(script: Vec<&'static str>) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().expect("pair");
        let h = std::thread::spawn(move || {
            let mut b = b;
            let mut got = Vec::new();
            let mut r = BufReader::new(b.try_clone().expect("clone"));
            b.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .expect("w");
            for reply in script {
                let mut l = String::new();
                if r.read_line(&mut l).expect("read") == 0 {
                    break;
                }
                got.push(l.trim().to_string());
                b.write_all(reply.as_bytes()).expect("w");
            }
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            got
        });
        (a, h)
    }

    #[test]
    fn negotiates_runs_commands_and_queues_events() {
        let (s, h) = fake(vec![
            "{\"return\": {}, \"id\": 1}\n",
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {}, \"id\": 2}\n",
            "{\"return\": {\"status\": \"paused\", \"running\": false}, \"id\": 3}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 4}\n",
        ]);
        let mut q = Qmp::from_stream(s).expect("connect");
        q.stop().expect("stop");
        assert_eq!(q.status().expect("status"), "paused");
        match q.execute("bogus", Some(json!({"x": 1}))) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        let ev = q.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["event"], "STOP");
        drop(q);
        let got = h.join().expect("join");
        assert!(got[0].contains("qmp_capabilities"));
        assert!(got[3].contains("\"arguments\":{\"x\":1}"));
    }

    #[test]
    fn rejects_non_qmp_and_mismatched_ids() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut bw = b.try_clone().expect("clone");
        bw.write_all(b"{\"hello\": 1}\n").expect("w");
        assert!(matches!(Qmp::from_stream(a), Err(QmpError::NoGreeting(_))));
        drop(b);

        let (s, _h) = fake(vec![
            "{\"return\": {}, \"id\": 1}\n",
            "{\"return\": {}, \"id\": 99}\n",
        ]);
        let mut q = Qmp::from_stream(s).expect("connect");
        assert!(matches!(q.cont(), Err(QmpError::Unexpected(_))));
    }

    #[test]
    fn closed_and_oversized_lines_are_errors() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(b);
        assert!(matches!(Qmp::from_stream(a), Err(QmpError::Closed)));

        let (a, b) = UnixStream::pair().expect("pair");
        let h = std::thread::spawn(move || {
            let mut b = b;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..17 {
                if b.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert!(matches!(Qmp::from_stream(a), Err(QmpError::LineTooLong)));
        h.join().expect("join");
    }
}
