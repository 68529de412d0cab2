//! Replay: run primary and backup of every method over a trace in one
//! process, verify the rebuilt image after every checkpoint, and report
//! bytes on the wire and throughput.
//!
//! Checkpoint 0 is the initial full sync (every page is dirty); its bytes
//! are reported apart. The headline numbers are over checkpoints 1..n, the
//! steady state a fault-tolerant pair lives in.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::baseline::{self, Lz4Counts};
use crate::codec::{CodecConfig, CodecError, Compression, Decoder, Encoder, KindCounts};
use crate::image::{self, DirtyTracker, ImageError, MAX_IMAGE_BYTES};
use crate::page::PAGE_SIZE;
use crate::store::RefStore;
use crate::trace::{Trace, TraceError};
use crate::xbzrle::{self, XbzrleCounts, XbzrleSender};

/// What to replay and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplayOptions {
    /// understudy reference store budget in bytes. Default: 64 MiB.
    pub store_budget_bytes: u64,
    /// XBZRLE cache size in bytes (QEMU's default). Default: 64 MiB.
    pub xbzrle_cache_bytes: u64,
    /// understudy control-section compression. Default: zstd level 1.
    pub control: Compression,
    /// understudy literal-section compression. Default: zstd level 1.
    pub literal: Compression,
    /// Replay at most this many images. Default: all.
    pub max_checkpoints: Option<usize>,
    /// Use every `stride`-th image (a 25 ms trace replayed with stride 4
    /// acts as a 100 ms trace). Default: 1.
    pub stride: usize,
    /// Compare every method's rebuilt image with the original after every
    /// checkpoint. Default: true.
    pub verify: bool,
    /// Largest image accepted. Default: 64 GiB.
    pub max_image_bytes: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            store_budget_bytes: 64 << 20,
            xbzrle_cache_bytes: xbzrle::DEFAULT_CACHE_BYTES,
            control: Compression::Zstd(1),
            literal: Compression::Zstd(1),
            max_checkpoints: None,
            stride: 1,
            verify: true,
            max_image_bytes: MAX_IMAGE_BYTES,
        }
    }
}

/// Failures of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be opened or read.
    #[error("reading the trace failed")]
    Trace(#[source] TraceError),
    /// Dirty detection failed.
    #[error("finding dirty pages failed")]
    Dirty(#[source] ImageError),
    /// understudy codec failed.
    #[error("understudy codec failed at checkpoint {checkpoint}")]
    Codec {
        /// Checkpoint index.
        checkpoint: usize,
        /// Cause.
        #[source]
        source: CodecError,
    },
    /// XBZRLE stream did not apply.
    #[error("XBZRLE stream did not apply at checkpoint {checkpoint}")]
    Xbzrle {
        /// Checkpoint index.
        checkpoint: usize,
        /// Cause.
        #[source]
        source: xbzrle::XbzrleError,
    },
    /// Baseline stream did not apply.
    #[error("baseline stream did not apply at checkpoint {checkpoint}")]
    Baseline {
        /// Checkpoint index.
        checkpoint: usize,
        /// Cause.
        #[source]
        source: baseline::BaselineError,
    },
    /// A rebuilt image differs from the original.
    #[error(
        "method {method}: rebuilt image differs from the original at checkpoint {checkpoint}, page {page}; this is a bug, please report it with the trace"
    )]
    Mismatch {
        /// Method name.
        method: &'static str,
        /// Checkpoint index.
        checkpoint: usize,
        /// First differing page.
        page: usize,
    },
    /// Bad option.
    #[error("invalid replay option: {0}")]
    Options(&'static str),
}

/// Method-specific page counts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum PageStats {
    /// Raw dirty pages.
    Raw {
        /// Pages sent.
        pages: u64,
    },
    /// Zero detection + per-page LZ4.
    ZeroLz4(Lz4Counts),
    /// QEMU XBZRLE.
    Xbzrle(XbzrleCounts),
    /// understudy content patches.
    Understudy(KindCounts),
}

/// Results of one method.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodReport {
    /// Method name.
    pub name: String,
    /// Bytes of the initial full sync (checkpoint 0).
    pub initial_bytes: u64,
    /// Bytes over checkpoints 1..n.
    pub steady_bytes: u64,
    /// Steady bytes relative to raw dirty pages, in percent saved.
    pub saved_vs_raw_pct: f64,
    /// Steady-state encode time (thread CPU time).
    pub encode_ns: u64,
    /// Steady-state decode (+ apply to the image) time (thread CPU time).
    pub decode_ns: u64,
    /// Dirty page bytes encoded per CPU second (MB/s, 10^6: per core),
    /// steady state.
    pub encode_mb_s: f64,
    /// Dirty page bytes decoded per CPU second (MB/s), steady state.
    pub decode_mb_s: f64,
    /// Pages by kind, steady state.
    pub pages: PageStats,
}

