use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::key::KeyProblem;
use crate::wire::VersionRange;

/// Errors of the peer link: one variant per failed operation.
///
/// After any error from sending or receiving a frame (except
/// [`PeerError::Remote`], which is a well-formed report from the peer) that
/// direction of the link is dead: every later call fails with
/// [`PeerError::LinkDead`]. Reconnect to carry on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The configuration is invalid.
    #[error("invalid peer link configuration: {reason}")]
    Config {
        /// What is wrong, in words.
        reason: String,
    },
    /// Reading the key file failed.
    #[error("cannot read peer key file {path}: check the path and its permissions")]
    KeyRead {
        /// Key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The key file content is not an acceptable key.
    #[error(
        "peer key file {path} is not usable: {problem}; create a new one with at least 32 random \
         bytes (raw, or as 64+ hex digits)"
    )]
    KeyInvalid {
        /// Key file (empty for keys given as bytes).
        path: PathBuf,
        /// What is wrong with it (bad input, described in the message).
        problem: KeyProblem,
    },
    /// Writing a new key file failed.
    #[error(
        "cannot create peer key file {path}: check that the directory exists and that no file of \
         that name is there already"
    )]
    KeyWrite {
        /// Key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes from the operating system")]
    Random {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding a listening socket failed.
    #[error("cannot listen on {addr}: check that the address is local and the port is free")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("accepting a peer connection failed")]
    Accept {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Connecting to a peer failed.
    #[error("cannot connect to peer at {addr}: check that its daemon runs and listens there")]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Configuring the socket (timeouts, no-delay, cloning) failed.
    #[error("cannot configure the peer connection's socket")]
    Socket {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Starting the listener's accept thread failed.
    #[error("cannot start the peer accept thread: the process may be out of threads")]
    AcceptThread {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Starting the link's keepalive thread failed.
    #[error("cannot start the peer link's keepalive thread: the process may be out of threads")]
    KeepaliveThread {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving during the handshake failed.
    #[error("peer handshake failed on the network: check the peer's log")]
    HandshakeIo {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The handshake did not finish in time.
    #[error(
        "peer handshake did not finish within {after:?}: the peer is too slow, hung, or not an \
         understudy daemon"
    )]
    HandshakeTimeout {
        /// The configured handshake timeout.
        after: Duration,
    },
    /// The peer closed the connection during the handshake.
    #[error(
        "peer closed the connection during the handshake: check the peer's log (it may have \
         rejected our key, version or node id)"
    )]
    HandshakeClosed,
    /// The peer's first bytes are not our magic.
    #[error(
        "peer is not an understudy peer link (it sent {got:02x?} instead of \"USTDYPR1\"): check \
         the address and port"
    )]
    BadMagic {
        /// The eight bytes received.
        got: [u8; 8],
    },
    /// We use the pre-shared-key link but the peer started a TLS handshake.
    #[error(
        "peer started a TLS handshake but this daemon runs the pre-shared-key link \
         (authenticated, NOT encrypted): configure both daemons with TLS certificates \
         (--peer-tls-cert/--peer-tls-key/--peer-tls-ca) or both with --peer-key"
    )]
    PeerSpeaksTls,
    /// We use TLS but the peer sent something else first.
    #[error(
        "peer did not start a TLS handshake (it sent {got:02x?}{hint}): configure both daemons \
         with TLS certificates (--peer-tls-cert/--peer-tls-key/--peer-tls-ca) or both with \
         --peer-key"
    )]
    NotTls {
        /// The first bytes received.
        got: Vec<u8>,
        /// What they look like, in words.
        hint: &'static str,
    },
    /// The TLS handshake or a certificate check failed. The source says
    /// which certificate was wrong and how (expired, unknown CA, wrong
    /// name, or the peer refused ours).
    #[error("TLS peer link refused")]
    Tls {
        /// What failed (boxed: it is large and rare).
        #[source]
        source: Box<understudy_tls::TlsError>,
    },
    /// Setting up TLS (loading certificates, building configurations)
    /// failed.
    #[error("cannot set up TLS for the peer link")]
    TlsSetup {
        /// What failed (boxed: it is large and rare).
        #[source]
        source: Box<understudy_tls::TlsError>,
    },
    /// We dialled one node and reached another.
    #[error(
        "connected to node {got:?} but expected {expected:?}: check the address, or which node \
         should be there"
    )]
    UnexpectedPeer {
        /// The node we dialled.
        expected: String,
        /// The node that answered.
        got: String,
    },
    /// The peer's hello is malformed.
    #[error("peer sent a malformed hello ({reason}): check that it runs a compatible release")]
    MalformedHello {
        /// What is wrong, in words.
        reason: String,
    },
    /// No protocol version in common.
    #[error("peer speaks protocol versions {theirs}, we speak {ours}: upgrade the older side")]
    VersionMismatch {
        /// Our range.
        ours: VersionRange,
        /// The peer's range.
        theirs: VersionRange,
    },
    /// The peer's proof of the key did not verify.
    #[error("peer failed authentication: check that both sides use the same --peer-key file")]
    Authentication,
    /// The peer claims our own node id.
    #[error(
        "peer claims our own node id {node_id}: give every node a distinct node id (or the \
         connection was reflected back to us)"
    )]
    SelfConnection {
        /// The shared node id.
        node_id: String,
    },
    /// The handshake was used after it had failed or finished.
    #[error("peer handshake already failed or finished: start a new connection")]
    HandshakeOver,
    /// Sending a frame failed.
    #[error("sending to peer failed: the link is dead, reconnect")]
    Send {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer did not take our data in time.
    #[error("peer took no data for {after:?}: it is hung or the network is down; reconnect")]
    SendTimeout {
        /// The configured write timeout.
        after: Duration,
    },
    /// Receiving a frame failed.
    #[error("receiving from peer failed: the link is dead, reconnect")]
    Recv {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer sent nothing in time.
    #[error(
        "peer sent nothing for {after:?} (not even a keepalive): it is hung or the network is \
         down; reconnect"
    )]
    RecvTimeout {
        /// The configured read timeout.
        after: Duration,
    },
    /// The connection ended between frames without a Goodbye.
    #[error("peer closed the connection without a goodbye: check the peer's log")]
    Disconnected,
    /// The connection ended in the middle of a frame.
    #[error("peer connection ended in the middle of a frame: check the peer's log")]
    Truncated,
    /// The peer closed the link cleanly.
    #[error("peer closed the link: {reason}")]
    PeerClosed {
        /// The reason the peer gave (sanitised).
        reason: String,
    },
    /// An incoming frame claims a payload larger than we accept.
    #[error(
        "peer sent a frame of {len} bytes, more than our limit of {max}: raise max_payload on \
         this side or send smaller chunks on the other"
    )]
    FrameTooLarge {
        /// Claimed payload length.
        len: u64,
        /// Our limit.
        max: u32,
    },
    /// An outgoing payload is larger than the peer accepts.
    #[error(
        "payload of {len} bytes is larger than the peer accepts ({max} bytes): send smaller \
         chunks or raise max_payload on the peer"
    )]
    PayloadTooLarge {
        /// Payload length.
        len: u64,
        /// The peer's limit.
        max: u32,
    },
    /// A frame failed its integrity check.
    #[error(
        "frame {seq} from peer failed its integrity check (corrupted or forged): the link is \
         closed, reconnect"
    )]
    Integrity {
        /// The sequence number we expected.
        seq: u64,
    },
    /// A frame arrived out of order.
    #[error(
        "frame from peer has sequence number {got}, expected {expected} (replayed, reordered or \
         dropped): the link is closed, reconnect"
    )]
    Sequence {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
    /// The peer broke the protocol in a frame that was authentic.
    #[error(
        "peer broke the link protocol ({reason}): check that both sides run compatible releases"
    )]
    Protocol {
        /// What happened, in words.
        reason: String,
    },
    /// The application tried to send a reserved message type.
    #[error(
        "message type {msg_type:#06x} is reserved for the link layer: use a type from the \
         service's range (0x0100 and up)"
    )]
    ReservedType {
        /// The type.
        msg_type: u16,
    },
    /// The peer reported an error.
    #[error("peer reported error {code}: {message}")]
    Remote {
        /// Error code (see `error_code`).
        code: u32,
        /// The peer's message (sanitised).
        message: String,
    },
    /// The link failed earlier.
    #[error("the peer link failed earlier: reconnect")]
    LinkDead,
    /// Shutting the connection down failed.
    #[error("closing the peer connection failed")]
    Shutdown {
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl PeerError {
    /// Whether the peer closed the link on purpose (a Goodbye).
    pub fn is_clean_close(&self) -> bool {
        matches!(self, PeerError::PeerClosed { .. })
    }

    /// Whether the error means the key, version or identity is wrong, so
    /// retrying the same connection cannot help.
    pub fn is_handshake_rejection(&self) -> bool {
        matches!(
            self,
            PeerError::Authentication
                | PeerError::VersionMismatch { .. }
                | PeerError::SelfConnection { .. }
                | PeerError::BadMagic { .. }
                | PeerError::MalformedHello { .. }
                | PeerError::PeerSpeaksTls
                | PeerError::NotTls { .. }
                | PeerError::Tls { .. }
                | PeerError::UnexpectedPeer { .. }
        )
    }
}
