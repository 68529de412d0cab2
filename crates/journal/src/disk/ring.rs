//! Appending a record to the journal ring: reserving space (waiting for
//! it, with back-pressure), indexing the record for reads, writing it.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::MutexGuard;
use understudy_block::{Epoch, Result as BResult};

use super::EpochDisk;
use super::state::{Live, Pending, State, chunk_range, failed_err};
use crate::format::{REC_ALIGN, REC_HDR, RecordHeader, RecordKind, align_up, phys};
use crate::overlay::Source;

impl EpochDisk {
    /// Append one record (after waiting for ring space) and return its epoch.
    pub(super) fn append(
        &self,
        kind: RecordKind,
        flags: u8,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> BResult<Epoch> {
        let sh = &*self.sh;
        let payload_len = data.map_or(0, |d| d.len());
        let total = align_up((REC_HDR + payload_len) as u64);
        let mut buf = vec![0u8; total as usize];
        let mut payload_crc = 0;
        if let Some(d) = data {
            buf[REC_HDR..REC_HDR + d.len()].copy_from_slice(d);
            payload_crc = crc32c::crc32c(d);
        }
        let mut st = sh.st.lock();
        let r = self.reserve(&mut st, total)?;
        let h = RecordHeader {
            kind,
            flags,
            log_id: sh.log_id,
            seq: r.seq,
            epoch: r.epoch,
            offset,
            len,
            payload_len: payload_len as u32,
            total_len: total as u32,
            payload_crc,
        };
        h.encode(&mut buf);
        let buf = Arc::new(buf);
        index_record(&mut st, &h, r.pos, &buf);
        drop(st);

        let mut res = Ok(());
        if let Some(pad) = r.pad {
            res = self.write_pad(&pad, r.epoch);
        }
        if res.is_ok() {
            res = sh.log.write_at(&buf, phys(r.pos, sh.cap));
        }
        self.finish(r.epoch, res, "journal append")
    }

    /// Reserve `total` bytes of ring space in the open epoch (after a pad
    /// record when the ring end is too close), waiting for the writer to
    /// free space when the ring is full.
    fn reserve(&self, st: &mut MutexGuard<'_, State>, total: u64) -> BResult<Reserved> {
        let sh = &*self.sh;
        loop {
            if let Some(f) = &st.failed {
                return Err(failed_err(f, "write"));
            }
            let to_end = sh.cap - st.head % sh.cap;
            let pad = if total > to_end { to_end } else { 0 };
            let first = !st.epochs.contains_key(&st.cur_epoch);
            let close = if first { REC_ALIGN } else { 0 };
            if st.used() + pad + total + st.close_reserved + close <= sh.cap {
                let epoch = st.cur_epoch;
                let mut pad_at = None;
                if pad > 0 {
                    pad_at = Some(Pad {
                        seq: st.next_seq,
                        pos: st.head,
                        len: pad,
                    });
                    let live = Live {
                        pos: st.head,
                        seq: st.next_seq,
                        epoch,
                        chunks: None,
                    };
                    st.live.push_back(live);
                    st.next_seq += 1;
                    st.head += pad;
                    st.stats.records += 1;
                }
                let (seq, pos) = (st.next_seq, st.head);
                st.next_seq += 1;
                st.head += total;
                return Ok(Reserved {
                    pad: pad_at,
                    epoch,
                    seq,
                    pos,
                });
            }
            // Back-pressure. The open epoch may hold the space that is
            // needed: close it so the writer can make it durable and apply
            // it (an extra order point never breaks the guarantee).
            // Only when nothing closed is left to apply and reclaim:
            // otherwise waiting for the writer frees space without
            // splitting the epoch.
            if st.closed_upto == st.reclaimed_epoch && st.close().is_some() {
                st.stats.forced_closes += 1;
            }
            st.stats.space_waits += 1;
            st.space_waiters += 1;
            sh.cv_writer.notify_one();
            sh.cv_space.wait(st);
            st.space_waiters -= 1;
        }
    }

    /// Write the pad record that skips the rest of the ring before a
    /// record that does not fit there.
    fn write_pad(&self, pad: &Pad, epoch: Epoch) -> io::Result<()> {
        let sh = &*self.sh;
        let mut pb = [0u8; REC_HDR];
        RecordHeader {
            kind: RecordKind::Pad,
            flags: 0,
            log_id: sh.log_id,
            seq: pad.seq,
            epoch,
            offset: 0,
            len: 0,
            payload_len: 0,
            total_len: pad.len as u32,
            payload_crc: 0,
        }
        .encode(&mut pb);
        sh.log.write_at(&pb, phys(pad.pos, sh.cap))
    }

    /// Bookkeeping after a record's I/O: count it done, record a failure.
    pub(super) fn finish(&self, epoch: Epoch, res: io::Result<()>, what: &str) -> BResult<Epoch> {
        let mut st = self.sh.st.lock();
        if let Some(es) = st.epochs.get_mut(&epoch) {
            es.inflight -= 1;
        }
        if let Err(e) = &res {
            st.fail(what.to_owned(), e);
            self.sh.wake_all();
        } else if epoch <= st.closed_upto {
            self.sh.cv_writer.notify_one();
        }
        match &st.failed {
            Some(f) => Err(failed_err(f, "write")),
            None => Ok(epoch),
        }
    }
}

/// A pad record reserved in the ring.
struct Pad {
    seq: u64,
    pos: u64,
    len: u64,
}

/// Ring space reserved for one record.
struct Reserved {
    pad: Option<Pad>,
    epoch: Epoch,
    seq: u64,
    pos: u64,
}

/// Account for a reserved record: live in the ring, referencing its chunks,
/// visible to reads through the overlay, pending in its epoch.
fn index_record(st: &mut State, h: &RecordHeader, pos: u64, buf: &Arc<Vec<u8>>) {
    let (kind, offset, len, seq, epoch) = (h.kind, h.offset, h.len, h.seq, h.epoch);
    let chunks = kind.is_data().then(|| chunk_range(offset, len));
    st.live.push_back(Live {
        pos,
        seq,
        epoch,
        chunks,
    });
    if let Some((a, b)) = chunks {
        for c in a..b {
            *st.chunk_refs.entry(c).or_default() += 1;
        }
    }
    let src = match kind {
        RecordKind::Write => Some(Source::Data {
            buf: Arc::clone(buf),
            base: offset,
            skip: REC_HDR,
        }),
        RecordKind::Zero | RecordKind::Discard => Some(Source::Zero),
        _ => None,
    };
    if let Some(src) = src {
        st.overlay.insert(offset, offset + len, seq, src);
    }
    if !st.epochs.contains_key(&epoch) {
        st.close_reserved += REC_ALIGN;
    }
    let es = st.epochs.entry(epoch).or_default();
    es.inflight += 1;
    es.count += 1;
    es.records.push(Pending {
        seq,
        kind,
        flags: h.flags,
        offset,
        len,
        buf: (kind == RecordKind::Write).then(|| Arc::clone(buf)),
    });
    st.stats.records += 1;
    st.stats.journaled_bytes += u64::from(h.payload_len);
    st.last_activity = Instant::now();
}
