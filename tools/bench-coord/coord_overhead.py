#!/usr/bin/env python3
"""coord_overhead.py — the coordinator's own time per engine step (a benchmark, not a test).

Why: the scheduler, KV manager and plan packing run on the coordinator's single event loop
between two worker steps; this measures that time so that a change to them can be judged. It
starts one CPU duet-worker on the tiny model and a duet-coordinator, runs decode-only batches
of 1 and 64 sequences through the admin socket (`generate` with "n"), and reads the engine's
`step_overhead` from `status`: per step, the coordinator's own time (plan building + packing
+ result handling, measured inside the engine around exactly that code) and, for comparison,
the step's wall time minus the worker's reported compute_us (which adds the network and the
worker's own RPC handling). Results are appended to docs/benchmarks/coordinator-overhead.csv.

  tools/bench-coord/coord_overhead.py [--build build-s] [--tokens 200] [--csv PATH]
"""
import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time


def admin(sock_path, req, timeout=600):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build-s")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--csv", default="docs/benchmarks/coordinator-overhead.csv")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    b = a.build
    tmp = tempfile.mkdtemp(prefix="duet-ovh-")
    tok = os.path.join(tmp, "token")
    with open(tok, "w") as f:
        f.write("bench-token-0123456789abcdef\n")
    os.chmod(tok, 0o600)
    sock = os.path.join(tmp, "admin", "admin.sock")
    procs = []
    try:
        w = subprocess.Popen([f"{b}/worker/duet-worker", "--listen", "127.0.0.1:0", "--rank", "0",
                              "--world-size", "1", "--model", f"{b}/tests/tiny-model",
                              "--backend", "cpu", "--auth-token-file", tok,
                              "--threads", str(a.threads)],
                             stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "w.log"), "w"),
                             text=True)
        procs.append(w)
        line = w.stdout.readline()
        addr = line.split("listening on ")[1].strip()
        c = subprocess.Popen([f"{b}/coordinator/duet-coordinator", "--workers", addr,
                              "--auth-token-file", tok, "--admin-socket", sock,
                              "--max-num-seqs", "64", "--max-seq-len", "1024"],
                             stderr=open(os.path.join(tmp, "c.log"), "w"))
        procs.append(c)
        end = time.time() + 60
        while True:  # a poll with a deadline: the coordinator is starting
            try:
                st = admin(sock, {"cmd": "status"})["result"]
                if st.get("warm"):
                    break
            except OSError:
                pass
            if time.time() > end:
                sys.exit("the coordinator did not become warm within 60 s; see " + tmp)
            time.sleep(0.1)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        machine = f"{cpu_model()} ({os.cpu_count()} cpus, {platform.machine()})"
        rows = []
        for n in (1, 64):
            r = admin(sock, {"cmd": "generate", "prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8],
                             "max_tokens": a.tokens, "n": n})
            if not r.get("ok"):
                sys.exit(f"generate n={n} failed: {r}")
            o = admin(sock, {"cmd": "status"})["result"]["step_overhead"]
            if o["seqs"] != n or not o["decode_only"] or o["steps"] < a.tokens // 2:
                sys.exit(f"unexpected last step: {o}")
            rows.append((n, o))
            print(f"{n:3d} sequences: coordinator {o['coord_us_p50']:.1f} us/step (p50), "
                  f"{o['coord_us_mean']:.1f} mean; step wall {o['wall_us_p50']:.0f} us, "
                  f"wall - worker compute {o['wall_minus_compute_us_p50']:.0f} us "
                  f"over {o['steps']} decode steps")
        new = not os.path.exists(a.csv)
        os.makedirs(os.path.dirname(a.csv), exist_ok=True)
        with open(a.csv, "a") as f:
            if new:
                f.write("date,commit,machine,worker_threads,sequences,steps,coord_us_p50,"
                        "coord_us_mean,step_wall_us_p50,wall_minus_compute_us_p50,command\n")
            for n, o in rows:
                f.write(f"{datetime.date.today()},{commit},\"{machine}\",{a.threads},{n},"
                        f"{o['steps']},{o['coord_us_p50']:.1f},{o['coord_us_mean']:.1f},"
                        f"{o['wall_us_p50']:.0f},{o['wall_minus_compute_us_p50']:.0f},"
                        f"\"tools/bench-coord/coord_overhead.py --build {b} --tokens {a.tokens}\"\n")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
