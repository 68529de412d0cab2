//! RAM pre-copy: checkpoints of the guest's RAM file while it runs, the
//! convergence test, and a stop/cont duty-cycle throttle for guests that
//! dirty memory faster than the link carries it.
//!
//! Dirty pages are found by the memsync hash scan ([`DirtyTracker`]): the
//! whole RAM file is read and every page hashed each round, so a round
//! costs a fixed scan time per GiB of guest RAM (docs/vm.md gives the
//! numbers) plus the encoding of the dirty pages. That scan is also the
//! floor of the pause, since the last round runs with the guest stopped.
//!
//! [`DirtyTracker`]: understudy_memsync::image::DirtyTracker

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use understudy_memsync::PAGE_SIZE;
use understudy_memsync::sync::{Primary, SyncConfig, Transport};

use crate::VmMigrationError;

/// Pause and resume the guest's vCPUs (QMP `stop` / `cont`).
pub trait Guest: Send + Sync {
    /// Pause the vCPUs.
    fn pause(&self) -> Result<(), String>;
    /// Resume the vCPUs.
    fn resume(&self) -> Result<(), String>;
}

/// When to stop iterating.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyConfig {
    /// Switch over once a round (scan + encode + transfer) fits this.
    pub max_downtime: Duration,
    /// Rounds without convergence before the throttle starts.
    pub rounds_before_throttle: u32,
    /// Switch over after this many rounds whatever the estimate.
    pub max_rounds: u32,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            rounds_before_throttle: 4,
            max_rounds: 30,
        }
    }
}

/// What one round did.
#[derive(Clone, Copy, Debug)]
pub struct RoundReport {
    /// Checkpoint sequence number.
    pub seq: u64,
    /// Dirty pages sent.
    pub dirty_pages: u64,
    /// Encoded bytes.
    pub wire_bytes: u64,
    /// Reading the RAM file.
    pub read: Duration,
    /// Hash scan and encode.
    pub encode: Duration,
    /// Transfer until the target's acknowledgement.
    pub transfer: Duration,
    /// Time since the previous round started (the dirtying interval).
    pub interval: Duration,
}

impl RoundReport {
    /// The pause a final round like this one would cost.
    pub fn cost(&self) -> Duration {
        self.read + self.encode + self.transfer
    }
    /// Bytes the guest dirtied per second during the interval.
    /// Zero for the first round (it sends everything; no interval).
    pub fn dirty_rate(&self) -> u64 {
        if self.interval.is_zero() {
            return 0;
        }
        let s = self.interval.as_secs_f64().max(1e-3);
        (self.dirty_pages as f64 * PAGE_SIZE as f64 / s) as u64
    }
}

/// The source's side of the RAM link: reads the RAM file and sends
/// content-patch checkpoints of what changed since the last one.
#[derive(Debug)]
pub struct RamSender {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    primary: Primary,
    last_start: Option<Instant>,
}

impl RamSender {
    /// A sender for the RAM file at `path` of `bytes` bytes.
    pub fn open(path: &Path, bytes: u64) -> Result<Self, VmMigrationError> {
        let file = File::open(path).map_err(|source| VmMigrationError::ReadRam {
            path: path.display().to_string(),
            source,
        })?;
        let pages = bytes / PAGE_SIZE as u64;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            buf: vec![0; (pages as usize) * PAGE_SIZE],
            primary: Primary::new(sync_config(pages)),
            last_start: None,
        })
    }

    /// Start the checkpoint session on the RAM link.
    pub fn handshake<T: Transport>(&mut self, t: &mut T) -> Result<(), VmMigrationError> {
        self.primary
            .handshake(t)
            .map_err(|source| VmMigrationError::Checkpoint { source })
    }

    /// One round: read the RAM file, send what changed, wait for the ACK.
    pub fn round<T: Transport>(&mut self, t: &mut T) -> Result<RoundReport, VmMigrationError> {
        let t0 = Instant::now();
        let interval = self.last_start.map_or(Duration::ZERO, |s| t0 - s);
        self.last_start = Some(t0);
        self.file
            .read_exact_at(&mut self.buf, 0)
            .map_err(|source| VmMigrationError::ReadRam {
                path: self.path.display().to_string(),
                source,
            })?;
        let read = t0.elapsed();
        let r = self
            .primary
            .checkpoint(t, &self.buf)
            .map_err(|source| VmMigrationError::Checkpoint { source })?;
        Ok(RoundReport {
            seq: r.seq,
            dirty_pages: r.dirty_pages,
            wire_bytes: r.wire_bytes,
            read,
            encode: r.encode,
            transfer: r.transfer,
            interval,
        })
    }
}

