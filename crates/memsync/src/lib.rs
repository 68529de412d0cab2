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
//! zero+LZ4), [`image`] (memory images, dirty detection), [`trace`] (the
//! trace format: a directory of numbered RAM images), [`replay`] (all
//! methods over a recorded trace), [`sync`] (checkpoint protocol and the
//! crash-safe backup image).
//!
//! This crate launches no process and reads no environment variable: it
//! works on byte buffers, files and a [`sync::Transport`] it is given.
//! Recording a trace of a real guest (starting QEMU, driving it over QMP)
//! is experiment tooling and lives in the `understudy-lab` crate.
#![warn(missing_docs)]

pub mod baseline;
pub mod codec;
pub mod image;
pub mod page;
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
