#!/bin/bash
# Interleaved: migration copy over the PSK+MAC link vs over mutual TLS.
cd "$(dirname "$0")/.."
for i in 1 2 3; do
  for mode in psk tls; do
    echo "=== $mode $i"
    if [ $mode = tls ]; then t=1; else t=0; fi
    TLS=$t BIN=${BIN:-target/release/understudy} python3 crates/migration/bench/bench.py --size 2G --alloc 1024 --runs 1 --pingpong 0 2>&1 | grep '^{"kind": "precopy\|^{"kind": "mirror\|SUMMARY\|failed'
  done
done
