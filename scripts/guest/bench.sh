#!/usr/bin/env bash
# Record every workload at 25, 100 and 500 ms and replay each trace with
# all methods; writes JSON + text reports to $OUT (default bench-out/).
#   scripts/guest/bench.sh [WORKLOADS...]
# Traces are deleted after their replay (they are large: 128 MiB/image).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${OUT:-$root/bench-out}"
repeats="${REPEATS:-3}"
mkdir -p "$out"
cd "$root"
cargo build --release -q -p understudy
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(kvstore btree textproc churn)
# interval_ms:count  (2 s, 3 s and 5 s of guest time)
for w in "${workloads[@]}"; do
    for spec in 25:80 100:30 500:10; do
        ms="${spec%%:*}"; n="${spec##*:}"
        t="$out/trace-$w-$ms"
        rm -rf "$t"
        "$here/record.sh" "$w" "$ms" "$n" "$t" > "$out/record-$w-$ms.json"
        for r in $(seq 1 "$repeats"); do
            "$root/target/release/understudy" mem replay "$t" --json > "$out/replay-$w-$ms-$r.json"
        done
        "$root/target/release/understudy" mem replay "$t" --no-verify > "$out/replay-$w-$ms.txt"
        rm -rf "$t"
    done
done
echo "reports in $out"
