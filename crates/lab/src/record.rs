//! Trace recorder: boot a small Linux guest under QEMU TCG with its RAM in
//! a shared file, run a workload, and every interval stop the guest over
//! QMP, copy the RAM file into the trace and resume.
//!
//! The interval is guest run time: the guest is paused while its RAM is
//! copied, so the copy time does not count.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use understudy_memsync::trace::image_name;
use understudy_qmp::{Qmp, QmpError};

/// What to record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordOptions {
    /// QEMU binary. Default: `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Guest kernel (`scripts/guest/build.sh` output; see
    /// [`GuestArtefacts`](crate::GuestArtefacts)).
    pub kernel: PathBuf,
    /// Guest initramfs with the workloads.
    pub initrd: PathBuf,
    /// Workload name (`mode=` on the kernel command line).
    pub workload: String,
    /// Guest RAM in MiB. Default: 128.
    pub mem_mib: u32,
    /// Guest run time between checkpoints.
    pub interval: Duration,
    /// Number of images to record.
    pub count: usize,
    /// Trace directory (created).
    pub out_dir: PathBuf,
    /// Run time after the workload reports it started, before image 0.
    /// Default: 500 ms.
    pub warmup: Duration,
    /// Limit for the guest to boot and start the workload. Default: 120 s.
    pub boot_timeout: Duration,
    /// Where the RAM file lives (a tmpfs). Default: `/dev/shm`.
    pub ram_dir: PathBuf,
}

impl RecordOptions {
    /// Options with defaults for the given artefacts and workload.
    pub fn new(
        kernel: PathBuf,
        initrd: PathBuf,
        workload: &str,
        interval: Duration,
        count: usize,
        out_dir: PathBuf,
    ) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel,
            initrd,
            workload: workload.to_string(),
            mem_mib: 128,
            interval,
            count,
            out_dir,
            warmup: Duration::from_millis(500),
            boot_timeout: Duration::from_secs(120),
            ram_dir: PathBuf::from("/dev/shm"),
        }
    }
}

/// What a recording did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordReport {
    /// Images written.
    pub images: usize,
    /// Bytes per image.
    pub image_bytes: u64,
    /// Mean guest pause per checkpoint (stop, copy, cont), ms.
    pub mean_pause_ms: f64,
    /// Longest pause, ms.
    pub max_pause_ms: f64,
    /// Wall time of the recording loop, s.
    pub wall_s: f64,
}

