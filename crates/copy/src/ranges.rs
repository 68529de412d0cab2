//! Range arithmetic for planning a copy. Ranges are `(offset, len)`.

use understudy_block::{BlockError, Disk};

/// Sorted, merged ranges minus sorted, merged ranges.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut s, l) in a {
        let e = s + l;
        while j < b.len() && b[j].0 + b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e {
            match b.get(k) {
                Some(&(bs, bl)) if bs < e => {
                    if bs > s {
                        out.push((s, bs - s));
                    }
                    s = s.max(bs + bl);
                    k += 1;
                }
                _ => {
                    out.push((s, e - s));
                    break;
                }
            }
        }
    }
    out
}

/// Expand ranges outward to `gran` boundaries (clamped to `size`) and merge.
pub fn align_ranges(v: &[(u64, u64)], gran: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in v {
        if l == 0 {
            continue;
        }
        let s = o / gran * gran;
        let e = (o + l).div_ceil(gran).saturating_mul(gran).min(size);
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// The ranges of `disk` that hold data (holes and zero extents left out).
pub fn allocated(disk: &dyn Disk) -> Result<Vec<(u64, u64)>, BlockError> {
    let size = disk.size();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let ext = disk.map(off, size - off)?;
        if ext.is_empty() {
            break;
        }
        for e in &ext {
            if !e.kind.reads_zero() {
                out.push((e.offset, e.len));
            }
        }
        off = ext.last().map_or(size, |e| e.end()).max(off + 1);
    }
    Ok(out)
}
