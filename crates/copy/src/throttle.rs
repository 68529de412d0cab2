//! The rate limit, with a clock that tests can replace.

use std::time::{Duration, Instant};

/// Time as the throttle sees it.
pub trait Clock: Send {
    /// Time since the clock was made.
    fn elapsed(&self) -> Duration;
    /// Wait `d`.
    fn sleep(&mut self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Keeps the average rate since its start at or below a limit: after `n`
/// bytes in total it sleeps until `n / rate` seconds have passed.
pub struct Throttle {
    rate: Option<u64>,
    bytes: u64,
    clock: Box<dyn Clock>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("rate", &self.rate)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Throttle {
    /// At most `rate` bytes per second (`None`: unlimited), on the real clock.
    pub fn new(rate: Option<u64>) -> Self {
        Self::with_clock(rate, Box::new(SystemClock::new()))
    }

    /// Like [`Throttle::new`] on `clock`.
    pub fn with_clock(rate: Option<u64>, clock: Box<dyn Clock>) -> Self {
        Self {
            rate,
            bytes: 0,
            clock,
        }
    }

    /// `n` more bytes went out: wait until the rate allows them.
    pub fn account(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate.max(1) as f64);
        let el = self.clock.elapsed();
        if due > el {
            self.clock.sleep(due - el);
        }
    }

    /// The clock's time since the start (for checkpoints).
    pub fn elapsed(&self) -> Duration {
        self.clock.elapsed()
    }
}
