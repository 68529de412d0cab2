//! The server side of the fixed-newstyle handshake, as a sans-I/O push
//! state machine.
//!
//! ```text
//!   new() ──greeting()──► ClientFlags ──4 bytes──► OptionHeader ◄─────────────┐
//!                                                   │ 16 bytes                │
//!                          len > MAX_OPTION_LEN ────┤                         │
//!                                 ▼                 ▼ len ≤ MAX_OPTION_LEN     │
//!                              Discard ──────►  OptionData ──► handle option ─┘
//!                       (reply ERR_TOO_BIG)                      │      │
//!                                           ABORT ──► Event::Abort      │
//!                           GO (ACK) / EXPORT_NAME ──► Event::Transmission
//! ```
//!
//! With a TLS policy ([`Handshake::with_tls`]) `OPT_STARTTLS` is answered
//! with `REP_ACK` and ends `feed` with [`Event::StartTls`]; option haggling
//! resumes, on the encrypted stream, once the I/O layer calls
//! [`Handshake::tls_established`]:
//!
//! ```text
//!   plaintext options ──STARTTLS──► ACK, Event::StartTls ──► (TLS handshake by the caller)
//!        │  Required: every option but STARTTLS/ABORT ─► ERR_TLS_REQD      │ tls_established()
//!        │            EXPORT_NAME ─► HandshakeError::TlsRequired (close)   ▼
//!        │                                             options over TLS (STARTTLS ─► ERR_INVALID)
//!        └─ Allowed: served as without TLS
//! ```
//!
//! Whatever was negotiated in plaintext (structured replies, metadata
//! contexts) is forgotten at the upgrade: a man in the middle could have
//! injected it (nbdkit's CVE-2021-3716).
//!
//! The I/O layer writes [`Handshake::greeting`], then repeatedly hands any
//! received bytes to [`Handshake::feed`], writes whatever `feed` appended to
//! its output buffer, and stops on an [`Event`] or an error (which always
//! means: close the connection). `feed` consumes only the bytes that belong
//! to the handshake, so bytes after the final option stay with the caller.
//!
//! Memory use is bounded: option data is buffered only up to
//! [`MAX_OPTION_LEN`]; longer options are skipped without being stored (up
//! to [`MAX_OPTION_DISCARD`], beyond which the client is cut off).

use crate::meta::{MetaContext, QueryMode, SelectedContext, match_query};
use crate::request::TransmissionInfo;
use crate::wire::*;
use crate::{
    MAX_META_QUERIES, MAX_OPTION_DISCARD, MAX_OPTION_LEN, MAX_OPTIONS, MAX_SELECTED_CONTEXTS,
};

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (a power of two, at most 64 KiB).
    pub min: u32,
    /// Preferred block size (a power of two, at least 512 and `min`).
    pub preferred: u32,
    /// Maximum payload size (at least `preferred`).
    pub max: u32,
}

/// What the handshake needs to know about an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDescriptor {
    /// Canonical name (what `OPT_LIST` shows; the default export resolves
    /// to its real name here).
    pub name: String,
    /// Human-readable description; may be empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without `FLAG_SEND_DF` (the handshake adds it
    /// when structured replies are negotiated, as the protocol requires).
    pub flags: u16,
    /// Block size constraints.
    pub block_size: BlockSize,
    /// Metadata contexts the export offers.
    pub contexts: Vec<MetaContext>,
    /// Serve only over TLS (the protocol's SELECTIVETLS with a TLS-only
    /// export): before the upgrade, `INFO`/`GO` and metadata context
    /// options naming it get `REP_ERR_TLS_REQD` (`REP_ERR_POLICY` on a
    /// server without TLS, which can never serve it), `EXPORT_NAME`
    /// closes the connection, and `LIST` leaves it out.
    pub tls_only: bool,
}

/// One export as `OPT_LIST` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listing<'a> {
    /// Export name.
    pub name: &'a str,
    /// Human-readable description; may be empty.
    pub description: &'a str,
    /// Served only over TLS (see [`ExportDescriptor::tls_only`]): left out
    /// of plaintext listings.
    pub tls_only: bool,
}