/// Failures of the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A guest artefact is missing.
    #[error("guest artefact {} not found; run scripts/guest/build.sh first", path.display())]
    Missing {
        /// The kernel or initramfs looked for.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{what} failed for {path}")]
    Io {
        /// Operation.
        what: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start {}; install qemu-system-x86", qemu.display())]
    Spawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited early.
    #[error("QEMU exited early ({status}); serial log tail: {log}")]
    Exited {
        /// Exit status.
        status: String,
        /// End of the serial log.
        log: String,
    },
    /// The workload did not start in time.
    #[error("workload {workload} did not start within {timeout:?}; serial log tail: {log}")]
    BootTimeout {
        /// Workload.
        workload: String,
        /// Limit.
        timeout: Duration,
        /// End of the serial log.
        log: String,
    },
    /// A QMP command failed.
    #[error("QMP: {what} failed")]
    Qmp {
        /// What the recorder asked of QEMU.
        what: &'static str,
        /// Cause.
        #[source]
        source: QmpError,
    },
}

/// A running recorder guest. Kills QEMU and removes the RAM file and
/// sockets on every exit path.
struct Guest {
    child: Child,
    ram: PathBuf,
    tmp: PathBuf,
    log: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Guest {
    /// An error if QEMU has exited.
    fn check_alive(&mut self) -> Result<(), RecordError> {
        match self.child.try_wait() {
            Ok(Some(st)) => Err(RecordError::Exited {
                status: st.to_string(),
                log: tail(&self.log),
            }),
            _ => Ok(()),
        }
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read(p).unwrap_or_default();
    let from = s.len().saturating_sub(600);
    String::from_utf8_lossy(&s[from..]).into_owned()
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn qmp_err(what: &'static str) -> impl FnOnce(QmpError) -> RecordError {
    move |source| RecordError::Qmp { what, source }
}

/// Record a trace into `o.out_dir`: boot the guest, wait for its workload
/// to start, let it warm up, then take `o.count` images, one every
/// `o.interval` of guest run time. QEMU is killed and its RAM file removed
/// on every exit path.
pub fn record(o: &RecordOptions) -> Result<RecordReport, RecordError> {
    for p in [&o.kernel, &o.initrd] {
        if !p.is_file() {
            return Err(RecordError::Missing { path: p.clone() });
        }
    }
    std::fs::create_dir_all(&o.out_dir).map_err(io("creating the trace directory", &o.out_dir))?;
    let mut g = start(o)?;
    let sock = g.tmp.join("qmp.sock");
    let mut qmp = Qmp::connect_retry(&sock, Duration::from_secs(20))
        .map_err(qmp_err("connecting to QEMU"))?;
    wait_for_workload(&mut g, o)?;
    std::thread::sleep(o.warmup);
    let report = checkpoints(&mut g, &mut qmp, o)?;
    let _ = qmp.quit();
    drop(g);
    Ok(report)
}

/// Start QEMU with its RAM in a file under `o.ram_dir` and its QMP socket
/// and serial log in a fresh temporary directory.
fn start(o: &RecordOptions) -> Result<Guest, RecordError> {
    let tag = format!(
        "understudy-rec-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(o.mem_mib)
    );
    let tmp = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&tmp).map_err(io("creating a temporary directory", &tmp))?;
    let ram = o.ram_dir.join(format!("{tag}.ram"));
    let sock = tmp.join("qmp.sock");
    let log = tmp.join("serial.log");
    let mem = format!("{}M", o.mem_mib);
    let child = Command::new(&o.qemu)
        .args([
            "-accel",
            "tcg",
            "-machine",
            "pc,memory-backend=mem",
            "-m",
            &mem,
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
            ram.display()
        ))
        .args([
            "-nodefaults",
            "-vga",
            "none",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&o.kernel)
        .arg("-initrd")
        .arg(&o.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 mode={}", o.workload))
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| RecordError::Spawn {
            qemu: o.qemu.clone(),
            source,
        });
    match child {
        Ok(child) => Ok(Guest {
            child,
            ram,
            tmp,
            log,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Wait until the guest's serial log says the workload started.
fn wait_for_workload(g: &mut Guest, o: &RecordOptions) -> Result<(), RecordError> {
    let t0 = Instant::now();
    loop {
        g.check_alive()?;
        let s = std::fs::read(&g.log).unwrap_or_default();
        if s.windows(14).any(|w| w == b"WORKLOAD-START") {
            break;
        }
        if t0.elapsed() > o.boot_timeout {
            return Err(RecordError::BootTimeout {
                workload: o.workload.clone(),
                timeout: o.boot_timeout,
                log: tail(&g.log),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(workload = %o.workload, boot_s = t0.elapsed().as_secs_f64(), "workload started");
    Ok(())
}

/// Every interval of guest run time: stop the guest, copy its RAM into
/// the trace, resume it.
fn checkpoints(
    g: &mut Guest,
    qmp: &mut Qmp,
    o: &RecordOptions,
) -> Result<RecordReport, RecordError> {
    let image_bytes = u64::from(o.mem_mib) << 20;
    let (mut sum, mut max) = (0f64, 0f64);
    let loop_t = Instant::now();
    for i in 0..o.count {
        std::thread::sleep(o.interval);
        let p0 = Instant::now();
        qmp.stop().map_err(qmp_err("stopping the guest"))?;
        let dst = o.out_dir.join(image_name(i));
        std::fs::copy(&g.ram, &dst).map_err(io("copying guest RAM", &dst))?;
        qmp.cont().map_err(qmp_err("resuming the guest"))?;
        let ms = p0.elapsed().as_secs_f64() * 1e3;
        sum += ms;
        max = f64::max(max, ms);
        g.check_alive()?;
    }
    Ok(RecordReport {
        images: o.count,
        image_bytes,
        mean_pause_ms: if o.count > 0 {
            sum / o.count as f64
        } else {
            0.0
        },
        max_pause_ms: max,
        wall_s: loop_t.elapsed().as_secs_f64(),
    })
}
