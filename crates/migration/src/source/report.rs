//! The one place the job's [`Status`] is written: every step reports
//! through a [`Reporter`], and the copy engine through its [`Progress`]
//! implementation.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use understudy_copy::{CopyEvent, Progress};

use super::{Mode, Phase, Status, error_chain};
use crate::conn::Conn;
use crate::error::MigrationError;
use crate::observer::MigrationObserver;

/// Writes a migration's progress into its shared [`Status`].
#[derive(Debug)]
pub struct Reporter<'a> {
    status: &'a Mutex<Status>,
    started: Instant,
}

impl<'a> Reporter<'a> {
    /// Report into `status`, timing from now.
    pub fn new(status: &'a Mutex<Status>) -> Self {
        Self {
            status,
            started: Instant::now(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        f(&mut self.status.lock())
    }

    /// Entering `phase`.
    pub fn phase(&self, phase: Phase) {
        self.with(|st| st.phase = phase);
    }

    /// Guest writes are mirrored from now on.
    pub fn mirroring(&self) {
        self.with(|st| {
            st.mode = Mode::Mirror;
            st.phase = Phase::Mirroring;
        });
    }

    /// The link is up to `node`.
    pub fn target_node(&self, node: &str) {
        self.with(|st| st.target_node = Some(node.to_owned()));
    }

    /// The target chose how to start (`fresh`, `resume`, ..., `settled`).
    pub fn start(&self, start: String) {
        self.with(|st| st.start = Some(start));
    }

    /// How an ownership in doubt was settled.
    pub fn settled(&self, how: String) {
        self.with(|st| st.settled = Some(how));
    }

    /// The measured copy bandwidth.
    pub fn bandwidth(&self, bw: u64) {
        self.with(|st| st.bandwidth = bw);
    }

    /// Between rounds: what waits, what went.
    pub fn waiting(&self, dirty: u64, conn: &Conn, obs: &MigrationObserver) {
        let total_ms = self.elapsed_ms();
        self.with(|st| {
            st.dirty_bytes = dirty;
            st.bytes_sent = conn.bytes_sent();
            st.mirrored_bytes = obs.mirrored_bytes();
            st.total_ms = total_ms;
        });
    }

    /// `rounds` rounds done; bandwidth now `bw`.
    pub fn round(&self, rounds: u32, bw: u64) {
        self.with(|st| {
            st.rounds = rounds;
            st.bandwidth = bw;
        });
    }

    /// Switched over after holding I/O for `downtime`.
    pub fn switched(&self, downtime: Duration, conn: &Conn, obs: &MigrationObserver) {
        self.with(|st| {
            st.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
            st.dirty_bytes = 0;
            st.bytes_sent = conn.bytes_sent();
            st.mirrored_bytes = obs.mirrored_bytes();
        });
    }

    /// Verify compared `blocks`, of which `mismatched` differed.
    pub fn verified(&self, blocks: u64, mismatched: u64, conn: &Conn) {
        self.with(|st| {
            st.verified_blocks = blocks;
            st.mismatched_blocks = mismatched;
            st.bytes_sent = conn.bytes_sent();
        });
    }

    fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// The end: record the outcome of `export`'s migration, log it, and
    /// return the final status.
    pub fn finish(&self, export: &str, r: &Result<(), MigrationError>) -> Status {
        let total_ms = self.elapsed_ms();
        self.with(|st| {
            st.total_ms = total_ms;
            match r {
                Ok(()) => {
                    st.phase = Phase::Completed;
                    tracing::info!(
                        export = %export, downtime_ms = ?st.downtime_ms, total_ms = st.total_ms,
                        bytes = st.bytes_sent, rounds = st.rounds, mode = ?st.mode,
                        "migration completed"
                    );
                }
                Err(e) => {
                    st.phase = if matches!(e, MigrationError::Cancelled) {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    };
                    st.retryable = e.is_retryable();
                    st.error = Some(error_chain(e));
                    tracing::warn!(export = %export, error = %st.error.as_deref().unwrap_or(""), "migration stopped");
                }
            }
            st.clone()
        })
    }
}

impl Progress for Reporter<'_> {
    fn report(&self, event: CopyEvent) {
        self.with(|st| match event {
            CopyEvent::Planned { bytes } => st.bulk_bytes = bytes,
            CopyEvent::Done { bytes } => st.bulk_done += bytes,
            CopyEvent::Data { bytes } => st.data_bytes += bytes,
            _ => {}
        });
    }
}
