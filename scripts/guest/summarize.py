#!/usr/bin/env python3
"""Summarise bench-out/replay-*.json into the BENCHMARKS.md (memory checkpoint sync) tables
(bytes are deterministic; throughput is the median over the repeats)."""
import glob, json, os, re, statistics, sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench-out"
runs = {}
for f in sorted(glob.glob(os.path.join(out, "replay-*-*-*.json"))):
    m = re.match(r".*replay-(\w+)-(\d+)-(\d+)\.json", f)
    if not m:
        continue
    try:
        runs.setdefault((m.group(1), int(m.group(2))), []).append(json.load(open(f)))
    except ValueError:
        pass

print("| workload | interval | ckpts | dirty pages/ckpt | raw MiB | zero+lz4 | xbzrle | understudy | understudy saved vs raw | vs xbzrle | encode MB/s (median) | decode MB/s (median) | xbzrle enc/dec MB/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (w, ms), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    r = rs[0]
    meth = {m["name"]: m for m in r["methods"]}
    n = max(r["checkpoints"] - 1, 1)
    raw = meth["raw"]["steady_bytes"]
    mib = lambda b: b / 1048576
    us = meth["understudy"]["steady_bytes"]
    xb = meth["xbzrle"]["steady_bytes"]
    med = lambda name, key: statistics.median(x["methods"][[m["name"] for m in x["methods"]].index(name)][key] for x in rs)
    print(f"| {w} | {ms} ms | {r['checkpoints']} | {r['steady_dirty_pages']/n:.0f} | {mib(raw):.1f} | {mib(meth['zero+lz4']['steady_bytes']):.1f} | {mib(xb):.2f} | {mib(us):.2f} | {100*(1-us/raw):.1f}% | {100*(1-us/xb):.1f}% fewer | {med('understudy','encode_mb_s'):.0f} | {med('understudy','decode_mb_s'):.0f} | {med('xbzrle','encode_mb_s'):.0f}/{med('xbzrle','decode_mb_s'):.0f} |")
print()
print("Pages by kind (understudy; xbzrle), steady state:")
print()
for (w, ms), rs in sorted(runs.items()):
    meth = {m["name"]: m for m in rs[0]["methods"]}
    u = meth["understudy"]["pages"]; x = meth["xbzrle"]["pages"]
    print(f"- {w} {ms} ms: understudy zero {u['zero']}, duplicate {u['duplicate']}, delta same address {u['delta_same_address']}, delta content match {u['delta_content_match']}, literal {u['literal']}; xbzrle zero {x['zero']}, normal {x['normal']}, xbzrle {x['xbzrle']}, overflow {x['overflow']}, unchanged {x['unchanged']}")
