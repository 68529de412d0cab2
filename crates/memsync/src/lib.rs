//! Memory checkpoint sync with content patches.
//!
//! The primary ships the dirty pages of its VM's memory to the backup at
//! every checkpoint. For each dirty page the encoder finds the best base page
//! the backup already holds (same address, or a different page with similar
//! content found through sampled-chunk fingerprints), XORs, run-length
//! encodes and compresses the difference. See `docs/memory-sync.md`.
//!
//! ```text
//!   image ──► dirty (hash scan | bitmap) ──► codec::Encoder ──► bytes ─┐
//!                                              │ RefStore (mirrored)    │ sync (peer link)
//!   backup image ◄── BackupImage (redo) ◄── codec::Decoder ◄───────────┘
//! ```
//!
//! Modules: [`codec`] (sans-I/O format), [`store`] (mirrored reference
//! state), [`xbzrle`] (QEMU's XBZRLE, as the anchor), [`baseline`] (raw and
//! zero+LZ4), [`image`] (memory images, dirty detection), [`trace`],
//! [`replay`] (all methods over a recorded trace), [`sync`] (checkpoint
//! protocol), [`record`] (QEMU trace recorder).
#![warn(missing_docs)]

pub mod baseline;
pub mod codec;
pub mod image;
pub mod page;
pub mod record;
pub mod replay;
pub mod store;
pub mod sync;
pub mod trace;
pub mod xbzrle;
mod zrle;

pub use codec::{
    CodecConfig, CodecError, Compression, Decoded, Decoder, EncodeStats, Encoded, Encoder,
    KindCounts,
};
pub use page::{PAGE_SIZE, Page};
pub use replay::{ReplayOptions, ReplayReport, run as replay_run};
