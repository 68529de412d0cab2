//! Parsing of `key=value,...` command-line specs such as `--export`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use understudy_block::Format;
use understudy_journal::{FlushPolicy, JournalConfig};

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

/// Default ordered-flush interval: closed epochs become durable within it.
pub const DEFAULT_ORDER_INTERVAL: Duration = Duration::from_secs(5);
/// Default journal ring size (128 MiB).
pub const DEFAULT_JOURNAL_SIZE: u64 = 128 << 20;

/// What NBD `FLUSH` means on a journaled export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// `flush=durable`: acknowledged flushes are on stable storage.
    Durable,
    /// `flush=ordered[:INTERVAL]`: a flush is an ordering barrier;
    /// durability follows within the interval (or at a FUA write).
    Ordered(Duration),
}

/// The epoch journal of one export (`journal=on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSpec {
    /// Flush policy.
    pub flush: FlushMode,
    /// Ring size in bytes.
    pub size: u64,
    /// Writes at least this large may go to the image in place.
    pub in_place_min: Option<u64>,
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
    /// The epoch journal, when `journal=on` or `flush=ordered`.
    pub journal: Option<JournalSpec>,
}

/// Parse the `INTERVAL` of `flush=ordered:INTERVAL`: seconds (`2`, `0.5`)
/// or a duration with a unit (`200ms`, `5s`, `1m`).
fn parse_interval(v: &str) -> Result<Duration> {
    let d = match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => bail!("flush=ordered:{v}: the interval must be between 0 and 86400 seconds"),
        Err(_) => humantime::parse_duration(v).with_context(|| {
            format!("flush=ordered:{v}: use seconds (`5`) or a duration (`200ms`, `5s`)")
        })?,
    };
    if d.is_zero() || d > Duration::from_secs(86_400) {
        bail!("flush=ordered:{v}: the interval must be more than 0 and at most 24h");
    }
    Ok(d)
}

fn parse_on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => bail!("{k}={v:?}: use on or off"),
    }
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

/// The journal keys of a spec (`journal`, `flush`, `journal-size`,
/// `in-place-min`), gathered before they are checked together.
#[derive(Debug, Default)]
struct JournalOptions {
    journal: Option<bool>,
    flush: Option<FlushMode>,
    size: Option<u64>,
    in_place_min: Option<u64>,
}

