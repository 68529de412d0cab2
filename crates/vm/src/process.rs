//! One supervised child process: a thread waits for it to exit, records how
//! and tells a listener.
//!
//! The supervisor waits with `waitid(WNOWAIT)`, which leaves the exited
//! child unreaped, then reaps it under the lock that [`Supervised::kill`]
//! also takes. So a kill never hits a reused pid: while the lock is held
//! the child is either running or a zombie, both still ours.

use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// How a VM's QEMU process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Exit code, when it exited on its own.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it (9 for SIGKILL).
    pub signal: Option<i32>,
    /// Whether a stop had been asked for; false means QEMU died on its own
    /// (or was killed from outside).
    pub expected: bool,
    /// How long it ran, in milliseconds.
    pub uptime_ms: u64,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "exit status unknown"),
        }
    }
}

/// Something that happened to a VM, sent to the runner's listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmEvent {
    /// QEMU ended, asked to or not (see [`ExitInfo::expected`]). Also sent
    /// when QEMU dies during a launch that then fails, so a listener may
    /// see it for a name that was never registered.
    Exited {
        /// The VM.
        name: String,
        /// How it ended.
        exit: ExitInfo,
    },
}

struct Shared {
    /// The child until it is reaped.
    child: Mutex<Option<Child>>,
    exit: Mutex<Option<ExitInfo>>,
    exited: Condvar,
    expected: AtomicBool,
}

/// A child process with its supervisor thread. Dropping it kills the child.
pub(crate) struct Supervised {
    pid: u32,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised")
            .field("pid", &self.pid)
            .field("exit", &*self.shared.exit.lock())
            .finish()
    }
}

impl Supervised {
    /// Watch `child`; `name` labels logs and events.
    pub(crate) fn start(
        child: Child,
        name: String,
        events: Option<Sender<VmEvent>>,
    ) -> Result<Self, (std::io::Error, Child)> {
        let pid = child.id();
        let shared = Arc::new(Shared {
            child: Mutex::new(Some(child)),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            expected: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || supervise(&s, pid, &name, events.as_ref()));
        match spawned {
            Ok(t) => Ok(Self {
                pid,
                shared,
                thread: Some(t),
            }),
            Err(e) => {
                let child = shared.child.lock().take();
                Err((e, child.expect("the child is only taken by the supervisor")))
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Mark the coming exit as asked for.
    pub(crate) fn expect_exit(&self) {
        self.shared.expected.store(true, Ordering::SeqCst);
    }

    /// How the child ended, if it has.
    pub(crate) fn exit(&self) -> Option<ExitInfo> {
        self.shared.exit.lock().clone()
    }

    /// Wait up to `timeout` for the child to end.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.exit.lock();
        while g.is_none() {
            if self.shared.exited.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.clone()
    }

    /// SIGKILL the child unless it has been reaped already.
    pub(crate) fn kill(&self) {
        if let Some(c) = self.shared.child.lock().as_mut()
            && let Err(e) = c.kill()
        {
            tracing::debug!(pid = self.pid, error = %e, "SIGKILL failed; QEMU has exited");
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.expect_exit();
        self.kill();
        // Join only once the child is reaped: an unkillable process (stuck
        // in the kernel) must not hang the caller's drop.
        if self.wait_exit(Duration::from_secs(10)).is_some() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            tracing::error!(
                pid = self.pid,
                "QEMU did not die after SIGKILL; leaving its supervisor thread"
            );
        }
    }
}

fn supervise(s: &Shared, pid: u32, name: &str, events: Option<&Sender<VmEvent>>) {
    let t0 = Instant::now();
    if let Err(e) = wait_exited_unreaped(pid) {
        tracing::error!(vm = name, pid, error = %e, "waitid failed; reaping QEMU directly");
    }
    let status = {
        let mut c = s.child.lock();
        let st = c.as_mut().map(Child::wait);
        *c = None;
        st
    };
    let info = exit_info(status, s.expected.load(Ordering::SeqCst), t0.elapsed());
    if info.expected {
        tracing::info!(vm = name, pid, exit = %info, "QEMU exited");
    } else {
        tracing::warn!(vm = name, pid, exit = %info, "QEMU exited unexpectedly");
    }
    *s.exit.lock() = Some(info.clone());
    s.exited.notify_all();
    if let Some(tx) = events {
        // The listener may be gone (the daemon shutting down): nothing to do.
        let _ = tx.send(VmEvent::Exited {
            name: name.to_string(),
            exit: info,
        });
    }
}

fn exit_info(
    status: Option<std::io::Result<ExitStatus>>,
    expected: bool,
    ran: Duration,
) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    let st = status.and_then(Result::ok);
    ExitInfo {
        code: st.and_then(|s| s.code()),
        signal: st.and_then(|s| s.signal()),
        expected,
        uptime_ms: u64::try_from(ran.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Block until `pid` has exited, without reaping it.
fn wait_exited_unreaped(pid: u32) -> std::io::Result<()> {
    let id = libc::id_t::from(pid);
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the call's
        // duration; WNOWAIT leaves the child for Child::wait to reap.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
