use understudy_memsync::sync::SyncError;
use understudy_peer::PeerError;

/// Failures of a VM migration, by the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmMigrationError {
    /// Sending a message on the VM link failed.
    #[error("sending {what} to the target failed; the guest stays on the source")]
    Send {
        /// The message.
        what: &'static str,
        /// The link error.
        #[source]
        source: PeerError,
    },
    /// Receiving a message on the VM link failed.
    #[error("waiting for {what} from the peer failed; check that the peer daemon is running")]
    Recv {
        /// The message waited for.
        what: &'static str,
        /// The link error.
        #[source]
        source: PeerError,
    },
    /// The peer sent something else than expected.
    #[error(
        "expected {expected} from the peer, got message type {got:#06x}; both daemons must run the same version"
    )]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// The message type received.
        got: u16,
    },
    /// A message could not be decoded.
    #[error("malformed {what} message; both daemons must run the same version")]
    Decode {
        /// The message.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A message could not be encoded.
    #[error("cannot encode {what}")]
    Encode {
        /// The message.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The peer refused or aborted the migration.
    #[error("the peer refused the migration: {message}")]
    Refused {
        /// Its reason.
        message: String,
    },
    /// Reading the guest's RAM file failed.
    #[error("reading the RAM file {path} failed; is the VM still running?")]
    ReadRam {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A RAM checkpoint failed (link or codec).
    #[error("RAM checkpoint failed; the guest stays on the source")]
    Checkpoint {
        /// The sync error.
        #[source]
        source: SyncError,
    },
    /// Reading or writing QEMU's device-state stream failed.
    #[error("the device-state stream broke while {doing}")]
    StateStream {
        /// What was being done.
        doing: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Pausing or resuming the guest for throttling failed.
    #[error("throttling the guest failed: {message}; the migration stops and the guest resumes")]
    Guest {
        /// What the guest control said.
        message: String,
    },
}