/// The export namespace the handshake consults.
pub trait ExportCatalog {
    /// What the transmission phase needs to serve the export (for example
    /// an `Arc` of the export), returned with a successful `GO`.
    type Handle;

    /// Resolve a client-supplied name. The empty name means the default
    /// export. `None` means the export does not exist.
    fn lookup(&self, name: &str) -> Option<(ExportDescriptor, Self::Handle)>;

    /// Call `f` for every export to list.
    fn list(&self, f: &mut dyn FnMut(Listing<'_>));
}

/// The outcome of a finished handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated<H> {
    /// The catalog's handle of the chosen export.
    pub export: H,
    /// Canonical export name.
    pub name: String,
    /// Export size.
    pub size: u64,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Metadata contexts selected for this export (empty unless the last
    /// `SET_META_CONTEXT` named the export finally chosen).
    pub contexts: Vec<SelectedContext>,
    /// Transmission was entered with `OPT_GO` (not `OPT_EXPORT_NAME`).
    pub via_go: bool,
}

impl<H> Negotiated<H> {
    /// The facts request validation needs.
    pub fn transmission(&self) -> TransmissionInfo {
        TransmissionInfo {
            size: self.size,
            flags: self.flags,
            structured: self.structured,
            has_meta_contexts: !self.contexts.is_empty(),
            order: self
                .contexts
                .iter()
                .any(|c| c.context == MetaContext::Order),
        }
    }
}

/// The server's TLS policy, fixed for the life of a connection (the
/// protocol's NOTLS, SELECTIVETLS without TLS-only exports, FORCEDTLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: `OPT_STARTTLS` gets `REP_ERR_POLICY`. Default.
    #[default]
    Off,
    /// TLS offered: `OPT_STARTTLS` upgrades, plaintext clients are served
    /// as without TLS.
    Allowed,
    /// TLS required: until the upgrade every option but `OPT_STARTTLS` and
    /// `OPT_ABORT` gets `REP_ERR_TLS_REQD`, and `OPT_EXPORT_NAME` closes
    /// the connection, so no plaintext client reaches an export.
    Required,
}

/// Something that ends a [`Handshake::feed`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<H> {
    /// The client sent `OPT_STARTTLS` and it was acknowledged in the
    /// output: flush the output, run the TLS handshake on the socket, call
    /// [`Handshake::tls_established`], and feed the decrypted bytes from
    /// then on. The handshake is not over.
    StartTls,
    /// The client sent `OPT_ABORT` (already acknowledged in the output):
    /// flush the output, then close.
    Abort,
    /// Enter the transmission phase once the output is flushed.
    Transmission(Negotiated<H>),
}

/// Result of one [`Handshake::feed`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress<H> {
    /// Bytes of the input that were used.
    pub consumed: usize,
    /// Set when the handshake ended.
    pub event: Option<Event<H>>,
}

/// Reasons to drop the connection during the handshake.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// Client flags had bits this server did not offer.
    #[error(
        "client sent unsupported client flags {0:#x}; it is not a fixed-newstyle NBD client: close the connection"
    )]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error(
        "option header has magic {0:#018x} instead of IHAVEOPT; the peer does not speak NBD or is out of sync: close the connection"
    )]
    OptionMagic(u64),
    /// More options than [`MAX_OPTIONS`].
    #[error(
        "client sent more than {MAX_OPTIONS} options in one handshake: close the connection and check the client"
    )]
    TooManyOptions,
    /// An option longer than [`MAX_OPTION_DISCARD`], or an over-long
    /// `OPT_EXPORT_NAME` (which cannot be answered with an error).
    #[error(
        "option {option} carries {len} bytes, more than this server accepts: close the connection"
    )]
    OptionTooLong {
        /// Option number.
        option: u32,
        /// Announced data length.
        len: u32,
    },
    /// `OPT_EXPORT_NAME` named an export that does not exist; the protocol
    /// has no error reply for it.
    #[error(
        "client asked for unknown export {name:?} with NBD_OPT_EXPORT_NAME: close the connection (list exports with `nbdinfo --list`)"
    )]
    UnknownExport {
        /// The requested name (lossily decoded).
        name: String,
    },
    /// `feed` was called after the handshake ended.
    #[error("the handshake already ended: hand further bytes to the transmission phase")]
    Finished,
    /// `OPT_EXPORT_NAME` arrived before TLS on a server that requires
    /// TLS, or named a TLS-only export; the option cannot be answered with
    /// an error.
    #[error(
        "client chose an export with NBD_OPT_EXPORT_NAME without TLS, but the server or the export requires TLS: close the connection (connect with TLS, e.g. qemu's tls-creds object or an nbds:// URI)"
    )]
    TlsRequired,
    /// `feed` was called after [`Event::StartTls`] but before
    /// [`Handshake::tls_established`].
    #[error(
        "the TLS upgrade is pending: finish the TLS handshake and call tls_established before feeding more bytes"
    )]
    TlsPending,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    Discard {
        option: u32,
        remaining: u32,
    },
    /// `STARTTLS` was acknowledged; waiting for the caller's upgrade.
    StartTls,
    Done,
}

