//! Replay a trace with every method (until `understudy mem replay` exists).
//! Usage: memsync-replay TRACE_DIR [--json] [--stride N] [--max N] [--no-verify]

use std::path::PathBuf;

use understudy_memsync::replay::{ReplayOptions, run};

fn main() {
    let mut a = std::env::args().skip(1);
    let mut dir = None;
    let mut json = false;
    let mut o = ReplayOptions::default();
    while let Some(k) = a.next() {
        match k.as_str() {
            "--json" => json = true,
            "--no-verify" => o.verify = false,
            "--stride" => o.stride = a.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--max" => o.max_checkpoints = a.next().and_then(|v| v.parse().ok()),
            "--store-mib" => {
                o.store_budget_bytes =
                    a.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(64) << 20
            }
            _ => dir = Some(PathBuf::from(k)),
        }
    }
    let Some(dir) = dir else {
        eprintln!(
            "usage: memsync-replay TRACE_DIR [--json] [--stride N] [--max N] [--no-verify] [--store-mib N]"
        );
        std::process::exit(2);
    };
    match run(&dir, &o) {
        Ok(r) if json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Ok(r) => print!("{r}"),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            eprintln!("replay failed: {s}");
            std::process::exit(1);
        }
    }
}
