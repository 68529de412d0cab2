//! What the engine tells its caller as it goes.

/// One step of progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyEvent {
    /// A bulk copy or hash resync starts and will cover this many bytes.
    Planned {
        /// Bytes to go through.
        bytes: u64,
    },
    /// Bytes of the planned set are dealt with (copied, or compared equal).
    Done {
        /// Bytes dealt with since the last event.
        bytes: u64,
    },
    /// Data bytes written to the sink (zero ranges are not counted).
    Data {
        /// Bytes written since the last event.
        bytes: u64,
    },
}

/// Receives the engine's [`CopyEvent`]s. Called on the copying thread;
/// keep it cheap.
pub trait Progress {
    /// Something advanced.
    fn report(&self, event: CopyEvent);
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn report(&self, _event: CopyEvent) {}
}