/// One checkpoint row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointRow {
    /// Image index in the trace.
    pub image: usize,
    /// Dirty pages.
    pub dirty_pages: u64,
    /// Bytes per method, in the order of [`ReplayReport::methods`].
    pub bytes: Vec<u64>,
}

/// Everything a replay measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Trace directory.
    pub trace: String,
    /// Bytes per image.
    pub image_bytes: u64,
    /// Checkpoints replayed (including the initial sync).
    pub checkpoints: usize,
    /// Stride used.
    pub stride: usize,
    /// Dirty pages over checkpoints 1..n.
    pub steady_dirty_pages: u64,
    /// Whether images were verified after every checkpoint.
    pub verified: bool,
    /// Options used.
    pub options: ReplayOptions,
    /// One entry per method: raw, zero+lz4, xbzrle, understudy.
    pub methods: Vec<MethodReport>,
    /// Per-checkpoint bytes.
    pub per_checkpoint: Vec<CheckpointRow>,
}

impl ReplayReport {
    /// The report of method `name`.
    pub fn method(&self, name: &str) -> Option<&MethodReport> {
        self.methods.iter().find(|m| m.name == name)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.checkpoints.saturating_sub(1).max(1) as u64;
        writeln!(
            f,
            "trace {}: {} checkpoints (stride {}), image {:.0} MiB, {} dirty pages after the initial sync ({:.1} MiB, {:.0} pages/checkpoint){}",
            self.trace,
            self.checkpoints,
            self.stride,
            mib(self.image_bytes),
            self.steady_dirty_pages,
            mib(self.steady_dirty_pages * PAGE_SIZE as u64),
            self.steady_dirty_pages as f64 / n as f64,
            if self.verified {
                ", verified byte for byte"
            } else {
                ", NOT verified"
            }
        )?;
        writeln!(
            f,
            "{:<12} {:>14} {:>12} {:>8} {:>12} {:>12} {:>14}",
            "method", "bytes", "bytes/ckpt", "saved", "encode MB/s", "decode MB/s", "initial bytes"
        )?;
        for m in &self.methods {
            writeln!(
                f,
                "{:<12} {:>14} {:>12} {:>7.1}% {:>12.0} {:>12.0} {:>14}",
                m.name,
                m.steady_bytes,
                m.steady_bytes / n,
                m.saved_vs_raw_pct,
                m.encode_mb_s,
                m.decode_mb_s,
                m.initial_bytes
            )?;
        }
        for m in &self.methods {
            match &m.pages {
                PageStats::Xbzrle(c) => writeln!(
                    f,
                    "xbzrle pages: zero {} normal {} xbzrle {} overflow {} unchanged {}",
                    c.zero, c.normal, c.xbzrle, c.overflow, c.unchanged
                )?,
                PageStats::Understudy(k) => writeln!(
                    f,
                    "understudy pages: zero {} duplicate {} delta-same-address {} delta-content-match {} literal {}",
                    k.zero, k.duplicate, k.delta_same_address, k.delta_content_match, k.literal
                )?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Acc {
    initial: u64,
    steady: u64,
    enc: Duration,
    dec: Duration,
}

/// CPU time consumed by the calling thread. Throughput is measured in CPU
/// time so that it means "per core" and is not skewed by other processes
/// on a shared machine.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a
    // constant supported by Linux; the call writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .position(|(x, y)| x != y)
}

const NAMES: [&str; 4] = ["raw", "zero+lz4", "xbzrle", "understudy"];

/// Replay the trace in `trace_dir` with every method.
pub fn run(trace_dir: &Path, opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    if opts.stride == 0 {
        return Err(ReplayError::Options("stride must be at least 1"));
    }
    let trace = Trace::open(trace_dir).map_err(ReplayError::Trace)?;
    let image_pages = trace.image_len() / PAGE_SIZE as u64;
    let mut cfg = CodecConfig::new(image_pages);
    cfg.store_slots = RefStore::slots_for_budget(opts.store_budget_bytes);
    cfg.control = opts.control;
    cfg.literal = opts.literal;
    let mut enc = Encoder::new(cfg);
    let mut dec = Decoder::new(cfg);
    let mut xb = XbzrleSender::new(opts.xbzrle_cache_bytes);

    let image_len = trace.image_len() as usize;
    let mut backups: Vec<Vec<u8>> = (0..NAMES.len()).map(|_| vec![0u8; image_len]).collect();
    let mut acc: Vec<Acc> = (0..NAMES.len()).map(|_| Acc::default()).collect();
    let mut lz_counts = Lz4Counts::default();
    let mut xb_counts = XbzrleCounts::default();
    let mut us_counts = KindCounts::default();
    let mut raw_pages = 0u64;

    let mut tracker = DirtyTracker::new();
    let mut cur = Vec::new();
    let mut stream = Vec::new();
    // Reused like `stream`: a long-running encoder keeps its output buffer.
    let mut us_out = Vec::new();
    let mut rows = Vec::new();
    let mut decoded = crate::codec::Decoded::default();
    let mut steady_dirty = 0u64;
    let indices: Vec<usize> = (0..trace.len())
        .step_by(opts.stride)
        .take(opts.max_checkpoints.unwrap_or(usize::MAX))
        .collect();
    for (ck, &img) in indices.iter().enumerate() {
        trace
            .read(img, opts.max_image_bytes, &mut cur)
            .map_err(ReplayError::Trace)?;
        let dirty = tracker.scan(&cur).map_err(ReplayError::Dirty)?;
        let pages = image::pages(&cur, &dirty);
        let steady = ck > 0;
        if steady {
            steady_dirty += dirty.len() as u64;
        }
        let mut row = CheckpointRow {
            image: img,
            dirty_pages: dirty.len() as u64,
            bytes: Vec::new(),
        };
        for (m, a) in acc.iter_mut().enumerate() {
            stream.clear();
            let t0 = thread_cpu_time();
            match m {
                0 => baseline::encode_raw(&pages, &mut stream),
                1 => {
                    let c = baseline::encode_zero_lz4(&pages, &mut stream);
                    if steady {
                        lz_counts.zero += c.zero;
                        lz_counts.compressed += c.compressed;
                        lz_counts.raw += c.raw;
                    }
                }
                2 => {
                    let c = xb.send_pass(&pages, &mut stream);
                    if steady {
                        xb_counts.zero += c.zero;
                        xb_counts.normal += c.normal;
                        xb_counts.xbzrle += c.xbzrle;
                        xb_counts.overflow += c.overflow;
                        xb_counts.unchanged += c.unchanged;
                    }
                }
                _ => {
                    let e = enc
                        .encode_into(ck as u64, &pages, &mut us_out)
                        .map_err(|source| ReplayError::Codec {
                            checkpoint: ck,
                            source,
                        })?;
                    if steady {
                        us_counts.add(&e.kinds);
                    }
                }
            }
            let t1 = thread_cpu_time();
            let bk = &mut backups[m];
            let wire_len = match m {
                0 | 1 => {
                    baseline::apply(&stream, bk).map_err(|source| ReplayError::Baseline {
                        checkpoint: ck,
                        source,
                    })?;
                    stream.len()
                }
                2 => {
                    xbzrle::apply_pass(&stream, bk).map_err(|source| ReplayError::Xbzrle {
                        checkpoint: ck,
                        source,
                    })?;
                    stream.len()
                }
                _ => {
                    dec.decode_into(&us_out, &mut decoded).map_err(|source| {
                        ReplayError::Codec {
                            checkpoint: ck,
                            source,
                        }
                    })?;
                    for (pfn, p) in decoded.pages() {
                        let at = pfn as usize * PAGE_SIZE;
                        bk[at..at + PAGE_SIZE].copy_from_slice(p);
                    }
                    us_out.len()
                }
            };
            let t2 = thread_cpu_time();
            if m == 0 && steady {
                raw_pages += dirty.len() as u64;
            }
            if steady {
                a.steady += wire_len as u64;
                a.enc += t1 - t0;
                a.dec += t2 - t1;
            } else {
                a.initial += wire_len as u64;
            }
            row.bytes.push(wire_len as u64);
            if opts.verify
                && let Some(page) = first_diff(bk, &cur)
            {
                return Err(ReplayError::Mismatch {
                    method: NAMES[m],
                    checkpoint: ck,
                    page,
                });
            }
        }
        tracing::debug!(checkpoint = ck, dirty = dirty.len(), bytes = ?row.bytes, "replayed");
        rows.push(row);
    }
    let raw_steady = acc[0].steady.max(1);
    let dirty_bytes = (steady_dirty * PAGE_SIZE as u64) as f64;
    let rate = |d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            dirty_bytes / d.as_secs_f64() / 1e6
        }
    };
    let methods = acc
        .iter()
        .enumerate()
        .map(|(m, a)| MethodReport {
            name: NAMES[m].to_string(),
            initial_bytes: a.initial,
            steady_bytes: a.steady,
            saved_vs_raw_pct: 100.0 * (1.0 - a.steady as f64 / raw_steady as f64),
            encode_ns: a.enc.as_nanos() as u64,
            decode_ns: a.dec.as_nanos() as u64,
            encode_mb_s: rate(a.enc),
            decode_mb_s: rate(a.dec),
            pages: match m {
                0 => PageStats::Raw { pages: raw_pages },
                1 => PageStats::ZeroLz4(lz_counts),
                2 => PageStats::Xbzrle(xb_counts),
                _ => PageStats::Understudy(us_counts),
            },
        })
        .collect();
    Ok(ReplayReport {
        trace: trace.dir().display().to_string(),
        image_bytes: trace.image_len(),
        checkpoints: indices.len(),
        stride: opts.stride,
        steady_dirty_pages: steady_dirty,
        verified: opts.verify,
        options: opts.clone(),
        methods,
        per_checkpoint: rows,
    })
}
