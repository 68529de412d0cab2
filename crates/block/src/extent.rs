/// Allocation state of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated, holds data (in this image or a backing image).
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated anywhere in the chain; reads as zeroes.
    Hole,
}

impl ExtentKind {
    /// NBD `base:allocation` flags: bit 0 = hole, bit 1 = reads as zero.
    pub fn nbd_flags(self) -> u32 {
        match self {
            ExtentKind::Data => 0,
            ExtentKind::Zero => 2,
            ExtentKind::Hole => 3,
        }
    }

    /// Whether the range reads as zeroes.
    pub fn reads_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// A contiguous range with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Start offset in bytes.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// State.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Merge neighbouring extents of the same kind, in place.
pub fn coalesce(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        if e.len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.kind == e.kind && last.end() == e.offset => last.len += e.len,
            _ => out.push(e),
        }
    }
    *extents = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_only_adjacent_same_kind() {
        let mut v = vec![
            Extent {
                offset: 0,
                len: 10,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: 10,
                len: 5,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: 15,
                len: 0,
                kind: ExtentKind::Hole,
            },
            Extent {
                offset: 15,
                len: 5,
                kind: ExtentKind::Hole,
            },
            Extent {
                offset: 20,
                len: 5,
                kind: ExtentKind::Data,
            },
        ];
        coalesce(&mut v);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].len, 15);
        assert_eq!(v[1].kind, ExtentKind::Hole);
    }
}