#[derive(Clone, Debug)]
struct MetaSelection {
    export: String,
    contexts: Vec<SelectedContext>,
}

/// Server handshake state.
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    hdr: [u8; OPTION_HEADER_LEN],
    hdr_len: usize,
    data: Vec<u8>,
    no_zeroes: bool,
    /// The client set `FLAG_C_FIXED_NEWSTYLE` (TLS needs it).
    fixed: bool,
    structured: bool,
    options: u32,
    meta: Option<MetaSelection>,
    tls: TlsPolicy,
    tls_active: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A handshake without TLS waiting for the client flags (after the
    /// greeting).
    pub fn new() -> Self {
        Self::with_tls(TlsPolicy::Off)
    }

    /// A handshake with the given TLS policy waiting for the client flags.
    pub fn with_tls(tls: TlsPolicy) -> Self {
        Self {
            phase: Phase::ClientFlags,
            hdr: [0; OPTION_HEADER_LEN],
            hdr_len: 0,
            data: Vec::new(),
            no_zeroes: false,
            fixed: false,
            structured: false,
            options: 0,
            meta: None,
            tls,
            tls_active: false,
        }
    }

    /// The caller finished the TLS handshake after [`Event::StartTls`]:
    /// option haggling resumes on the encrypted stream. Does nothing when
    /// no upgrade is pending.
    pub fn tls_established(&mut self) {
        if self.phase == Phase::StartTls {
            self.phase = Phase::OptionHeader;
            self.tls_active = true;
        }
    }

    /// Whether the connection was upgraded to TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether `option` must be refused because TLS is required and not
    /// up yet.
    fn tls_gate(&self, option: u32) -> bool {
        self.tls == TlsPolicy::Required
            && !self.tls_active
            && option != OPT_STARTTLS
            && option != OPT_ABORT
    }

    /// The refusal for a TLS-only export before TLS is up, if any.
    fn export_gate(&self, desc: &ExportDescriptor) -> Option<u32> {
        match (desc.tls_only && !self.tls_active, self.tls) {
            (false, _) => None,
            // NOTLS must never answer ERR_TLS_REQD.
            (true, TlsPolicy::Off) => Some(REP_ERR_POLICY),
            (true, _) => Some(REP_ERR_TLS_REQD),
        }
    }

    /// The bytes the server sends first.
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        let mut g = [0u8; GREETING_LEN];
        g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    /// Whether the handshake has ended (successfully or by abort).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Consume bytes from the client, appending replies to `out`.
    ///
    /// Stops after the first [`Event`]; bytes after it are not consumed.
    pub fn feed<C: ExportCatalog>(
        &mut self,
        input: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Result<Progress<C::Handle>, HandshakeError> {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match self.phase {
                Phase::Done => {
                    if pos == 0 {
                        return Err(HandshakeError::Finished);
                    }
                    break;
                }
                Phase::StartTls => {
                    if pos == 0 {
                        return Err(HandshakeError::TlsPending);
                    }
                    break;
                }
                Phase::ClientFlags => {
                    pos += self.fill_hdr(rest, 4);
                    if self.hdr_len == 4 {
                        self.hdr_len = 0;
                        let flags = u32::from_be_bytes([
                            self.hdr[0],
                            self.hdr[1],
                            self.hdr[2],
                            self.hdr[3],
                        ]);
                        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                            return Err(HandshakeError::ClientFlags(flags));
                        }
                        // Clients without FIXED_NEWSTYLE only send EXPORT_NAME,
                        // which behaves the same either way.
                        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                        self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                        self.phase = Phase::OptionHeader;
                    }
                }
                Phase::OptionHeader => {
                    pos += self.fill_hdr(rest, OPTION_HEADER_LEN);
                    if self.hdr_len == OPTION_HEADER_LEN {
                        self.hdr_len = 0;
                        if let Some(ev) = self.on_option_header(catalog, out)? {
                            return Ok(Progress {
                                consumed: pos,
                                event: Some(ev),
                            });
                        }
                    }
                }
                Phase::OptionData { option, len } => {
                    let take = (len - self.data.len()).min(rest.len());
                    self.data.extend_from_slice(&rest[..take]);
                    pos += take;
                    if self.data.len() == len {
                        self.phase = Phase::OptionHeader;
                        let data = std::mem::take(&mut self.data);
                        let r = self.on_option(option, &data, catalog, out);
                        self.data = data;
                        self.data.clear();
                        if let Some(ev) = r? {
                            return Ok(Progress {
                                consumed: pos,
                                event: Some(ev),
                            });
                        }
                    }
                }
                Phase::Discard { option, remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    pos += take;
                    let remaining = remaining - take as u32;
                    if remaining == 0 {
                        self.phase = Phase::OptionHeader;
                        if self.tls_gate(option) {
                            reply_tls_reqd(out, option);
                        } else {
                            reply_err(
                                out,
                                option,
                                REP_ERR_TOO_BIG,
                                &format!(
                                    "option data is longer than {MAX_OPTION_LEN} bytes; send a shorter request"
                                ),
                            );
                        }
                    } else {
                        self.phase = Phase::Discard { option, remaining };
                    }
                }
            }
        }
        Ok(Progress {
            consumed: pos,
            event: None,
        })
    }

    fn fill_hdr(&mut self, input: &[u8], want: usize) -> usize {
        let take = (want - self.hdr_len).min(input.len());
        self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[..take]);
        self.hdr_len += take;
        take
    }

    fn on_option_header<C: ExportCatalog>(
        &mut self,
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Result<Option<Event<C::Handle>>, HandshakeError> {
        let h = &self.hdr;
        let magic = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        self.options += 1;
        if self.options > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        if option == OPT_EXPORT_NAME && self.tls_gate(option) {
            // Refused before its name is even read: a downgrade attempt
            // never reaches the catalog.
            return Err(HandshakeError::TlsRequired);
        }
        if len > MAX_OPTION_LEN {
            if len > MAX_OPTION_DISCARD || option == OPT_EXPORT_NAME {
                return Err(HandshakeError::OptionTooLong { option, len });
            }
            self.phase = Phase::Discard {
                option,
                remaining: len,
            };
            return Ok(None);
        }
        if len == 0 {
            self.phase = Phase::OptionHeader;
            return self.on_option(option, &[], catalog, out);
        }
        self.data.clear();
        self.phase = Phase::OptionData {
            option,
            len: len as usize,
        };
        Ok(None)
    }

    fn on_option<C: ExportCatalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Result<Option<Event<C::Handle>>, HandshakeError> {
        tracing::trace!(option, len = data.len(), "handshake option");
        if self.tls_gate(option) {
            reply_tls_reqd(out, option);
            return Ok(None);
        }
        match option {
            OPT_EXPORT_NAME => return self.on_export_name(data, catalog, out).map(Some),
            OPT_ABORT => {
                // Data is ignored, as the protocol asks.
                reply(out, option, REP_ACK, &[]);
                self.phase = Phase::Done;
                return Ok(Some(Event::Abort));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    let hide_tls_only = !self.tls_active;
                    catalog.list(&mut |l| {
                        if l.tls_only && hide_tls_only {
                            return;
                        }
                        let (name, desc) = (l.name, l.description);
                        let len = (name.len() as u32).to_be_bytes();
                        reply(
                            out,
                            option,
                            REP_SERVER,
                            &[&len, name.as_bytes(), desc.as_bytes()],
                        );
                    });
                    reply(out, option, REP_ACK, &[]);
                }
            }
            OPT_STARTTLS => return Ok(self.on_starttls(data, out)),
            OPT_INFO | OPT_GO => return Ok(self.on_info_go(option, data, catalog, out)),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured {
                    reply_err(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "structured replies are already negotiated",
                    );
                } else {
                    self.structured = true;
                    reply(out, option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT => self.on_meta(QueryMode::List, data, catalog, out),
            OPT_SET_META_CONTEXT => self.on_meta(QueryMode::Set, data, catalog, out),
            OPT_EXTENDED_HEADERS => reply_err(
                out,
                option,
                REP_ERR_UNSUP,
                "extended headers are not supported by this server; use compact headers",
            ),
            _ => reply_err(
                out,
                option,
                REP_ERR_UNSUP,
                &format!("option {option} is not supported by this server"),
            ),
        }
        Ok(None)
    }

    fn on_starttls<H>(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<Event<H>> {
        let option = OPT_STARTTLS;
        if !data.is_empty() {
            reply_err(
                out,
                option,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        } else if self.tls == TlsPolicy::Off {
            reply_err(
                out,
                option,
                REP_ERR_POLICY,
                "TLS is not configured on this server; connect without TLS",
            );
        } else if !self.fixed {
            // The protocol keeps clients without fixed newstyle in NOTLS.
            reply_err(
                out,
                option,
                REP_ERR_POLICY,
                "TLS needs fixed newstyle: set NBD_FLAG_C_FIXED_NEWSTYLE",
            );
        } else if self.tls_active {
            reply_err(
                out,
                option,
                REP_ERR_INVALID,
                "TLS is already active on this connection",
            );
        } else {
            reply(out, option, REP_ACK, &[]);
            // Plaintext negotiation could have been injected by a man in
            // the middle: the client renegotiates over TLS.
            self.structured = false;
            self.meta = None;
            self.phase = Phase::StartTls;
            return Some(Event::StartTls);
        }
        None
    }

    fn on_export_name<C: ExportCatalog>(
        &mut self,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Result<Event<C::Handle>, HandshakeError> {
        let unknown = || HandshakeError::UnknownExport {
            name: String::from_utf8_lossy(&data[..data.len().min(MAX_STRING_LEN)]).into_owned(),
        };
        let name = std::str::from_utf8(data).map_err(|_| unknown())?;
        let (desc, handle) = catalog.lookup(name).ok_or_else(unknown)?;
        if self.export_gate(&desc).is_some() {
            return Err(HandshakeError::TlsRequired);
        }
        let flags = self.flags_for(&desc);
        out.extend_from_slice(&desc.size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
        }
        self.phase = Phase::Done;
        let contexts = self.contexts_for(&desc.name);
        Ok(Event::Transmission(Negotiated {
            export: handle,
            name: desc.name,
            size: desc.size,
            flags,
            structured: self.structured,
            contexts,
            via_go: false,
        }))
    }

    fn on_info_go<C: ExportCatalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Option<Event<C::Handle>> {
        let Some((name, rest)) = split_string(data, 2) else {
            reply_err(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO: name length exceeds the option",
            );
            return None;
        };
        let n_info = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let requests = &rest[2..];
        if requests.len() != n_info * 2 {
            reply_err(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO: information request count does not match the option length",
            );
            return None;
        }
        let Some(name) = checked_str(name) else {
            reply_err(
                out,
                option,
                REP_ERR_INVALID,
                "export name must be UTF-8 of at most 4096 bytes",
            );
            return None;
        };
        let (mut want_name, mut want_desc) = (false, false);
        for r in requests.chunks_exact(2) {
            match u16::from_be_bytes([r[0], r[1]]) {
                INFO_NAME => want_name = true,
                INFO_DESCRIPTION => want_desc = true,
                // EXPORT and BLOCK_SIZE are always sent; unknown requests
                // are ignored as the protocol requires.
                _ => {}
            }
        }
        let Some((desc, handle)) = catalog.lookup(name) else {
            reply_err(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("export {name:?} does not exist; list exports with `nbdinfo --list`"),
            );
            return None;
        };
        if let Some(code) = self.export_gate(&desc) {
            reply_export_tls(out, option, code);
            return None;
        }
        let flags = self.flags_for(&desc);
        let mut info = [0u8; 12];
        info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        info[2..10].copy_from_slice(&desc.size.to_be_bytes());
        info[10..12].copy_from_slice(&flags.to_be_bytes());
        reply(out, option, REP_INFO, &[&info]);
        if want_name {
            reply(
                out,
                option,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), desc.name.as_bytes()],
            );
        }
        if want_desc && !desc.description.is_empty() {
            reply(
                out,
                option,
                REP_INFO,
                &[&INFO_DESCRIPTION.to_be_bytes(), desc.description.as_bytes()],
            );
        }
        // Minimum 1 is the protocol default, so sending the constraints
        // unasked is safe for clients that ignore them.
        let mut bs = [0u8; 14];
        bs[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&desc.block_size.min.to_be_bytes());
        bs[6..10].copy_from_slice(&desc.block_size.preferred.to_be_bytes());
        bs[10..14].copy_from_slice(&desc.block_size.max.to_be_bytes());
        reply(out, option, REP_INFO, &[&bs]);
        reply(out, option, REP_ACK, &[]);
        if option != OPT_GO {
            return None;
        }
        self.phase = Phase::Done;
        let contexts = self.contexts_for(&desc.name);
        Some(Event::Transmission(Negotiated {
            export: handle,
            name: desc.name,
            size: desc.size,
            flags,
            structured: self.structured,
            contexts,
            via_go: true,
        }))
    }

    fn on_meta<C: ExportCatalog>(
        &mut self,
        mode: QueryMode,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) {
        let option = match mode {
            QueryMode::List => OPT_LIST_META_CONTEXT,
            QueryMode::Set => OPT_SET_META_CONTEXT,
        };
        if mode == QueryMode::Set {
            // SET replaces the selection even when it fails.
            self.meta = None;
            if !self.structured {
                reply_err(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT",
                );
                return;
            }
        }
        let queries = match parse_meta_request(data) {
            Ok(q) => q,
            Err((code, msg)) => {
                reply_err(out, option, code, msg);
                return;
            }
        };
        let Some((desc, _handle)) = catalog.lookup(queries.export) else {
            reply_err(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!(
                    "export {:?} does not exist; list exports with `nbdinfo --list`",
                    queries.export
                ),
            );
            return;
        };
        if let Some(code) = self.export_gate(&desc) {
            reply_export_tls(out, option, code);
            return;
        }
        let mut selected: Vec<MetaContext> = Vec::new();
        if queries.list.is_empty() {
            if mode == QueryMode::List {
                selected = desc.contexts.clone();
            }
        } else {
            for q in &queries.list {
                if match_query(q, mode, &desc.contexts, &mut selected).is_err() {
                    reply_err(
                        out,
                        option,
                        REP_ERR_INVALID,
                        &format!(
                            "metadata context query {q:?} lacks a namespace (\"namespace:leaf\")"
                        ),
                    );
                    return;
                }
            }
        }
        if mode == QueryMode::Set && selected.len() > MAX_SELECTED_CONTEXTS {
            reply_err(
                out,
                option,
                REP_ERR_TOO_BIG,
                &format!("at most {MAX_SELECTED_CONTEXTS} metadata contexts can be selected"),
            );
            return;
        }
        let mut chosen = Vec::new();
        for (i, ctx) in selected.into_iter().enumerate() {
            // LIST ids are reserved (0); SET ids count from 1.
            let id = match mode {
                QueryMode::List => 0,
                QueryMode::Set => i as u32 + 1,
            };
            reply(
                out,
                option,
                REP_META_CONTEXT,
                &[&id.to_be_bytes(), ctx.name().as_bytes()],
            );
            if mode == QueryMode::Set {
                chosen.push(SelectedContext { id, context: ctx });
            }
        }
        reply(out, option, REP_ACK, &[]);
        if mode == QueryMode::Set {
            self.meta = Some(MetaSelection {
                export: desc.name,
                contexts: chosen,
            });
        }
    }

    fn flags_for(&self, desc: &ExportDescriptor) -> u16 {
        let mut flags = (desc.flags | FLAG_HAS_FLAGS) & !FLAG_SEND_DF;
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    fn contexts_for(&self, export: &str) -> Vec<SelectedContext> {
        match &self.meta {
            Some(m) if m.export == export => m.contexts.clone(),
            _ => Vec::new(),
        }
    }
}

struct MetaRequest<'a> {
    export: &'a str,
    list: Vec<&'a str>,
}

/// Parse the body of LIST/SET_META_CONTEXT, validating all syntax before
/// anything is looked up.
fn parse_meta_request(data: &[u8]) -> Result<MetaRequest<'_>, (u32, &'static str)> {
    const MALFORMED: (u32, &str) = (
        REP_ERR_INVALID,
        "malformed metadata context request: lengths exceed the option data",
    );
    let (name, rest) = split_string(data, 4).ok_or(MALFORMED)?;
    let export = checked_str(name).ok_or((
        REP_ERR_INVALID,
        "export name must be UTF-8 of at most 4096 bytes",
    ))?;
    let count = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let mut rest = &rest[4..];
    if count > MAX_META_QUERIES {
        return Err((
            REP_ERR_TOO_BIG,
            "too many metadata context queries (the limit is 128)",
        ));
    }
    // Each query needs at least its 4-byte length: check before looping.
    if count as usize * 4 > rest.len() {
        return Err(MALFORMED);
    }
    let mut list = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (q, r) = split_string(rest, 0).ok_or(MALFORMED)?;
        let q = checked_str(q).ok_or((
            REP_ERR_INVALID,
            "metadata context queries must be UTF-8 of at most 4096 bytes",
        ))?;
        list.push(q);
        rest = r;
    }
    if !rest.is_empty() {
        return Err((
            REP_ERR_INVALID,
            "malformed metadata context request: trailing bytes after the queries",
        ));
    }
    Ok(MetaRequest { export, list })
}

