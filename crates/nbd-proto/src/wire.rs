//! Every NBD wire constant in one place: magics, handshake and transmission
//! flags, option and reply numbers, commands, reply chunk types, errors.
//!
//! Names follow `doc/proto.md` of the NetworkBlockDevice project with the
//! `NBD_` prefix dropped. All multi-byte fields are big-endian on the wire.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second server magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (not negotiated by this server).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk (not negotiated by this server).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- handshake flags (server, 16 bits) ----
/// The server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- client flags (32 bits) ----
/// The client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- transmission flags (16 bits) ----
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The medium is rotational.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `CMD_FLAG_DF` is supported (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA on one connection cover writes of every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_RESIZE` (experimental; never set here).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Block status with payload (extended headers; never set here).
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---- options ----
/// Choose an export and enter transmission (no error reporting possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- option reply types ----
/// Option accepted / list finished.
pub const REP_ACK: u32 = 1;
/// One export in an `OPT_LIST` reply.
pub const REP_SERVER: u32 = 2;
/// One piece of export information (`OPT_INFO`/`OPT_GO`).
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---- NBD_INFO types ----
/// Size and transmission flags (mandatory in a successful INFO/GO).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands ----
/// Read.
pub const CMD_READ: u16 = 0;
/// Write (followed by the payload).
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize (experimental; unsupported).
pub const CMD_RESIZE: u16 = 8;
/// understudy extension: write-order barrier (`docs/ordering.md`). Only
/// valid after the client negotiated the `understudy:order` metadata
/// context; far above the standard range so it cannot collide with a
/// future standard command.
pub const CMD_ORDER: u16 = 0x5500;

// ---- command flags ----
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write-zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read must be answered with one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write-zeroes: fail with ENOTSUP unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: length is a payload length (unsupported).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- structured reply ----
/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status extents for one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// 64-bit block status (extended headers; unsupported).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Error with message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Error with message and offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// ---- block status flags ----
/// `base:allocation`: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*`: dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

// ---- sizes of fixed wire structures ----
/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Chunk header plus the 8-byte offset of `OFFSET_DATA`.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
/// A whole `OFFSET_HOLE` chunk.
pub const OFFSET_HOLE_CHUNK_LEN: usize = CHUNK_HEADER_LEN + 12;
/// Reply to `OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The reserved zero bytes after an `OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
