#!/usr/bin/env python3
"""Anchor: QEMU 7.2 blockdev-mirror from qemu-storage-daemon to an NBD
target (qemu-nbd), same disk layout and writer as bench.py.

Usage: python3 crates/migration/bench/qemu_mirror.py [--mode background|write-blocking]
Prints total time to READY, the pivot (job-complete until COMPLETED), and
the job's len (bytes it had to copy, including re-dirtied ones).
"""
import argparse, json, os, random, socket, subprocess, sys, tempfile, time


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Qmp:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m); continue
            if "error" in m:
                sys.exit(f"{name}: {m['error']}")
            return m["return"]

    def wait_event(self, name):
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e); return e
            line = self.f.readline()
            if not line:
                sys.exit(f"QMP closed before {name}")
            self.events.append(json.loads(line))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="background")
    ap.add_argument("--size", type=int, default=2 << 30)
    ap.add_argument("--alloc", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=8.0)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="qmirror-")
    src, dst = os.path.join(d, "src.img"), os.path.join(d, "dst.img")
    for p in (src, dst):
        subprocess.run(["qemu-img", "create", "-f", "raw", p, str(a.size)], check=True, capture_output=True)
    step = a.size // (a.alloc // 64)
    subprocess.run(["qemu-io", "-f", "raw"] + sum([["-c", f"write -P {i+1} {i*step} 64M"] for i in range(a.alloc // 64)], []) + [src],
                   check=True, capture_output=True)
    pt, ps = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "dst", "-b", "127.0.0.1", "-p", str(pt), "-t", "-e", "4", dst]))
        qmp_path = os.path.join(d, "qmp.sock")
        procs.append(subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"file,node-name=f,filename={src},cache.direct=off",
            "--blockdev", "raw,node-name=src,file=f",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={ps}",
            "--export", "nbd,id=e,node-name=src,writable=on,name=vm",
            "--chardev", f"socket,path={qmp_path},server=on,wait=off,id=c",
            "--monitor", "chardev=c"]))
        time.sleep(0.5)
        q = Qmp(qmp_path)
        # Steady writer, as in bench.py.
        n = int(a.rate * 30 * (1 << 20) / 65536); gap = max(1, int(30000 / n)); rnd = random.Random(7)
        cmds = sum([["-c", f"write -P {i % 250 + 1} {rnd.randrange(a.size // 65536) * 65536} 64k", "-c", f"sleep {gap}"] for i in range(n)], [])
        w = subprocess.Popen(["qemu-io", "-f", "raw"] + cmds + [f"nbd://127.0.0.1:{ps}/vm"], stdout=subprocess.DEVNULL)
        procs.append(w)
        time.sleep(1.0)
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "inet", "host": "127.0.0.1", "port": str(pt)}, export="dst")
        t0 = time.time()
        q.cmd("blockdev-mirror", **{"job-id": "m", "copy-mode": a.mode}, device="src", target="tgt", sync="full")
        q.wait_event("BLOCK_JOB_READY")
        t_ready = time.time() - t0
        jobs = q.cmd("query-block-jobs")
        t1 = time.time()
        q.cmd("job-complete", id="m")
        q.wait_event("BLOCK_JOB_COMPLETED")
        pivot = time.time() - t1
        print(json.dumps({"kind": f"qemu-mirror-{a.mode}", "ready_ms": t_ready * 1e3,
                          "pivot_ms": pivot * 1e3, "total_ms": (time.time() - t0) * 1e3,
                          "len": jobs[0]["len"] if jobs else None, "allocated": a.alloc << 20}))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
