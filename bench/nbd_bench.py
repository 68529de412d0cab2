#!/usr/bin/env python3
"""NBD server benchmark: understudy vs qemu-nbd vs nbdkit's file plugin.

Serves the same raw file with each server, drives each with the same clients
(fio's nbd engine, nbdcopy), interleaving the servers round by round, and
reports medians and ratios. Also runs understudy with 3 enabled bitmaps to
measure the block filter's cost.

NBD over TLS: the kinds `understudy-tls` (`serve --tls-cert --tls-key
--tls=require`) and `qemu-nbd-tls` (`--object tls-creds-x509,...,
verify-peer=no --tls-creds`) serve with TLS required and a server
certificate from one throwaway CA made with openssl. fio's nbd engine and
nbdcopy (libnbd) connect with `nbds://localhost:PORT/bench?tls-verify-peer=false`:
fio's engine may not read local files, so it can name neither a CA nor a
client certificate (`tls-certificates=` is refused, and as root libnbd only
looks in /etc/pki/libnbd). Certificate checks happen once per connection;
the rows measure the record layer (TLS 1.3, AES-GCM), which is the same
either way.

Usage: python3 bench/nbd_bench.py [--size-gib 2] [--rounds 3] [--runtime 8]
       [--servers understudy-tls,qemu-nbd-tls] [--pin 1:0]
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

# (server CPU list, client CPU list) when --pin is given.
PIN = None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("UNDERSTUDY_BIN", os.path.join(ROOT, "target", "release", "understudy"))
BASE_BIN = os.environ.get("UNDERSTUDY_BASE_BIN", "")
# Set by make_pki(): the server credentials in QEMU's layout.
PKI = {}


def make_pki(work):
    """A throwaway CA and a server certificate for `localhost`, laid out for
    qemu-nbd's tls-creds-x509 dir= (ca-cert.pem, server-cert.pem,
    server-key.pem)."""
    sdir = os.path.join(work, "pki-server")
    os.makedirs(sdir)
    ca_key, ca_cert = os.path.join(work, "ca-key.pem"), os.path.join(sdir, "ca-cert.pem")

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "2",
        "-subj", "/CN=nbd-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for side, d, name in (("server", sdir, "localhost"),):
        key, cert = os.path.join(d, f"{side}-key.pem"), os.path.join(d, f"{side}-cert.pem")
        csr, ext = os.path.join(work, f"{side}.csr"), os.path.join(work, f"{side}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
        ssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)
    PKI.update(server_dir=sdir)


def uri(kind, port):
    if kind.endswith("-tls"):
        return f"nbds://localhost:{port}/bench?tls-verify-peer=false"
    return f"nbd://127.0.0.1:{port}/bench"




def start(kind, image, port, work):
    if kind in ("understudy", "understudy@base"):
        # understudy@base: the binary named by UNDERSTUDY_BASE_BIN (a build of
        # an earlier commit), for before/after comparisons in one run.
        binary = BASE_BIN if kind == "understudy@base" else BIN
        cmd = [binary, "--log", "warn", "serve", "--listen", f"127.0.0.1:{port}",
               "--control", os.path.join(work, f"ctl-{port}.sock"),
               "--export", f"name=bench,path={image},format=raw"]
    elif kind == "understudy+3bitmaps":
        cmd = [BIN, "--log", "warn", "serve", "--listen", f"127.0.0.1:{port}",
               "--control", os.path.join(work, f"ctl-{port}.sock"),
               "--export", f"name=bench,path={image},format=raw,bitmap=a,bitmap=b,bitmap=c"]
    elif kind == "understudy-tls":
        sdir = PKI["server_dir"]
        cmd = [BIN, "--log", "warn", "serve", "--listen", f"127.0.0.1:{port}",
               "--control", os.path.join(work, f"ctl-{port}.sock"),
               "--tls-cert", os.path.join(sdir, "server-cert.pem"),
               "--tls-key", os.path.join(sdir, "server-key.pem"), "--tls=require",
               "--export", f"name=bench,path={image},format=raw"]
    elif kind in ("qemu-nbd", "qemu-nbd-tls"):
        cmd = ["qemu-nbd", "-f", "raw", "-x", "bench", "-b", "127.0.0.1", "-p", str(port),
               "-e", "64", "-t", "--cache=writeback", "--aio=threads", image]
        if kind == "qemu-nbd-tls":
            # No client certificates, like understudy-tls (see the docstring).
            creds = f"tls-creds-x509,id=tls0,dir={PKI['server_dir']},endpoint=server,verify-peer=no"
            cmd[1:1] = ["--object", creds, "--tls-creds", "tls0"]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "bench",
               "file", f"file={image}"]
    else:
        raise ValueError(kind)
    if PIN:
        cmd = ["taskset", "-c", PIN[0]] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc


def stop(proc, work):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fio(uri, rw, bs, depth, runtime, size):
    cmd = (["taskset", "-c", PIN[1]] if PIN else []) + ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", f"--runtime={runtime}", "--time_based", f"--size={size}",
           "--output-format=json", "--randrepeat=0"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = "read" if "read" in rw else "write"
    return job[side]["iops"], job[side]["bw_bytes"]


def nbdcopy(uri):
    t = time.time()
    subprocess.run((["taskset", "-c", PIN[1]] if PIN else []) + ["nbdcopy", uri, "null:"], check=True)
    return time.time() - t


WORKLOADS = [
    ("4k randwrite qd16 (IOPS)", lambda u, a: fio(u, "randwrite", "4k", 16, a.runtime, a.size)[0]),
    ("4k randread qd16 (IOPS)", lambda u, a: fio(u, "randread", "4k", 16, a.runtime, a.size)[0]),
    ("1M seq write (MB/s)", lambda u, a: fio(u, "write", "1M", 4, a.runtime, a.size)[1] / 1e6),
    ("1M seq read (MB/s)", lambda u, a: fio(u, "read", "1M", 4, a.runtime, a.size)[1] / 1e6),
    ("nbdcopy to null (MB/s)", lambda u, a: a.size_bytes / nbdcopy(u) / 1e6),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--servers", default="understudy,understudy+3bitmaps,qemu-nbd,nbdkit")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-rotate-images", dest="rotate_images", action="store_false",
                    help="keep each server on one image file for the whole run")
    ap.add_argument("--pin", help="SERVER_CPUS:CLIENT_CPUS, e.g. 1:0 (taskset), to keep the servers and the "
                    "clients off each other's cores and cut the noise")
    args = ap.parse_args()
    global PIN
    if args.pin:
        PIN = tuple(args.pin.split(":", 1))
    args.size_bytes = int(args.size_gib * (1 << 30))
    args.size = args.size_bytes
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run `cargo build --release -p understudy` first")
    servers = args.servers.split(",")
    work = tempfile.mkdtemp(prefix="nbd-bench-")
    if any(s.endswith("-tls") for s in servers):
        make_pki(work)
    # One fully allocated, non-zero image per server (so bitmap sidecars and
    # locks never collide), all served at once; measurements interleave at
    # the finest grain: for each round and workload, every server in turn,
    # in an order that rotates every round.
    chunk = os.urandom(1 << 20)
    images = {}
    for i, s in enumerate(servers):
        images[s] = os.path.join(work, f"bench{i}.raw")
        with open(images[s], "wb") as f:
            for _ in range(args.size_bytes >> 20):
                f.write(chunk)
    results = {s: {w[0]: [] for w in WORKLOADS} for s in servers}
    procs = {}
    files = [images[s] for s in servers]

    def restart(r):
        # Each round every server gets another image file: the page-cache
        # state of a file (folio sizes, what writeback has reached) moved
        # one server's 4 KiB rows by up to 40% for a whole run when the
        # files were fixed. Sidecars go, so no server inherits bitmaps.
        for s, (p, _) in list(procs.items()):
            stop(p, work)
        procs.clear()
        for f in files:
            for suffix in (".bitmaps", ".bitmaps-intent", ".bitmaps.tmp"):
                if os.path.exists(f + suffix):
                    os.remove(f + suffix)
        for i, s in enumerate(servers):
            port = free_port()
            img = files[(i + r) % len(files)] if args.rotate_images else images[s]
            procs[s] = (start(s, img, port, work), uri(s, port))

    try:
        for r in range(args.rounds):
            if r == 0 or args.rotate_images:
                restart(r)
            for wi, (name, fn) in enumerate(WORKLOADS):
                k = (r + wi) % len(servers)
                for s in servers[k:] + servers[:k]:
                    v = fn(procs[s][1], args)
                    results[s][name].append(v)
                    print(f"round {r + 1} {s:<22} {name:<26} {v:12.1f}", file=sys.stderr)
    finally:
        for s, (p, _) in procs.items():
            stop(p, work)
        shutil.rmtree(work, ignore_errors=True)
    med = {s: {w: statistics.median(v) for w, v in d.items()} for s, d in results.items()}
    if args.json:
        print(json.dumps({"medians": med, "raw": results}, indent=2))
        return
    print(f"image {args.size_gib} GiB, {args.rounds} rounds, {args.runtime} s per fio run, "
          f"medians; images rotated: {args.rotate_images}; nproc={os.cpu_count()}, pin (server:client)={args.pin}, load after: {os.getloadavg()[0]:.1f}")
    print()
    hdr = ("| workload | " + " | ".join(servers)
           + " | us/nbdkit | us/qemu-nbd | 3 bitmaps/none | tls: us/qemu-nbd |")
    print(hdr)
    print("|" + "---|" * (len(servers) + 5))
    for name, _ in WORKLOADS:
        row = [f"{med[s][name]:.0f}" for s in servers]
        us = med.get("understudy", {}).get(name)
        def ratio(other):
            o = med.get(other, {}).get(name)
            return f"{us / o:.2f}" if us and o else "-"
        bm = med.get("understudy+3bitmaps", {}).get(name)
        bmr = f"{bm / us:.3f}" if bm and us else "-"
        ut, qt = med.get("understudy-tls", {}).get(name), med.get("qemu-nbd-tls", {}).get(name)
        tls = f"{ut / qt:.2f}" if ut and qt else "-"
        print(f"| {name} | " + " | ".join(row)
              + f" | {ratio('nbdkit')} | {ratio('qemu-nbd')} | {bmr} | {tls} |")


if __name__ == "__main__":
    main()
