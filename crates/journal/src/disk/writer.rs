//! The writer thread: closes epochs and makes them durable in the journal,
//! hands them to the epoch hook, applies them to the image and reclaims
//! their ring space, in epoch order.

use std::io;
use std::time::Instant;

use parking_lot::MutexGuard;
use understudy_block::{Epoch, Result as BResult, WriteOpts, ZeroOpts};

use super::hook::{ClosedEpoch, closed_epoch};
use super::state::{Live, Pending, Shared, State};
use crate::format::{
    FLAG_MAY_UNMAP, HEADER_SLOT, Header, REC_ALIGN, REC_HDR, RecordHeader, RecordKind, phys,
};
use crate::log::LogFile;

impl Shared {
    /// Highest closed epoch whose records (and those of every earlier
    /// epoch) are all written.
    pub(super) fn ready_target(&self, st: &State) -> Epoch {
        let mut t = st.durable_epoch;
        for (&e, es) in st.epochs.range(st.durable_epoch + 1..=st.closed_upto) {
            if es.inflight > 0 {
                break;
            }
            t = e;
        }
        t
    }

    /// Write the closing records of `(durable, target]`, fsync the journal
    /// (after an image fsync if any of them wrote in place).
    fn make_durable(&self, st: &mut MutexGuard<'_, State>, target: Epoch) -> io::Result<()> {
        let from = st.durable_epoch + 1;
        let mut in_place = false;
        let mut closes = Vec::new();
        for (&e, es) in st.epochs.range(from..=target) {
            in_place |= !es.in_place.is_empty();
            closes.push((e, es.count));
        }
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (e, count) in closes {
            let (seq, pos) = (st.next_seq, st.head);
            st.next_seq += 1;
            st.head += REC_ALIGN;
            st.close_reserved -= REC_ALIGN;
            st.stats.records += 1;
            st.live.push_back(Live {
                pos,
                seq,
                epoch: e,
                chunks: None,
            });
            let mut b = vec![0u8; REC_ALIGN as usize];
            RecordHeader {
                kind: RecordKind::Close,
                flags: 0,
                log_id: self.log_id,
                seq,
                epoch: e,
                offset: 0,
                len: count,
                payload_len: 0,
                total_len: REC_ALIGN as u32,
                payload_crc: 0,
            }
            .encode(&mut b);
            let p = phys(pos, self.cap);
            match runs.last_mut() {
                Some((start, run)) if *start + run.len() as u64 == p => run.extend_from_slice(&b),
                _ => runs.push((p, b)),
            }
        }
        let hook = self.hook.lock().clone();
        let closed: Vec<ClosedEpoch> = match &hook {
            Some(_) => st
                .epochs
                .range(from..=target)
                .map(|(&e, es)| closed_epoch(e, es))
                .collect(),
            None => Vec::new(),
        };
        let res = MutexGuard::unlocked(st, || -> io::Result<()> {
            if in_place {
                self.inner
                    .flush()
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            for (p, run) in &runs {
                self.log.write_at(run, *p)?;
            }
            self.log.sync()
        });
        if in_place {
            st.stats.image_syncs += 1;
        }
        st.stats.journal_syncs += 1;
        res?;
        // The hook runs before flush callers are released: an acknowledged
        // flush implies the hook has seen its epoch (a synchronous
        // replication hook makes flush wait for the replica).
        if let Some(h) = hook {
            MutexGuard::unlocked(st, || {
                for c in &closed {
                    h(c);
                }
            });
        }
        st.durable_epoch = target;
        self.cv_durable.notify_all();
        Ok(())
    }

    /// Apply every durable epoch to the image, fsync it, then reclaim the
    /// ring space of applied epochs.
    fn apply(&self, st: &mut MutexGuard<'_, State>) -> io::Result<()> {
        let target = st.durable_epoch;
        let keys: Vec<Epoch> = st.epochs.range(..=target).map(|(&e, _)| e).collect();
        let mut recs = Vec::new();
        for e in keys {
            if let Some(es) = st.epochs.remove(&e) {
                recs.extend(es.records);
            }
        }
        let res = MutexGuard::unlocked(st, || self.write_records(&recs));
        st.stats.image_syncs += 1;
        res.map_err(|e| io::Error::other(e.to_string()))?;
        for r in &recs {
            st.overlay.remove_seq(r.offset, r.offset + r.len, r.seq);
        }
        st.applied_epoch = target;
        self.reclaim(st, target)
    }

    /// Apply records to the image and fsync it.
    fn write_records(&self, recs: &[Pending]) -> BResult<()> {
        for r in recs {
            match r.kind {
                RecordKind::Write => {
                    let b = r.buf.as_deref().map_or(&[][..], |b| &b[REC_HDR..]);
                    let n = (r.len as usize).min(b.len());
                    self.inner
                        .write_at(&b[..n], r.offset, WriteOpts::default())?;
                }
                RecordKind::Zero => self.inner.write_zeroes(
                    r.offset,
                    r.len,
                    ZeroOpts {
                        may_unmap: r.flags & FLAG_MAY_UNMAP != 0,
                        ..Default::default()
                    },
                )?,
                RecordKind::Discard => self.inner.discard(r.offset, r.len, WriteOpts::default())?,
                _ => {}
            }
        }
        self.inner.flush()
    }

    /// Release the ring space of every epoch up to `target`, which the
    /// image now holds durably: move the tail in a new header, then let
    /// writers reuse the space and write those ranges in place.
    fn reclaim(&self, st: &mut MutexGuard<'_, State>, target: Epoch) -> io::Result<()> {
        let mut freed = Vec::new();
        while st.live.front().is_some_and(|l| l.epoch <= target) {
            freed.extend(st.live.pop_front());
        }
        if freed.is_empty() {
            st.reclaimed_epoch = target;
            self.cv_space.notify_all();
            return Ok(());
        }
        let (tail, tail_seq) = st
            .live
            .front()
            .map_or((st.head, st.next_seq), |l| (l.pos, l.seq));
        st.generation += 1;
        let header = Header {
            log_id: self.log_id,
            generation: st.generation,
            capacity: self.cap,
            image_size: self.image_size,
            tail,
            tail_seq,
            base_epoch: target,
        };
        let res = MutexGuard::unlocked(st, || write_header(&*self.log, &header));
        st.stats.journal_syncs += 1;
        res?;
        // Only now may the space be reused and the ranges written in place:
        // before the header is durable, recovery would still replay them.
        st.tail = tail;
        st.reclaimed_epoch = target;
        for l in freed {
            if let Some((a, b)) = l.chunks {
                for c in a..b {
                    if let Some(n) = st.chunk_refs.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            st.chunk_refs.remove(&c);
                        }
                    }
                }
            }
        }
        self.cv_space.notify_all();
        Ok(())
    }
}

