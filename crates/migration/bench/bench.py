#!/usr/bin/env python3
"""Migration benchmark: two `understudy serve` daemons on loopback, a disk
of SIZE with ALLOC allocated, a steady qemu-io writer connected to the
source through the whole run (forwarded after the switch-over).

Usage: python3 crates/migration/bench/bench.py [--size 2G] [--alloc 1024]
       [--runs 3] [--pingpong 4]   (after `cargo build --release -p understudy`)

Prints one JSON object per migration, then a summary.
"""
import argparse, json, os, random, socket, statistics, subprocess, sys, tempfile, time

BIN = os.environ.get("BIN", "target/release/understudy")
# TLS=1: peer links over mutual TLS (understudy certs) instead of the PSK.
TLS = os.environ.get("TLS") == "1"


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def qemu_io(target, cmds, check=True):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(target)
    r = subprocess.run(args, capture_output=True, text=True)
    if check and (r.returncode != 0 or "failed" in r.stdout + r.stderr):
        sys.exit(f"qemu-io failed: {r.stdout}{r.stderr}")
    return r


class Server:
    def __init__(self, d, name, extra):
        self.port = free_port()
        self.peer = f"127.0.0.1:{free_port()}"
        self.ctl = os.path.join(d, f"{name}.sock")
        self.log = open(os.path.join(d, f"{name}.log"), "w")
        if TLS:
            # Mutual TLS 1.3 on the peer link: a CA and a certificate per node.
            pki = os.path.join(d, "pki")
            if not os.path.exists(os.path.join(pki, "ca.pem")):
                subprocess.run([BIN, "certs", "init", "--dir", pki], check=True, capture_output=True)
            subprocess.run([BIN, "certs", "issue", "--dir", pki, name], check=True, capture_output=True)
            auth = ["--peer-tls-cert", os.path.join(pki, f"{name}.pem"),
                    "--peer-tls-key", os.path.join(pki, f"{name}-key.pem"),
                    "--peer-tls-ca", os.path.join(pki, "ca.pem")]
        else:
            auth = ["--node-id", name, "--peer-key", os.path.join(d, "key")]
        args = [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--control", self.ctl] + auth + [
                "--accept-migrations", os.path.join(d, f"{name}-in"), "--peer-listen", self.peer] + extra
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)
        SERVERS.append(self)
        for _ in range(300):
            if os.path.exists(self.ctl):
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close(); return
                except OSError:
                    pass
            time.sleep(0.02)
        sys.exit(f"{name} did not start")

    def uri(self, export="vm"):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def migrate(self, to, mode):
        r = subprocess.run([BIN, "migrate", "vm", "--to", to.peer, "--control", self.ctl,
                            "--json", "--mode", mode], capture_output=True, text=True)
        last = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        if r.returncode != 0 or last.get("phase") != "completed":
            sys.exit(f"migration failed: {r.stdout[-2000:]}{r.stderr}")
        return last

    def stop(self):
        self.p.terminate(); self.p.wait(30)


def writer(uri, size, seconds, block, rate_mib):
    """A steady writer: `rate_mib` MiB/s in `block` writes for `seconds`."""
    n = int(rate_mib * seconds * (1 << 20) / block)
    gap_ms = max(1, int(1000 * seconds / max(n, 1)))
    cmds = []
    rnd = random.Random(7)
    for i in range(n):
        off = rnd.randrange(size // block) * block
        cmds += [f"write -P {i % 250 + 1} {off} {block}", f"sleep {gap_ms}"]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(uri)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), n * block


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


SERVERS = []


def main():
    try:
        run()
    finally:
        for s in SERVERS:
            if s.p.poll() is None:
                s.p.kill()


def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2G")
    ap.add_argument("--alloc", type=int, default=1024, help="MiB allocated before the run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pingpong", type=int, default=4)
    ap.add_argument("--rate", type=float, default=8.0, help="writer MiB/s")
    a = ap.parse_args()
    size = parse_size(a.size)
    results = {"precopy": [], "mirror": [], "incremental": [], "pingpong": []}
    for mode in ["precopy", "mirror"]:
        for run in range(a.runs):
            d = tempfile.mkdtemp(prefix="migbench-")
            with open(os.path.join(d, "key"), "w") as f:
                f.write(os.urandom(32).hex() + "\n")
            os.chmod(os.path.join(d, "key"), 0o600)
            img = os.path.join(d, "vm.img")
            subprocess.run(["qemu-img", "create", "-f", "raw", img, str(size)], check=True,
                           capture_output=True)
            # Allocate ALLOC MiB in 64 MiB pieces spread over the disk.
            step = size // max(1, a.alloc // 64)
            qemu_io(img, [f"write -P {i + 1} {i * step} 64M" for i in range(a.alloc // 64)])
            A = Server(d, "a", ["--export", f"name=vm,path={img}"])
            B = Server(d, "b", [])
            w, wbytes = writer(A.uri(), size, 30, 64 << 10, a.rate)
            time.sleep(1.0)
            st = A.migrate(B, mode)
            st["allocated"] = a.alloc << 20
            st["ratio"] = st["data_bytes"] / (a.alloc << 20)
            print(json.dumps({"kind": mode, **st}), flush=True)
            results[mode].append(st)
            if mode == "precopy" and run == 0:
                # Ping-pong under the writer: incremental migrations with
                # switch-overs, for more downtime samples.
                src, dst = B, A
                for _ in range(a.pingpong):
                    st2 = src.migrate(dst, "precopy")
                    print(json.dumps({"kind": "pingpong", **st2}), flush=True)
                    results["pingpong"].append(st2)
                    src, dst = dst, src
                w.terminate(); w.wait()
                # Incremental back with a known change set and no writer.
                rnd = random.Random(11)
                offs = sorted({rnd.randrange(size // 65536) * 65536 for _ in range(1024)})
                for i in range(0, len(offs), 200):
                    qemu_io(src.uri(), [f"write -P 0x3c {o} 64k" for o in offs[i:i + 200]])
                st3 = src.migrate(dst, "precopy")
                st3["changed"] = len(offs) * 65536
                st3["ratio"] = st3["data_bytes"] / st3["changed"]
                print(json.dumps({"kind": "incremental", **st3}), flush=True)
                results["incremental"].append(st3)
            else:
                w.terminate(); w.wait()
            A.stop(); B.stop()
            subprocess.run(["rm", "-rf", d])
    def med(xs):
        return statistics.median(xs) if xs else float("nan")
    print("SUMMARY")
    for k in ["precopy", "mirror", "pingpong", "incremental"]:
        r = results[k]
        if not r:
            continue
        print(f"{k:12} n={len(r)} downtime_ms median={med([x['downtime_ms'] for x in r]):.2f} "
              f"max={max(x['downtime_ms'] for x in r):.2f} total_ms median={med([x['total_ms'] for x in r]):.0f} "
              f"rounds={[x['rounds'] for x in r]} modes={[x['mode'] for x in r]} "
              f"ratio={[round(x.get('ratio', 0), 4) for x in r]} data_bytes={[x['data_bytes'] for x in r]}")


if __name__ == "__main__":
    main()
