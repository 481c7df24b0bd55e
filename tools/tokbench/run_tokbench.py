#!/usr/bin/env python3
"""run_tokbench.py — tokenizer benchmark: duet's C tokenizer vs HF tokenizers, same documents.

Why: speed claims need a reproducible run on a known corpus with identical output. This script
(1) assembles >= 10 MB of mixed real text from files every Debian image here has (translated man
pages in 20+ languages, English changelogs and man pages, Python and C sources) plus seeded
random text from tests/tokenizer/tokref.py, split into documents of <= 64 KiB; (2) runs
tokbench (C, single thread); (3) runs HF tokenizers single-threaded (RAYON_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false), Tokenizer.encode per document; (4) checks the ids are identical;
(5) prints a table and appends rows to docs/benchmarks/tokenizer.csv with the exact command,
machine and git commit.

Never: run as a unit test; report a speed without also checking the ids match.

  python3 tools/tokbench/run_tokbench.py --tokbench build-T-rel/tools/tokbench/tokbench
"""
import argparse
import csv
import datetime
import glob
import gzip
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "tokenizer"))
import tokref  # noqa: E402

DOC_MAX = 64 * 1024
HF_RSS = float("nan")  # RSS delta of loading the HF tokenizer (MB), set by run_hf


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").replace("\0", "")


def take(paths, budget):
    """Texts of the sorted paths until budget bytes (UTF-8) are collected."""
    out, total = [], 0
    for p in sorted(set(paths)):
        if total >= budget:
            break
        t = read_text(p)
        if t:
            out.append(t)
            total += len(t.encode())
    return out, total