pub(super) fn writer_main(sh: &Shared) {
    let mut st = sh.st.lock();
    loop {
        if st.failed.is_some() {
            sh.wake_all();
            if st.shutdown {
                break;
            }
            sh.cv_writer.wait(&mut st);
            continue;
        }
        let now = Instant::now();
        if sh.want_durable(&st, now) {
            let target = sh.ready_target(&st);
            if target > st.durable_epoch {
                if let Err(e) = sh.make_durable(&mut st, target) {
                    st.fail("journal close/fsync".into(), &e);
                }
                continue;
            }
            // Writes of a closed epoch are still in flight; `finish` wakes us.
            sh.cv_writer.wait(&mut st);
            continue;
        }
        if sh.want_apply(&st, now) {
            if let Err(e) = sh.apply(&mut st) {
                st.fail("apply to image".into(), &e);
            }
            continue;
        }
        if st.shutdown && st.closed_upto == st.applied_epoch && st.cur_epoch == st.closed_upto + 1 {
            break;
        }
        match sh.next_deadline(&st) {
            Some(d) => {
                sh.cv_writer.wait_until(&mut st, d);
            }
            None => sh.cv_writer.wait(&mut st),
        }
    }
    sh.wake_all();
}

pub(super) fn write_header(log: &dyn LogFile, h: &Header) -> io::Result<()> {
    let mut b = vec![0u8; HEADER_SLOT as usize];
    h.encode(&mut b);
    log.write_at(&b, (h.generation % 2) * HEADER_SLOT)?;
    log.sync()
}
