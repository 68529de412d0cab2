//! NBD error numbers carried in replies.

use std::fmt;

/// An error value of the NBD transmission phase (`NBD_E*`).
///
/// The numbers are fixed by the protocol; they happen to equal Linux errno
/// values but must not be confused with the host's errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdErrno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory (avoided by this server).
    NoMem = 12,
    /// Invalid argument (bad flags, out of bounds reads, unknown commands).
    Inval = 22,
    /// No space left (writes past the end, full backing store).
    NoSpc = 28,
    /// Value too large (request length above the maximum payload).
    Overflow = 75,
    /// Not supported (only for `FAST_ZERO` write-zeroes).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

impl NbdErrno {
    /// The value sent on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Decode a wire value; unknown values map to `None` (clients treat
    /// them as `Inval`).
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMem,
            22 => Self::Inval,
            28 => Self::NoSpc,
            75 => Self::Overflow,
            95 => Self::NotSup,
            108 => Self::Shutdown,
            _ => return None,
        })
    }

    /// Short symbolic name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown() {
        for e in [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ] {
            assert_eq!(NbdErrno::from_u32(e.as_u32()), Some(e));
        }
        assert_eq!(NbdErrno::Inval.as_u32(), 22);
        assert_eq!(NbdErrno::from_u32(0), None);
        assert_eq!(NbdErrno::from_u32(2), None);
    }
}