impl JournalOptions {
    /// Take `k=v` if it is a journal key (`Ok(false)` if it is not).
    fn set(&mut self, k: &str, v: Option<&str>) -> Result<bool> {
        let Some(v) = v else { return Ok(false) };
        match k {
            "journal" => self.journal = Some(parse_on_off(k, v)?),
            "flush" => {
                self.flush = Some(match v.split_once(':') {
                    None if v == "durable" => FlushMode::Durable,
                    None if v == "ordered" => FlushMode::Ordered(DEFAULT_ORDER_INTERVAL),
                    Some(("ordered", i)) => FlushMode::Ordered(parse_interval(i)?),
                    _ => bail!("flush={v:?}: use durable, ordered or ordered:INTERVAL"),
                })
            }
            "journal-size" => {
                let n = parse_size(v)?;
                if !(64 << 10..=64 << 30).contains(&n) || n % 512 != 0 {
                    bail!(
                        "journal-size={v}: use a multiple of 512 bytes from 64k to 64g (default 128M)"
                    );
                }
                self.size = Some(n);
            }
            "in-place-min" => {
                let n = parse_size(v)?;
                if n == 0 {
                    bail!(
                        "in-place-min must be positive (e.g. 64k); leave it out to journal every write"
                    );
                }
                self.in_place_min = Some(n);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The journal asked for, if any.
    fn finish(self) -> Result<Option<JournalSpec>> {
        // flush=ordered needs the journal; asking for it turns the journal on.
        let journaled = match (self.journal, self.flush) {
            (Some(false), Some(FlushMode::Ordered(_))) => {
                bail!("flush=ordered needs the epoch journal: drop journal=off")
            }
            (Some(j), _) => j,
            (None, f) => matches!(f, Some(FlushMode::Ordered(_))),
        };
        if !journaled && (self.size.is_some() || self.in_place_min.is_some()) {
            bail!("journal-size and in-place-min configure the journal: add journal=on");
        }
        Ok(journaled.then(|| JournalSpec {
            flush: self.flush.unwrap_or(FlushMode::Durable),
            size: self.size.unwrap_or(DEFAULT_JOURNAL_SIZE),
            in_place_min: self.in_place_min,
        }))
    }
}

impl JournalSpec {
    /// The journal crate's configuration for this spec.
    pub fn config(&self) -> JournalConfig {
        JournalConfig {
            capacity: self.size,
            policy: match self.flush {
                FlushMode::Durable => FlushPolicy::Durable,
                FlushMode::Ordered(interval) => FlushPolicy::Ordered { interval },
            },
            in_place_min: self.in_place_min,
        }
    }
}

/// `serve --received-journal`: the epoch journal of disks received by
/// migration. `off` (the default, as an `--export` without `journal=on`),
/// `on`, or `on,journal-size=SIZE,in-place-min=SIZE`. Their flushes stay
/// durable (`flush=durable`): the migration's commit relies on that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedJournal(pub Option<JournalSpec>);

impl std::str::FromStr for ReceivedJournal {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut journal = JournalOptions::default();
        for (i, part) in s.split(',').filter(|p| !p.is_empty()).enumerate() {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None if i == 0 => ("journal", Some(part)),
                None => (part, None),
            };
            if !journal.set(k, v)? {
                bail!(
                    "unknown --received-journal option {part:?}: use off, on, or on,journal-size=SIZE,in-place-min=SIZE"
                );
            }
        }
        let spec = journal.finish()?;
        if let Some(JournalSpec {
            flush: FlushMode::Ordered(_),
            ..
        }) = spec
        {
            bail!(
                "--received-journal cannot use flush=ordered: a migration's commit needs durable flushes; drop the flush option"
            );
        }
        Ok(Self(spec))
    }
}

impl std::str::FromStr for ExportSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut name = None;
        let mut path = None;
        let mut format = None;
        let mut read_only = false;
        let mut bitmaps: Vec<BitmapSpec> = Vec::new();
        let mut journal = JournalOptions::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            if journal.set(k, v)? {
                continue;
            }
            match (k, v) {
                ("name", Some(v)) => name = Some(v.to_owned()),
                ("path", Some(v)) => path = Some(PathBuf::from(v)),
                ("format", Some(v)) => {
                    format = Some(v.parse::<Format>().map_err(anyhow::Error::msg)?)
                }
                ("readonly" | "ro", None) => read_only = true,
                ("readonly" | "ro", Some(v)) => read_only = parse_on_off(k, v)?,
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
                    "unknown --export option {part:?}: expected name=NAME,path=PATH[,format=raw|qcow2][,readonly][,bitmap=NAME[:GRANULARITY]][,journal=on|off][,flush=durable|ordered[:INTERVAL]][,journal-size=SIZE][,in-place-min=SIZE]"
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
        let journal = journal.finish()?;
        if journal.is_some() && read_only {
            bail!("a readonly export has nothing to journal: drop journal/flush or readonly");
        }
        Ok(Self {
            name,
            path,
            format,
            read_only,
            bitmaps,
            journal,
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
            "path=a,journal=maybe",
            "path=a,flush=sometimes",
            "path=a,flush=ordered:0",
            "path=a,flush=ordered:-1",
            "path=a,flush=ordered:soon",
            "path=a,flush=durable:5",
            "path=a,journal=off,flush=ordered",
            "path=a,journal-size=64M",
            "path=a,in-place-min=64k",
            "path=a,journal=on,journal-size=1k",
            "path=a,journal=on,journal-size=100000",
            "path=a,journal=on,journal-size=128g",
            "path=a,journal=on,in-place-min=0",
            "path=a,readonly,journal=on",
            "path=a,readonly,flush=ordered",
        ] {
            assert!(bad.parse::<ExportSpec>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn journal_options() {
        let j = |s: &str| s.parse::<ExportSpec>().unwrap().journal;
        assert_eq!(j("path=a"), None);
        assert_eq!(j("path=a,flush=durable"), None);
        assert_eq!(j("path=a,journal=off"), None);
        assert_eq!(
            j("path=a,journal=on"),
            Some(JournalSpec {
                flush: FlushMode::Durable,
                size: DEFAULT_JOURNAL_SIZE,
                in_place_min: None
            })
        );
        // ordered implies the journal.
        assert_eq!(
            j("path=a,flush=ordered").unwrap().flush,
            FlushMode::Ordered(DEFAULT_ORDER_INTERVAL)
        );
        assert_eq!(
            j("path=a,flush=ordered:200ms").unwrap().flush,
            FlushMode::Ordered(Duration::from_millis(200))
        );
        assert_eq!(
            j("path=a,flush=ordered:2").unwrap().flush,
            FlushMode::Ordered(Duration::from_secs(2))
        );
        let full =
            j("path=a,journal=on,flush=ordered:0.5,journal-size=1M,in-place-min=64k").unwrap();
        assert_eq!(
            full,
            JournalSpec {
                flush: FlushMode::Ordered(Duration::from_millis(500)),
                size: 1 << 20,
                in_place_min: Some(65536)
            }
        );
    }

    #[test]
    fn received_journal_options() {
        let r = |s: &str| s.parse::<ReceivedJournal>().map(|r| r.0);
        assert_eq!(r("off").unwrap(), None);
        let on = r("on").unwrap().unwrap();
        assert_eq!(on.flush, FlushMode::Durable);
        assert_eq!(on.size, DEFAULT_JOURNAL_SIZE);
        let sized = r("on,journal-size=1M,in-place-min=64k").unwrap().unwrap();
        assert_eq!((sized.size, sized.in_place_min), (1 << 20, Some(65536)));
        assert_eq!(
            sized.config().policy,
            understudy_journal::FlushPolicy::Durable
        );
        for bad in [
            "maybe",
            "on,flush=ordered",
            "flush=ordered:2s",
            "on,bitmap=x",
            "journal-size=1M",
        ] {
            assert!(r(bad).is_err(), "{bad} should fail");
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
