//! A bounds-checked cursor over a received message, shared by the
//! protocols that run over the peer link (migration, replication).
//!
//! Every read checks the remaining length first, and [`Reader::bounded`]
//! checks a peer-chosen count against a documented maximum before the
//! caller allocates anything from it. Errors are the caller's own type
//! (each protocol keeps its `WireError`), built through [`DecodeError`].

use std::marker::PhantomData;

/// How a protocol's error type reports the three generic decode failures.
pub trait DecodeError {
    /// The message `what` ended early.
    fn truncated(what: &'static str) -> Self;
    /// `field` of `what` is `value`, above its maximum `max`.
    fn bounds(what: &'static str, field: &'static str, value: u64, max: u64) -> Self;
    /// `extra` bytes follow the end of `what`.
    fn trailing(what: &'static str, extra: usize) -> Self;
}

/// Big-endian reads from one message's payload.
#[derive(Debug)]
pub struct Reader<'a, E> {
    buf: &'a [u8],
    what: &'static str,
    error: PhantomData<fn() -> E>,
}

impl<'a, E: DecodeError> Reader<'a, E> {
    /// A cursor over `buf`, the payload of message `what` (named in errors).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self {
            buf,
            what,
            error: PhantomData,
        }
    }
    /// The message's name.
    pub fn what(&self) -> &'static str {
        self.what
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        if self.buf.len() < n {
            return Err(E::truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, E> {
        Ok(self.take(1)?[0])
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, E> {
        self.array().map(u16::from_be_bytes)
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, E> {
        self.array().map(u32::from_be_bytes)
    }
    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, E> {
        self.array().map(u64::from_be_bytes)
    }
    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// `value` if it is at most `max`; else a bounds error naming `field`.
    pub fn bounded(&self, field: &'static str, value: u64, max: u64) -> Result<u64, E> {
        if value > max {
            return Err(E::bounds(self.what, field, value, max));
        }
        Ok(value)
    }
    /// Check that the whole message was read.
    pub fn end(self) -> Result<(), E> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(E::trailing(self.what, self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Truncated(&'static str),
        Bounds(&'static str, u64),
        Trailing(usize),
    }
    impl DecodeError for E {
        fn truncated(what: &'static str) -> Self {
            E::Truncated(what)
        }
        fn bounds(_: &'static str, field: &'static str, value: u64, _: u64) -> Self {
            E::Bounds(field, value)
        }
        fn trailing(_: &'static str, extra: usize) -> Self {
            E::Trailing(extra)
        }
    }

    #[test]
    fn reads_checks_and_reports() {
        let buf = [0, 1, 0, 0, 0, 2, 9, 9];
        let mut r = Reader::<E>::new(&buf, "M");
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.bounded("n", 5, 4), Err(E::Bounds("n", 5)));
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.u64(), Err(E::Truncated("M")));
        assert_eq!(Reader::<E>::new(&buf, "M").end(), Err(E::Trailing(8)));
    }
}