/// Split `u32 len, [len bytes], rest` where `rest` must hold at least
/// `tail` more bytes.
fn split_string(data: &[u8], tail: usize) -> Option<(&[u8], &[u8])> {
    let len_bytes: [u8; 4] = data.get(0..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let body = &data[4..];
    if len > body.len() || body.len() - len < tail {
        return None;
    }
    Some(body.split_at(len))
}

fn checked_str(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING_LEN {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// Append one option reply whose payload is the concatenation of `parts`.
fn reply(out: &mut Vec<u8>, option: u32, typ: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

fn reply_tls_reqd(out: &mut Vec<u8>, option: u32) {
    reply_err(
        out,
        option,
        REP_ERR_TLS_REQD,
        "this server requires TLS: send NBD_OPT_STARTTLS first (qemu: tls-creds object; libnbd: nbds:// URI)",
    );
}

fn reply_export_tls(out: &mut Vec<u8>, option: u32, code: u32) {
    let msg = if code == REP_ERR_POLICY {
        "this export is served only over TLS, which this server does not offer; ask its operator"
    } else {
        "this export is served only over TLS: send NBD_OPT_STARTTLS first (qemu: tls-creds object; libnbd: nbds:// URI)"
    };
    reply_err(out, option, code, msg);
}

fn reply_err(out: &mut Vec<u8>, option: u32, typ: u32, msg: &str) {
    tracing::debug!(
        option,
        reply = typ & !REP_FLAG_ERROR,
        "option refused: {msg}"
    );
    reply(
        out,
        option,
        typ,
        &[crate::reply::truncate_message(msg).as_bytes()],
    );
}
