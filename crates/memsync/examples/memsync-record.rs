//! Record a memory trace (used by scripts/guest/record.sh until the
//! `understudy mem record` command exists).

use std::path::PathBuf;
use std::time::Duration;

use understudy_memsync::record::{RecordOptions, record};

fn main() {
    let mut a = std::env::args().skip(1);
    let (mut kernel, mut initrd, mut workload, mut out) = (None, None, None, None);
    let (mut interval, mut count, mut mem) = (100u64, 10usize, 128u32);
    while let Some(k) = a.next() {
        let v = a.next().unwrap_or_default();
        match k.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(v)),
            "--initrd" => initrd = Some(PathBuf::from(v)),
            "--workload" => workload = Some(v),
            "--out" => out = Some(PathBuf::from(v)),
            "--interval-ms" => interval = v.parse().unwrap_or(interval),
            "--count" => count = v.parse().unwrap_or(count),
            "--mem-mib" => mem = v.parse().unwrap_or(mem),
            _ => {
                eprintln!("unknown option {k}");
                std::process::exit(2);
            }
        }
    }
    let (Some(kernel), Some(initrd), Some(workload), Some(out)) = (kernel, initrd, workload, out)
    else {
        eprintln!(
            "usage: memsync-record --kernel K --initrd I --workload W --out DIR [--interval-ms N] [--count N] [--mem-mib N]"
        );
        std::process::exit(2);
    };
    let mut o = RecordOptions::new(
        kernel,
        initrd,
        &workload,
        Duration::from_millis(interval),
        count,
        out,
    );
    o.mem_mib = mem;
    match record(&o) {
        Ok(r) => println!("{}", serde_json::to_string(&r).unwrap_or_default()),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            eprintln!("record failed: {s}");
            std::process::exit(1);
        }
    }
}
