//! Parsing of `key=value,...` command-line specs such as `--export`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use understudy_block::Format;

/// Default bitmap granularity (64 KiB), as QEMU's default for most images.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// A bitmap requested on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSpec {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
}

/// One `--export` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name clients ask for.
    pub name: String,
    /// Image path.
    pub path: PathBuf,
    /// Format override; `None` detects.
    pub format: Option<Format>,
    /// Refuse writes.
    pub read_only: bool,
    /// Bitmaps created on first start and reopened later.
    pub bitmaps: Vec<BitmapSpec>,
}

/// Parse a size such as `4096`, `64k`, `64K`, `1M`, `2g`, `64KiB`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    if num.is_empty() {
        bail!("invalid size {s:?}: expected a number with an optional k, m, g or t suffix");
    }
    let n: u64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => bail!("invalid size suffix in {s:?}: use k, m, g or t"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

/// Check a bitmap granularity: a power of two from 4 KiB to 64 MiB.
pub fn check_granularity(g: u64) -> Result<u64> {
    if !g.is_power_of_two() || !(4096..=(64 << 20)).contains(&g) {
        bail!("bitmap granularity {g} is invalid: use a power of two from 4k to 64M (default 64k)");
    }
    Ok(g)
}

impl std::str::FromStr for ExportSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut name = None;
        let mut path = None;
        let mut format = None;
        let mut read_only = false;
        let mut bitmaps: Vec<BitmapSpec> = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match (k, v) {
                ("name", Some(v)) => name = Some(v.to_owned()),
                ("path", Some(v)) => path = Some(PathBuf::from(v)),
                ("format", Some(v)) => {
                    format = Some(v.parse::<Format>().map_err(anyhow::Error::msg)?)
                }
                ("readonly" | "ro", None) => read_only = true,
                ("readonly" | "ro", Some(v)) => {
                    read_only = match v {
                        "on" | "true" | "yes" | "1" => true,
                        "off" | "false" | "no" | "0" => false,
                        _ => bail!("readonly={v:?}: use on or off"),
                    }
                }
                ("bitmap", Some(v)) => {
                    let (bname, gran) = match v.split_once(':') {
                        Some((n, g)) => (n, check_granularity(parse_size(g)?)?),
                        None => (v, DEFAULT_GRANULARITY),
                    };
                    if bname.is_empty() || bname.len() > 255 {
                        bail!("bitmap name {bname:?} must be 1 to 255 bytes");
                    }
                    if bitmaps.iter().any(|b| b.name == bname) {
                        bail!("bitmap {bname:?} is named twice in one --export");
                    }
                    bitmaps.push(BitmapSpec {
                        name: bname.to_owned(),
                        granularity: gran,
                    });
                }
                _ => bail!(
                    "unknown --export option {part:?}: expected name=NAME,path=PATH[,format=raw|qcow2][,readonly][,bitmap=NAME[:GRANULARITY]]"
                ),
            }
        }
        let path = path.context("--export needs path=IMAGE")?;
        let name = match name {
            Some(n) => n,
            None => path
                .file_stem()
                .and_then(|s| s.to_str())
                .context("--export needs name=NAME (the path has no usable file name)")?
                .to_owned(),
        };
        if name.len() > 4096 {
            bail!("export name is longer than the NBD limit of 4096 bytes");
        }
        if read_only && !bitmaps.is_empty() {
            bail!("a readonly export cannot record writes: drop bitmap= or readonly");
        }
        Ok(Self {
            name,
            path,
            format,
            read_only,
            bitmaps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_spec() {
        let s: ExportSpec = "name=disk,path=/tmp/d.img,format=qcow2,bitmap=b1,bitmap=b2:4k"
            .parse()
            .unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(s.bitmaps.len(), 2);
        assert_eq!(s.bitmaps[0].granularity, DEFAULT_GRANULARITY);
        assert_eq!(s.bitmaps[1].granularity, 4096);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "name=x",
            "path=a,format=vmdk",
            "path=a,bitmap=b:3k",
            "path=a,bitmap=b:128M",
            "path=a,bogus=1",
            "path=a,bitmap=b,bitmap=b",
            "path=a,readonly,bitmap=b",
        ] {
            assert!(bad.parse::<ExportSpec>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999999999t").is_err());
    }
}
