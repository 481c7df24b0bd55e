#!/usr/bin/env python3
"""make_reference.py — writes the committed reference ids of the fixed tokenizer corpus.

Why: the Check test (test_tokenizer.c) compares the C encoder with these ids without needing
Python at test time for this part. For every tests/tokenizer/corpus/NAME.txt (read as bytes,
decoded as UTF-8, no newline translation) it writes NAME.ids: the HF tokenizers ids, space
separated, on one line. It also (re)creates the seeded random file random_s20261122.txt.

Never: edit the .txt files by hand after generating ids; the two must come from one run.

  python3 tests/tokenizer/make_reference.py        (from the repository root)
"""
import glob
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tokref  # noqa: E402

RANDOM_SEED = 20261122


def main():
    tk = tokref.hf_tokenizer()
    corpus = os.path.join(HERE, "corpus")
    rng = random.Random(RANDOM_SEED)
    specials = tokref.added_token_spellings()
    text = "".join(tokref.random_doc(rng, specials, 200) for _ in range(150))
    with open(os.path.join(corpus, "random_s%d.txt" % RANDOM_SEED), "wb") as f:
        f.write(text.encode("utf-8"))
    total_chars = total_ids = 0
    for path in sorted(glob.glob(os.path.join(corpus, "*.txt"))):
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        ids = tk.encode(text, add_special_tokens=False).ids
        with open(path[:-4] + ".ids", "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        total_chars += len(text)
        total_ids += len(ids)
        print("%-28s %7d chars %7d ids" % (os.path.basename(path), len(text), len(ids)))
    print("total %d chars, %d ids" % (total_chars, total_ids))


if __name__ == "__main__":
    main()
