#!/usr/bin/env python3
"""Interleaved A/B of fio over NBD between understudy binaries.

Usage: python3 bench/ab_fio.py BIN_A,BIN_B[,...] [ROUNDS] [RW] [BS]
(e.g. `... 8 read 1M`: a prefilled 1 GiB image, a fresh server per run).
"""
import json, os, signal, socket, statistics, subprocess, sys, tempfile, time
bins = sys.argv[1].split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
rw = sys.argv[3] if len(sys.argv) > 3 else "randwrite"
bs = sys.argv[4] if len(sys.argv) > 4 else "4k"
prefill = rw in ("read", "randread")
work = tempfile.mkdtemp(prefix="ab-", dir=os.environ.get("BENCH_DIR", "."))
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
res = {b: [] for b in bins}
for r in range(rounds):
    order = bins if r % 2 == 0 else bins[::-1]
    for b in order:
        img = os.path.join(work, "img")
        for f in os.listdir(work): os.remove(os.path.join(work, f))
        subprocess.run(["qemu-img", "create", "-f", "raw", img, "1G"], check=True, capture_output=True)
        if prefill:
            subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=1024", "conv=notrunc,fsync"],
                           check=True, capture_output=True)
        port = free_port()
        p = subprocess.Popen([b, "--log", "warn", "serve", "--listen", f"127.0.0.1:{port}", "--control",
                              os.path.join(work, "ctl.sock"), "--export", f"name=bench,path={img},format=raw"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            try: socket.create_connection(("127.0.0.1", port), 0.1).close(); break
            except OSError: time.sleep(0.01)
        out = subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/bench",
                              f"--rw={rw}", f"--bs={bs}", "--iodepth=16" if bs == "4k" else "--iodepth=4", "--runtime=4", "--time_based", "--size=1G",
                              "--output-format=json", "--randrepeat=0"], capture_output=True, text=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        side = "read" if "read" in rw else "write"
        res[b].append(job[side]["iops"] if bs == "4k" else job[side]["bw_bytes"] / 1e6)
        p.send_signal(signal.SIGTERM); p.wait()
        print(r, b, round(res[b][-1]), flush=True)
for b in bins:
    print(b, "median", round(statistics.median(res[b])))