/// The memsync settings both ends use for a RAM image of `pages` pages.
/// Not durable: the RAM file lives on a tmpfs, and a crash of either
/// daemon before the commit leaves the guest on the source anyway.
pub fn sync_config(pages: u64) -> SyncConfig {
    let mut c = SyncConfig::new(pages);
    c.durable = false;
    c
}

/// Whether a round this cheap lets the switch-over fit the downtime.
pub fn converged(r: &RoundReport, cfg: &PrecopyConfig) -> bool {
    r.cost() <= cfg.max_downtime
}

/// The throttle duty (percent of time paused) for round `round` after
/// `non_converged` rounds that did not fit: off, then 50, 75, 90 %.
pub fn throttle_duty(cfg: &PrecopyConfig, non_converged: u32) -> u32 {
    match non_converged.saturating_sub(cfg.rounds_before_throttle) {
        0 => 0,
        1..=2 => 50,
        3..=4 => 75,
        _ => 90,
    }
}

/// A stop/cont duty cycle on the guest, in a thread: each 100 ms period
/// the guest is paused for `duty` percent of it. Dropping or
/// [`Throttle::finish`] resumes the guest.
#[derive(Debug)]
pub struct Throttle {
    duty: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

const PERIOD: Duration = Duration::from_millis(100);

impl Throttle {
    /// Start with the duty off.
    pub fn start(guest: Arc<dyn Guest>) -> Self {
        let duty = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (duty.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vm-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let pct = d.load(Ordering::SeqCst).min(95);
                    if pct == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    guest.pause()?;
                    std::thread::sleep(PERIOD * pct / 100);
                    guest.resume()?;
                    std::thread::sleep(PERIOD * (100 - pct) / 100);
                }
                Ok(())
            })
            .ok();
        Self { duty, stop, thread }
    }

    /// Set the duty (percent paused).
    pub fn set(&self, pct: u32) {
        self.duty.store(pct, Ordering::SeqCst);
    }

    /// The current duty.
    pub fn duty(&self) -> u32 {
        self.duty.load(Ordering::SeqCst)
    }

    /// Stop the duty cycle; the guest is running when this returns Ok.
    pub fn finish(mut self) -> Result<(), VmMigrationError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), VmMigrationError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(message))) => Err(VmMigrationError::Guest { message }),
            Some(Err(_)) => Err(VmMigrationError::Guest {
                message: "the throttle thread panicked".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            tracing::warn!("ending the throttle: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use understudy_memsync::sync::{Backup, BackupImage};
    use understudy_peer::{PeerConfig, PeerKey};

    fn cfg(id: &str) -> PeerConfig {
        let mut c =
            PeerConfig::new(PeerKey::from_bytes(&(0u8..32).collect::<Vec<u8>>()).unwrap()).unwrap();
        c.node_id = id.into();
        c
    }

    #[test]
    fn rounds_copy_the_ram_file_and_send_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.ram");
        let dst = dir.path().join("dst.ram");
        let pages = 256u64;
        let mut data = vec![0u8; pages as usize * PAGE_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 7) as u8;
        }
        std::fs::write(&src, &data).unwrap();
        let (mut a, mut b) = understudy_peer::Link::pair(&cfg("a"), &cfg("b"), RAM).unwrap();
        let dst2 = dst.clone();
        let t = std::thread::spawn(move || {
            let img = BackupImage::open(&dst2, pages, false).unwrap();
            let mut backup = Backup::new(sync_config(pages), img).unwrap();
            backup.serve(&mut b).unwrap()
        });
        let mut s = RamSender::open(&src, data.len() as u64).unwrap();
        s.handshake(&mut a).unwrap();
        let r1 = s.round(&mut a).unwrap();
        assert!(r1.dirty_pages > 0);
        data[5 * PAGE_SIZE] ^= 0xff;
        std::fs::write(&src, &data).unwrap();
        let r2 = s.round(&mut a).unwrap();
        assert_eq!(r2.dirty_pages, 1);
        a.shutdown("done").unwrap();
        assert_eq!(t.join().unwrap(), 2);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
    }

    const RAM: &str = crate::RAM_PURPOSE;

    #[test]
    fn throttle_starts_after_the_allowed_rounds_and_grows() {
        let c = PrecopyConfig::default();
        assert_eq!(throttle_duty(&c, 4), 0);
        assert_eq!(throttle_duty(&c, 5), 50);
        assert_eq!(throttle_duty(&c, 7), 75);
        assert_eq!(throttle_duty(&c, 20), 90);
    }
}
