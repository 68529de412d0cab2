#!/usr/bin/env python3
"""Flush-heavy NBD workload: understudy flush=durable vs flush=ordered vs
qemu-nbd --cache=writeback / --cache=unsafe.

Workload: fio's nbd engine (libnbd), 4 KiB random writes, each followed by
an NBD FLUSH (`--fsync=1`, checked to send NBD_CMD_FLUSH), queue depth 1,
one connection. Every cell gets a fresh sparse raw image. Rounds are
interleaved (each round runs every target once, in a rotated order) so slow
phases of the shared machine hit every target alike; the table reports the
median per target and ratios of medians.

Usage: python3 bench/ordering_bench.py [--rounds 3] [--runtime 5]
       [--size 256M] [--bin target/release/understudy] [--out FILE.json]
Builds the release binary first unless --bin is given.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_understudy(binary, workdir, img, port, opts):
    ctl = os.path.join(workdir, f"ctl-{port}.sock")
    args = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--control", ctl,
            "--export", f"name=d,path={img}{opts}"]
    log = open(os.path.join(workdir, f"server-{port}.log"), "w")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                         env={**os.environ, "UNDERSTUDY_LOG": "warn"})
    wait_port(port, p)
    return p


def start_qemu_nbd(img, port, cache):
    args = ["qemu-nbd", "-f", "raw", f"--cache={cache}", "-t", "-b", "127.0.0.1",
            "-p", str(port), "-x", "d", img]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    return p


TARGETS = {
    "understudy flush=durable": lambda b, w, i, p: start_understudy(b, w, i, p, ",journal=on,flush=durable"),
    "understudy flush=ordered": lambda b, w, i, p: start_understudy(b, w, i, p, ",flush=ordered"),
    "qemu-nbd cache=writeback": lambda b, w, i, p: start_qemu_nbd(i, p, "writeback"),
    "qemu-nbd cache=unsafe": lambda b, w, i, p: start_qemu_nbd(i, p, "unsafe"),
}


def run_fio(port, runtime, size):
    args = ["fio", "--name=flushy", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/d",
            "--rw=randwrite", "--bs=4k", "--fsync=1", "--iodepth=1", f"--size={size}",
            "--time_based", f"--runtime={runtime}", "--randrepeat=0", "--refill_buffers",
            "--output-format=json"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    w = job["write"]
    sync = job.get("sync", {})
    sync_lat = sync.get("lat_ns", {}).get("percentile", {}) or sync.get("lat_ns", {})
    return {
        "write_iops": w["iops"],
        "writes": w["total_ios"],
        "flushes": sync.get("total_ios", 0),
        "flush_p50_us": sync.get("lat_ns", {}).get("percentile", {}).get("50.000000", 0) / 1000,
        "flush_mean_us": sync.get("lat_ns", {}).get("mean", 0) / 1000,
        "_sync_raw": bool(sync_lat),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--bin")
    ap.add_argument("--dir", help="scratch directory (default: a temp dir under target/)")
    ap.add_argument("--out")
    a = ap.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: run scripts/install-deps.sh")
    binary = a.bin
    if not binary:
        subprocess.run(["cargo", "build", "--release", "-p", "understudy"], cwd=ROOT, check=True)
        binary = os.path.join(ROOT, "target", "release", "understudy")
    base = a.dir or os.path.join(ROOT, "target")
    os.makedirs(base, exist_ok=True)
    size_bytes = int(a.size[:-1]) << {"K": 10, "M": 20, "G": 30}[a.size[-1].upper()]
    results = {name: [] for name in TARGETS}
    names = list(TARGETS)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory(dir=base, prefix="ordbench-") as work:
                img = os.path.join(work, "disk.raw")
                with open(img, "wb") as f:
                    f.truncate(size_bytes)
                port = free_port()
                proc = TARGETS[name](binary, work, img, port)
                try:
                    res = run_fio(port, a.runtime, a.size)
                finally:
                    stop(proc)
                if res["flushes"] < res["writes"] * 0.9:
                    sys.exit(f"{name}: fio sent {res['flushes']} flushes for {res['writes']} writes")
                results[name].append(res)
                print(f"round {r + 1} {name:28} {res['write_iops']:9.0f} write+flush/s "
                      f"flush p50 {res['flush_p50_us']:8.1f} us", flush=True)
    med = {n: statistics.median(x["write_iops"] for x in v) for n, v in results.items()}
    p50 = {n: statistics.median(x["flush_p50_us"] for x in v) for n, v in results.items()}
    print()
    print(f"{'target':28} {'median write+flush/s':>21} {'flush p50 us':>13} {'runs':>30}")
    for n in names:
        runs = ", ".join(f"{x['write_iops']:.0f}" for x in results[n])
        print(f"{n:28} {med[n]:21.0f} {p50[n]:13.1f} {runs:>30}")
    dur, ordd = med["understudy flush=durable"], med["understudy flush=ordered"]
    unsafe, wb = med["qemu-nbd cache=unsafe"], med["qemu-nbd cache=writeback"]
    print()
    print(f"ordered / durable            = {ordd / dur:.2f}x  (goal >= 5x)")
    print(f"qemu-nbd unsafe / ordered    = {unsafe / ordd:.2f}x  (goal <= 1.2x)")
    print(f"ordered / qemu-nbd writeback = {ordd / wb:.2f}x")
    print(f"durable / qemu-nbd writeback = {dur / wb:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
