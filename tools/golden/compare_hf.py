#!/usr/bin/env python3
"""Cross-check of the checkpoint loader: the state dict make_golden.py builds from an
official-format checkpoint (Python dequantization + §4.7 name mapping) must equal, bit for
bit, what `mkmodel --names hf` writes for the same config and seed (mkmodel's own C
dequantization and mapping).

  build-A/tools/mkmodel/mkmodel --config tools/mkmodel/tiny.json --out /tmp/tiny_hf --seed 1 --names hf
  python3 tools/golden/compare_hf.py --model models/tiny --hf /tmp/tiny_hf
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import load_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="official-format checkpoint")
    ap.add_argument("--hf", required=True, help="same model written with transformers names")
    a = ap.parse_args()
    from safetensors import safe_open

    _, sd, _ = load_checkpoint(a.model)
    with open(os.path.join(a.hf, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    hf = {}
    for sh in sorted(set(wm.values())):
        with safe_open(os.path.join(a.hf, sh), framework="pt") as f:
            for k in f.keys():
                hf[k] = f.get_tensor(k)
    bad = 0
    for k in sorted(set(hf) - set(sd)):
        print("only in --hf:", k)
        bad += 1
    for k in sorted(set(sd) - set(hf)):
        print("only in --model:", k)
        bad += 1
    for k in sorted(set(sd) & set(hf)):
        x, y = sd[k], hf[k]
        if x.shape != y.shape:
            print(f"shape {k}: {tuple(x.shape)} vs {tuple(y.shape)}")
            bad += 1
        elif not x.is_floating_point() or not y.is_floating_point():
            if not torch.equal(x.long(), y.long()):
                print(f"values differ: {k}")
                bad += 1
        elif not torch.equal(x.float(), y.float()):
            print(f"values differ: {k} (max |d| {(x.float() - y.float()).abs().max().item():.3g})")
            bad += 1
    print(f"{len(sd)} tensors compared, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
