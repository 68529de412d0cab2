//! The [`Disk`] traits of [`EpochDisk`]: reads through the overlay, writes
//! as journal records (or in place), flush and order as epoch boundaries.

use understudy_block::{
    BlockError, Disk, DiskInfo, DiskMap, DiskRead, DiskSize, DiskWrite, Epoch, Extent, ExtentKind,
    Result as BResult, WriteOpts, ZeroOpts, check_range,
};

use super::EpochDisk;
use super::policy::FlushPolicy;
use super::state::failed_err;
use crate::format::{FLAG_MAY_UNMAP, RecordKind};
use crate::overlay::copy_from;

impl DiskSize for EpochDisk {
    fn size(&self) -> u64 {
        self.sh.image_size
    }
}

impl DiskRead for EpochDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BResult<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.sh.image_size)?;
        let segs = self.sh.st.lock().overlay.lookup(offset, offset + len);
        for (s, e, src) in segs {
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Some(src) => copy_from(&src, s, out),
                None => self.sh.inner.read_at(out, s)?,
            }
        }
        Ok(())
    }
}

impl DiskWrite for EpochDisk {
    fn write_at(&self, buf: &[u8], offset: u64, opts: WriteOpts) -> BResult<()> {
        check_range(offset, buf.len() as u64, self.sh.image_size)?;
        if self.sh.inner.info().read_only {
            return Err(BlockError::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut epoch = None;
        if let Some(min) = self.sh.in_place_min
            && buf.len() as u64 >= min
        {
            epoch = self.write_in_place(buf, offset)?;
        }
        let epoch = match epoch {
            Some(e) => e,
            None => {
                let mut e = 0;
                let step = self.sh.max_payload as usize;
                for (i, chunk) in buf.chunks(step).enumerate() {
                    let off = offset + (i * step) as u64;
                    e = self.append(RecordKind::Write, 0, off, chunk.len() as u64, Some(chunk))?;
                }
                e
            }
        };
        if opts.fua {
            self.fua(epoch)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> BResult<()> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(());
        }
        let flags = if opts.may_unmap { FLAG_MAY_UNMAP } else { 0 };
        let e = self.append(RecordKind::Zero, flags, offset, len, None)?;
        if opts.write.fua {
            self.fua(e)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, opts: WriteOpts) -> BResult<()> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(());
        }
        let e = self.append(RecordKind::Discard, 0, offset, len, None)?;
        if opts.fua {
            self.fua(e)?;
        }
        Ok(())
    }

    fn flush(&self) -> BResult<()> {
        match self.sh.policy {
            FlushPolicy::Durable => self.sync().map(|_| ()),
            FlushPolicy::Ordered { .. } => self.order().map(|_| ()),
        }
    }

    fn order(&self) -> BResult<Epoch> {
        let mut st = self.sh.st.lock();
        if let Some(f) = &st.failed {
            return Err(failed_err(f, "order"));
        }
        let had_pending = st.closed_upto > st.durable_epoch;
        let e = st.close().unwrap_or(st.closed_upto);
        // Under Ordered the writer only has to hear of the first epoch
        // waiting for durability (its interval deadline counts from that
        // epoch, which a later close does not move) and of a ring past its
        // high-water mark. Waking it on every order cost a context switch
        // and a contended lock per NBD FLUSH.
        let wake = match self.sh.policy {
            FlushPolicy::Durable => true,
            FlushPolicy::Ordered { .. } => !had_pending || st.used() * 2 > self.sh.cap,
        };
        if wake {
            self.sh.cv_writer.notify_one();
        }
        Ok(e)
    }
}

impl DiskMap for EpochDisk {
    fn map(&self, offset: u64, len: u64) -> BResult<Vec<Extent>> {
        check_range(offset, len, self.sh.image_size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let next = self.sh.st.lock().overlay.next_piece(offset);
        let limit = match next {
            Some((s, e, zero)) if s <= offset => {
                let kind = if zero {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                return Ok(vec![Extent {
                    offset,
                    len: e.min(end) - offset,
                    kind,
                }]);
            }
            Some((s, _, _)) if s < end => s,
            _ => end,
        };
        let mut v = self.sh.inner.map(offset, limit - offset)?;
        v.retain_mut(|x| {
            if x.offset >= limit {
                return false;
            }
            x.len = x.len.min(limit - x.offset);
            true
        });
        Ok(v)
    }
}

impl Disk for EpochDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            // One journal serves every handle of this disk.
            flush_covers_all_handles: true,
            can_fast_zero: true,
            ..self.sh.inner.info()
        }
    }
}
