/// What a range of a disk is, as this layer sees it.
///
/// A plain description of the range, not of any protocol: the NBD
/// `base:allocation` flags are derived from it in `understudy-nbd-server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated in this image; holds data.
    Data,
    /// Not allocated in this image: the bytes come from a backing layer
    /// (qcow2 overlays), which holds data there. Backing ranges known to
    /// read as zeroes are [`ExtentKind::Zero`] or [`ExtentKind::Hole`]
    /// instead, so callers that skip zeroes need not look deeper.
    Backing,
    /// Allocated (in this image or a backing layer), reads as zeroes.
    Zero,
    /// Not allocated anywhere in the chain; reads as zeroes.
    Hole,
}

impl ExtentKind {
    /// Whether the range reads as zeroes.
    pub fn reads_zero(self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Hole)
    }

    /// Whether a full copy of the disk must copy the range's bytes: data,
    /// wherever in the chain it lives (a copy is a flat image, with no
    /// backing layer to fall back on).
    pub fn needs_copy(self) -> bool {
        !self.reads_zero()
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
