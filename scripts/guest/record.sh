#!/usr/bin/env bash
# Record a memory trace of a guest workload.
#   scripts/guest/record.sh WORKLOAD INTERVAL_MS COUNT OUT_DIR [MEM_MIB]
# WORKLOAD is one of the programs in workloads/ (kvstore, btree, textproc,
# churn) or "idle". Every INTERVAL_MS of guest run time the guest is
# stopped over QMP, its RAM file is copied to OUT_DIR/NNNN.ram, and it is
# resumed. Builds the guest first (scripts/guest/build.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
[ $# -ge 4 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
cache="$("$here/build.sh")"
cd "$root"
cargo build --release -q -p understudy
exec "$root/target/release/understudy" mem record --guest-dir "$cache" \
    --workload "$1" --interval "$2ms" --count "$3" --mem-mib "${5:-128}" "$4"
