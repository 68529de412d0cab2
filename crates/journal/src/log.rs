//! The storage a journal lives in.
//!
//! A small trait instead of `std::fs::File` so that tests can put the
//! journal on a simulated page cache that loses unsynced writes
//! ([`crate::sim`]) and inject I/O errors at every write and sync point.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positional file I/O, shareable between threads.
pub trait LogFile: Send + Sync + std::fmt::Debug {
    /// Fill `buf` from `offset`; fails with `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset` (into the page cache; not durable).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Grow or shrink to `len` bytes; the size change is made durable.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

impl LogFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)?;
        // The size is metadata: sync_all, not sync_data.
        self.sync_all()
    }
}
