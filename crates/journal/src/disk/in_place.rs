//! Semantic journaling: a large write may go to the image in place, behind
//! a marker record, when ordering allows it (docs/ordering.md,
//! "Classification").

use std::io;
use std::time::Instant;

use understudy_block::{Epoch, Result as BResult, WriteOpts};

use super::EpochDisk;
use super::state::{Live, failed_err};
use crate::format::{REC_ALIGN, RecordHeader, RecordKind, phys};

impl EpochDisk {
    /// Try the in-place path. `Ok(None)`: not allowed now, journal it.
    pub(super) fn write_in_place(&self, buf: &[u8], offset: u64) -> BResult<Option<Epoch>> {
        let sh = &*self.sh;
        let len = buf.len() as u64;
        let mut st = sh.st.lock();
        if let Some(f) = &st.failed {
            return Err(failed_err(f, "write"));
        }
        let first = !st.epochs.contains_key(&st.cur_epoch);
        let close = if first { REC_ALIGN } else { 0 };
        // The rule (docs/ordering.md, "Classification"): every earlier epoch
        // is durable, and no record recovery could replay touches the range.
        let allowed = st.durable_epoch + 1 == st.cur_epoch
            && st.chunks_free(offset, len)
            && st.used() + REC_ALIGN + st.close_reserved + close <= sh.cap;
        if !allowed {
            return Ok(None);
        }
        // A marker record (512 bytes always fit before the ring end).
        let epoch = st.cur_epoch;
        let (seq, pos) = (st.next_seq, st.head);
        st.next_seq += 1;
        st.head += REC_ALIGN;
        st.live.push_back(Live {
            pos,
            seq,
            epoch,
            chunks: None,
        });
        if first {
            st.close_reserved += REC_ALIGN;
        }
        let es = st.epochs.entry(epoch).or_default();
        es.inflight += 1;
        es.count += 1;
        es.in_place.push((offset, len));
        st.stats.records += 1;
        st.stats.in_place_writes += 1;
        st.last_activity = Instant::now();
        drop(st);
        let mut mb = vec![0u8; REC_ALIGN as usize];
        RecordHeader {
            kind: RecordKind::InPlace,
            flags: 0,
            log_id: sh.log_id,
            seq,
            epoch,
            offset,
            len,
            payload_len: 0,
            total_len: REC_ALIGN as u32,
            payload_crc: 0,
        }
        .encode(&mut mb);
        let mut res = sh.log.write_at(&mb, phys(pos, sh.cap));
        if res.is_ok()
            && let Err(e) = sh.inner.write_at(buf, offset, WriteOpts::default())
        {
            res = Err(io::Error::other(e.to_string()));
        }
        self.finish(epoch, res, "in-place write").map(Some)
    }
}