def split_docs(texts):
    docs = []
    for t in texts:
        while len(t.encode()) > DOC_MAX:
            cut = t.rfind("\n", 0, DOC_MAX // 2)
            cut = cut if cut > 0 else DOC_MAX // 2
            docs.append(t[:cut])
            t = t[cut:]
        if t:
            docs.append(t)
    return docs


def build_corpus():
    parts = {}
    langs = [d for d in glob.glob("/usr/share/man/*") if not os.path.basename(d).startswith("man")]
    parts["multilingual man pages"] = take(
        [p for d in langs for p in glob.glob(d + "/**/*.gz", recursive=True)], 4_000_000)
    parts["english docs"] = take(glob.glob("/usr/share/doc/*/changelog*.gz") +
                                 glob.glob("/usr/share/man/man1/*.gz"), 3_000_000)
    parts["code (python, c)"] = take(glob.glob("/usr/lib/python3*/*.py") +
                                     glob.glob("/usr/include/**/*.h", recursive=True), 3_000_000)
    rng = random.Random(7)
    specials = tokref.added_token_spellings()
    rnd = [tokref.random_doc(rng, specials, 200) for _ in range(1200)]
    parts["random unicode (seed 7)"] = (rnd, sum(len(r.encode()) for r in rnd))
    docs = []
    for name, (texts, total) in parts.items():
        docs += split_docs(texts)
    rng.shuffle(docs)
    return docs, {k: v[1] for k, v in parts.items()}


def rss_mb():
    try:
        for ln in open("/proc/self/status"):
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_hf(docs, passes):
    from tokenizers import Tokenizer
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tk = Tokenizer.from_file(tokref.tokenizer_json_path())
    load_s = time.perf_counter() - t0
    global HF_RSS
    HF_RSS = rss_mb() - rss0
    ids, times = None, []
    for p in range(passes):
        t0 = time.perf_counter()
        out = [tk.encode(d, add_special_tokens=False).ids for d in docs]
        times.append(time.perf_counter() - t0)
        ids = ids or out
    return ids, load_s, times


def read_ids(path, n):
    out = []
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    for _ in range(n):
        (k,) = struct.unpack_from("<I", data, off)
        off += 4
        out.append(list(struct.unpack_from("<%di" % k, data, off)))
        off += 4 * k
    return out


def machine():
    cpu = platform.processor() or "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d cpus, %s" % (cpu, os.cpu_count() or 0, platform.platform())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokbench", required=True)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--csv", default=os.path.join(ROOT, "docs", "benchmarks", "tokenizer.csv"))
    a = ap.parse_args()
    docs, sizes = build_corpus()
    nbytes = sum(len(d.encode()) for d in docs)
    nchars = sum(len(d) for d in docs)
    print("corpus: %d documents, %.2f MB, %d chars" % (len(docs), nbytes / 1e6, nchars))
    for k, v in sizes.items():
        print("  %-26s %.2f MB" % (k, v / 1e6))
    if nbytes < 10_000_000:
        tokref.fail("corpus is only %d bytes; the benchmark needs >= 10 MB" % nbytes)
    tmp = tempfile.mkdtemp(prefix="tokbench-")
    docs_path, ids_path = os.path.join(tmp, "docs.bin"), os.path.join(tmp, "ids.bin")
    with open(docs_path, "wb") as f:
        f.write(b"\0".join(d.encode() for d in docs))
    cmd = [a.tokbench, tokref.tokenizer_json_path(), docs_path, ids_path, str(a.passes)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tokref.fail("tokbench failed: " + r.stderr)
    ours = json.loads(r.stdout)
    our_ids = read_ids(ids_path, len(docs))
    hf_ids, hf_load, hf_times = run_hf(docs, a.passes)
    bad = sum(1 for x, y in zip(our_ids, hf_ids) if x != y)
    ntok = sum(len(x) for x in hf_ids)
    hf_best = min(hf_times)
    rows = [
        ("duet C (first pass, cold cache)", ours["first_pass_s"], ours["load_s"],
         ours["rss_after_encode_mb"]),
        ("duet C (best of %d)" % a.passes, ours["best_pass_s"], ours["load_s"],
         ours["rss_after_encode_mb"]),
        ("HF tokenizers (first pass)", hf_times[0], hf_load, HF_RSS),
        ("HF tokenizers (best of %d)" % a.passes, hf_best, hf_load, HF_RSS),
    ]
    print("\n%-34s %10s %10s %12s %9s %9s" % ("implementation", "seconds", "MB/s", "tokens/s",
                                              "load s", "RSS MB"))
    print("(RSS MB: duet = RSS delta after load and encoding; HF = RSS delta of loading)")
    for name, s, load, rss in rows:
        print("%-34s %10.3f %10.2f %12.0f %9.3f %9.1f" % (name, s, nbytes / 1e6 / s, ntok / s,
                                                          load, rss))
    ratio = hf_best / ours["best_pass_s"]
    print("\nspeed ratio (best vs best): %.2fx; ids identical: %s (%d of %d documents differ)" %
          (ratio, "yes" if bad == 0 else "NO", bad, len(docs)))
    print("duet RSS delta: %.1f MB after load, %.1f MB after encoding" %
          (ours["rss_load_mb"], ours["rss_after_encode_mb"]))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    import tokenizers
    command = "python3 tools/tokbench/run_tokbench.py --tokbench %s --passes %d" % (
        os.path.relpath(a.tokbench, ROOT) if os.path.isabs(a.tokbench) else a.tokbench, a.passes)
    new = not os.path.exists(a.csv)
    os.makedirs(os.path.dirname(a.csv), exist_ok=True)
    with open(a.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "git_commit", "machine", "command", "implementation", "docs",
                        "bytes", "chars", "tokens", "seconds", "mb_per_s", "tokens_per_s",
                        "load_s", "rss_mb", "ids_identical", "hf_tokenizers_version"])
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for name, s, load, rss in rows:
            w.writerow([stamp, commit, machine(), command, name, len(docs), nbytes, nchars, ntok,
                        "%.4f" % s, "%.3f" % (nbytes / 1e6 / s), "%.0f" % (ntok / s),
                        "%.4f" % load, "" if rss != rss else "%.1f" % rss,
                        "yes" if bad == 0 else "no", tokenizers.__version__])
    print("appended to %s" % a.csv)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
