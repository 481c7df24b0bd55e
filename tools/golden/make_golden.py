#!/usr/bin/env python3
"""Golden-reference generator: runs transformers' DeepseekV4ForCausalLM (eager, fp32,
DynamicCache) on a tiny checkpoint in the official DeepSeek-V4 format and writes
logit fixtures for duet's CPU forward pass.

  python3 tools/golden/make_golden.py --model models/tiny --out tests/golden/fixtures \
      [--device cpu|cuda] [--mkmodel-seed 1]

See tools/golden/README.md for what the fixtures contain.
"""

import argparse
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsv4_format import (  # noqa: E402
    decode_e4m3, dequant_fp4, dequant_fp8, map_name, sha256_file, shard_files)

TOKEN_SEED = 20261122       # prefill600 / decode300 / chunk37 sequence
BATCH_SEEDS = (101, 202)    # batch2 sequences
HASH_SEED = 303             # hash case permutation
T_MAIN = 600
DECODE_PREFIX = 300
CHUNK = 37
BATCH_LENS = (257, 411)
HASH_LEN = 600


# --------------------------------------------------------------------------
# checkpoint -> transformers state dict
# --------------------------------------------------------------------------

def load_checkpoint(model_dir):
    from safetensors import safe_open

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    weight_map, shards = shard_files(model_dir)

    raw = {}
    for sh in shards:
        with safe_open(os.path.join(model_dir, sh), framework="pt") as f:
            for name in f.keys():
                if weight_map.get(name) != sh:
                    raise SystemExit(f"{name} found in {sh} but the index says {weight_map.get(name)}")
                raw[name] = f.get_tensor(name)
    missing_from_shards = set(weight_map) - set(raw)
    if missing_from_shards:
        raise SystemExit(f"index lists tensors absent from shards: {sorted(missing_from_shards)[:5]}")

    sd = {}
    experts = {}  # (L, w) -> {e: tensor}
    ignored = []
    counts = {"fp8": 0, "fp4": 0, "plain": 0}
    for name, t in raw.items():
        if name.endswith(".scale"):
            if name[:-len(".scale")] + ".weight" not in raw:
                raise SystemExit(f"scale without weight: {name}")
            continue
        tgt = map_name(name)
        if tgt is None:
            ignored.append(name)
            continue
        sname = name[:-len(".weight")] + ".scale" if name.endswith(".weight") else None
        if t.dtype == torch.float8_e4m3fn:
            if sname not in raw:
                raise SystemExit(f"FP8 weight without scale: {name}")
            s = raw[sname]
            assert s.dtype == torch.float8_e8m0fnu, (sname, s.dtype)
            val = dequant_fp8(t, s, block)
            counts["fp8"] += 1
        elif t.dtype == torch.int8:
            if sname not in raw:
                raise SystemExit(f"FP4 weight without scale: {name}")
            s = raw[sname]
            assert s.dtype == torch.float8_e8m0fnu, (sname, s.dtype)
            val = dequant_fp4(t, s)
            counts["fp4"] += 1
        elif t.dtype in (torch.bfloat16, torch.float16, torch.float32):
            if sname in raw:
                raise SystemExit(f"unexpected scale for non-quantized {name}")
            val = t.float()
            counts["plain"] += 1
        elif t.dtype == torch.int64:
            val = t.clone()
            counts["plain"] += 1
        else:
            raise SystemExit(f"unsupported dtype {t.dtype} for {name}")
        if isinstance(tgt, tuple):
            _, L, e, w = tgt
            experts.setdefault((L, w), {})[e] = val
        else:
            if tgt in sd:
                raise SystemExit(f"duplicate target {tgt}")
            sd[tgt] = val

    n_exp = cfg["n_routed_experts"]
    layers = sorted({L for (L, _) in experts})
    for L in layers:
        for w in ("w1", "w2", "w3"):
            got = experts.get((L, w), {})
            if sorted(got) != list(range(n_exp)):
                raise SystemExit(f"layer {L} {w}: experts {sorted(got)} (want 0..{n_exp - 1})")
        w1 = experts[(L, "w1")]
        w3 = experts[(L, "w3")]
        w2 = experts[(L, "w2")]
        sd[f"model.layers.{L}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w1[e], w3[e]], dim=0) for e in range(n_exp)])
        sd[f"model.layers.{L}.mlp.experts.down_proj"] = torch.stack([w2[e] for e in range(n_exp)])
    info = {"ignored": ignored, "counts": counts, "shards": shards, "n_tensors": len(raw)}
    return cfg, sd, info


def build_model(cfg, sd, device):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    tcfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
    config = DeepseekV4Config(**tcfg)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config).to(torch.float32)
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        print("STATE DICT MISMATCH", file=sys.stderr)
        for k in res.missing_keys:
            print("  missing:", k, file=sys.stderr)
        for k in res.unexpected_keys:
            print("  unexpected:", k, file=sys.stderr)
        raise SystemExit(1)
    # every buffer / parameter of the module that is in the state dict came from the checkpoint
    msd = model.state_dict()
    assert set(msd) == set(sd), "state dict key sets differ"
    for k, v in sd.items():
        if msd[k].dtype != v.dtype and not (msd[k].is_floating_point() and v.is_floating_point()):
            raise SystemExit(f"dtype mismatch for {k}: {msd[k].dtype} vs {v.dtype}")
    model = model.to(device).eval()
    return config, model


def check_tid2eid(cfg, sd):
    notes = []
    for k, v in sd.items():
        if k.endswith("tid2eid"):
            if v.min() < 0 or v.max() >= cfg["n_routed_experts"]:
                raise SystemExit(f"{k}: ids out of range")
            srt = v.sort(dim=1).values
            dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1).sum().item()
            notes.append(f"{k}: rows with repeated expert ids: {dup}")
            if dup:
                print(f"WARNING {k} has {dup} rows with repeated ids (transformers sums them twice, "
                      f"the official reference once)", file=sys.stderr)
    return notes


# --------------------------------------------------------------------------
# near-tie monitors (router top-k, indexer top-k)
# --------------------------------------------------------------------------

class TieMonitor:
    """Records how close the discrete decisions of the reference are to a tie:
    router top-k (score + bias, k-th vs (k+1)-th) and indexer top-k (k-th vs (k+1)-th
    visible entry). A C engine whose fp32 rounding differs may legitimately pick
    differently where the gap is tiny; those (layer, position) pairs are listed."""

    REL_RISK = 1e-5   # relative gap below which a decision is listed as risky

    def __init__(self, model):
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M
        self.reset()
        self.hooks = []
        self._pos = {}
        for name, mod in model.named_modules():
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
            if isinstance(mod, (M.DeepseekV4TopKRouter,)):
                self.hooks.append(mod.register_forward_hook(self._router_hook(layer)))
            elif isinstance(mod, M.DeepseekV4Indexer):
                self.hooks.append(mod.register_forward_pre_hook(self._indexer_pre(layer)))
                self.hooks.append(mod.scorer.register_forward_hook(self._scorer_hook(layer)))

    def reset(self):
        self.router_min_gap = float("inf")
        self.indexer_min_rel_gap = float("inf")
        self.indexer_min_gap = float("inf")
        self.indexer_zero_ties = 0
        self.risky = []       # [kind, layer, position, gap]
        self.closest = []     # every decision: (rel gap, kind, layer, position, gap)
        self._rpos = None

    def set_positions(self, pos):
        self._rpos = pos      # absolute positions of the rows of the current forward

    def _router_hook(self, layer):
        def hook(mod, inp, out):
            logits = out[0]
            scores = mod.score_fn(logits) + mod.e_score_correction_bias
            if scores.shape[-1] > mod.top_k:
                s = scores.sort(dim=-1, descending=True).values
                gap = s[:, mod.top_k - 1] - s[:, mod.top_k]
                self.router_min_gap = min(self.router_min_gap, gap.min().item())
                rel = gap / s[:, mod.top_k - 1].abs().clamp_min(1e-30)
                for i in rel.argsort()[:8].tolist():
                    self.closest.append((rel[i].item(), "router", layer, int(self._rpos[i]), gap[i].item()))
                for i in (rel < self.REL_RISK).nonzero().flatten().tolist():
                    self.risky.append(["router", layer, int(self._rpos[i]), gap[i].item()])
        return hook

    def _indexer_pre(self, layer):
        def hook(mod, args):
            self._pos[layer] = (args[2], mod.compress_rate, mod.index_topk)
        return hook

    def _scorer_hook(self, layer):
        def hook(mod, inp, out):
            pos, ratio, topk = self._pos[layer]
            scores = out[0]           # [S, T]
            p = pos[0]
            for i in range(scores.shape[0]):
                n = int((p[i].item() + 1) // ratio)
                if n <= topk:
                    continue
                s = scores[i, :n].sort(descending=True).values
                gap = (s[topk - 1] - s[topk]).item()
                rel = gap / max(abs(s[topk - 1].item()), 1e-30)
                if gap == 0.0 and s[topk].item() == 0.0:
                    self.indexer_zero_ties += 1
                self.indexer_min_gap = min(self.indexer_min_gap, gap)
                self.indexer_min_rel_gap = min(self.indexer_min_rel_gap, rel)
                self.closest.append((rel, "indexer", layer, int(p[i].item()), gap))
                if rel < self.REL_RISK:
                    self.risky.append(["indexer", layer, int(p[i].item()), gap])
        return hook


# --------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------

@torch.no_grad()
def run_schedule(model, config, ids, sizes, device, monitor=None):
    """Feed `ids` through one DynamicCache in consecutive pieces of `sizes`;
    return fp32 logits [T, V] (on CPU)."""
    from transformers import DynamicCache

    assert sum(sizes) == ids.numel()
    cache = DynamicCache(config=config)
    out = []
    s = 0
    for n in sizes:
        piece = ids[s:s + n].to(device)[None]
        pos = torch.arange(s, s + n, device=device)[None]
        if monitor is not None:
            monitor.set_positions(list(range(s, s + n)))
        r = model(input_ids=piece, position_ids=pos, past_key_values=cache, use_cache=True)
        out.append(r.logits[0].float().cpu())
        s += n
    return torch.cat(out, 0)


@torch.no_grad()
def run_nocache(model, ids, device, monitor=None):
    if monitor is not None:
        monitor.set_positions(list(range(ids.numel())))
    r = model(input_ids=ids.to(device)[None], use_cache=False)
    return r.logits[0].float().cpu()


def sel_positions(T, extra=()):
    s = set(range(0, T, 8))
    s.update(range(max(0, T - 4), T))
    # raw window (8), CSA (4) and HCA (128) boundaries
    for b in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17,
              126, 127, 128, 129, 254, 255, 256, 257, 382, 383, 384, 385, 510, 511, 512, 513):
        s.add(b)
    s.update(extra)
    return torch.tensor(sorted(p for p in s if 0 <= p < T), dtype=torch.int64)


def diag(logits):
    top2 = logits.topk(2, dim=-1)
    return top2.indices[:, 0].to(torch.int64), (top2.values[:, 0] - top2.values[:, 1]).float()


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def pack(tokens, logits, extra_pos=(), suffix=""):
    sp = sel_positions(tokens.numel(), extra_pos)
    am, mg = diag(logits)
    return {
        f"tokens{suffix}": tokens.to(torch.int64).contiguous(),
        f"sel_pos{suffix}": sp,
        f"sel_logits{suffix}": logits[sp].contiguous().float(),
        f"argmax{suffix}": am.contiguous(),
        f"margin{suffix}": mg.contiguous(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mkmodel-seed", default="1",
                    help="seed mkmodel was run with (recorded in the metadata)")
    ap.add_argument("--cases", default="prefill600,decode300,chunk37,batch2,hash")
    a = ap.parse_args()

    import transformers
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device(a.device)

    cfg, sd, info = load_checkpoint(a.model)
    print(f"checkpoint: {info['n_tensors']} tensors in {len(info['shards'])} shards; "
          f"dequantized fp8={info['counts']['fp8']} fp4={info['counts']['fp4']} "
          f"plain={info['counts']['plain']}; ignored {len(info['ignored'])} mtp.* tensors")
    notes = check_tid2eid(cfg, sd)
    for n in notes:
        print(n)
    config, model = build_model(cfg, sd, device)
    print("layer_types:", config.layer_types)
    print("mlp_layer_types:", config.mlp_layer_types)
    print("rope_parameters:", json.dumps(config.rope_parameters))
    print("state dict: strict load OK,", len(sd), "keys (incl. tid2eid / e_score_correction_bias buffers)")
    V = cfg["vocab_size"]
    mon = TieMonitor(model)

    shas = {"config.json": sha256_file(os.path.join(a.model, "config.json"))}
    for sh in info["shards"]:
        shas[sh] = sha256_file(os.path.join(a.model, sh))
    base_meta = {
        "generator": "tools/golden/make_golden.py",
        "mkmodel_seed": str(a.mkmodel_seed),
        "config_sha256": shas["config.json"],
        "shard_sha256": json.dumps({k: v for k, v in shas.items() if k != "config.json"}, sort_keys=True),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "command": " ".join(shlex.quote(x) for x in ["python3"] + sys.argv),
        "reference": "transformers DeepseekV4ForCausalLM, eager attention, fp32, DynamicCache, "
                     "dequantized weights, no FP8/FP4/Hadamard simulation",
    }

    gen = torch.Generator().manual_seed(TOKEN_SEED)
    main_ids = torch.randint(0, V, (T_MAIN,), generator=gen)
    cases = a.cases.split(",")
    os.makedirs(a.out, exist_ok=True)
    summary = {}
    ref = None

    def ties():
        d = {"router_min_gap": mon.router_min_gap, "indexer_min_gap": mon.indexer_min_gap,
             "indexer_min_rel_gap": mon.indexer_min_rel_gap,
             "indexer_exact_zero_ties": mon.indexer_zero_ties,
             "risky_decisions(kind,layer,pos,gap)": mon.risky[:50], "n_risky": len(mon.risky),
             "closest_decisions(kind,layer,pos,gap,rel_gap)": [
                 [k, l, q, g, r] for (r, k, l, q, g) in sorted(mon.closest)[:8]]}
        mon.reset()
        return d

    def save(case, tensors, meta):
        path = os.path.join(a.out, f"{case}.safetensors")
        m = dict(base_meta)
        m.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()})
        m["case"] = case
        save_file(tensors, path, metadata=m)
        sz = os.path.getsize(path)
        summary.setdefault(case, {})["bytes"] = sz
        print(f"  wrote {path} ({sz} bytes)")

    mon.reset()
    ref = run_schedule(model, config, main_ids, [T_MAIN], device, mon)
    t_ref = ties()
    nc = run_nocache(model, main_ids, device, mon)
    ties()
    print(f"[prefill600] no-cache vs cache prefill rel L2 = {rel_l2(nc, ref):.3e}")
    print(f"[prefill600] near-ties: {t_ref}")
    summary["prefill600"] = {"nocache_rel_l2": rel_l2(nc, ref), **t_ref}
    if "prefill600" in cases:
        save("prefill600", pack(main_ids, ref),
             {"schedule": [T_MAIN], "token_seed": TOKEN_SEED, **summary["prefill600"]})

    def compare(case, logits):
        am_r, mg_r = diag(ref)
        am, _ = diag(logits)
        d = {
            "rel_l2_vs_prefill600": rel_l2(logits, ref),
            "max_abs_vs_prefill600": (logits - ref).abs().max().item(),
            "max_abs_logit": ref.abs().max().item(),
            "argmax_mismatch": int((am != am_r).sum().item()),
            "argmax_mismatch_margin_gt_1e-3": int(((am != am_r) & (mg_r > 1e-3)).sum().item()),
        }
        sp = sel_positions(T_MAIN)
        d["rel_l2_sel_vs_prefill600"] = rel_l2(logits[sp], ref[sp])
        # worst positions
        per = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)
        d["worst_pos_rel_l2"] = [int(per.argmax().item()), per.max().item()]
        print(f"[{case}] vs prefill600: " + ", ".join(f"{k}={v}" for k, v in d.items()))
        return d

    if "decode300" in cases:
        lg = run_schedule(model, config, main_ids, [DECODE_PREFIX] + [1] * (T_MAIN - DECODE_PREFIX), device, mon)
        t = ties()
        d = compare("decode300", lg)
        print(f"[decode300] near-ties: {t}")
        summary["decode300"] = {**d, **t}
        save("decode300", pack(main_ids, lg, extra_pos=range(DECODE_PREFIX - 3, DECODE_PREFIX + 4)),
             {"schedule": f"prefill {DECODE_PREFIX} then {T_MAIN - DECODE_PREFIX} x 1",
              "token_seed": TOKEN_SEED, **summary["decode300"]})

    if "chunk37" in cases:
        sizes = [CHUNK] * (T_MAIN // CHUNK) + ([T_MAIN % CHUNK] if T_MAIN % CHUNK else [])
        lg = run_schedule(model, config, main_ids, sizes, device, mon)
        t = ties()
        d = compare("chunk37", lg)
        print(f"[chunk37] near-ties: {t}")
        summary["chunk37"] = {**d, **t}
        bounds = [CHUNK * i + o for i in range(1, len(sizes)) for o in (-1, 0)]
        save("chunk37", pack(main_ids, lg, extra_pos=bounds),
             {"schedule": sizes, "token_seed": TOKEN_SEED, **summary["chunk37"]})

    if "batch2" in cases:
        tensors, meta = {}, {"token_seeds": list(BATCH_SEEDS), "lengths": list(BATCH_LENS),
                             "schedule": "each sequence prefilled alone (unpadded), one DynamicCache each"}
        for i, (seed, n) in enumerate(zip(BATCH_SEEDS, BATCH_LENS)):
            ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
            lg = run_schedule(model, config, ids, [n], device, mon)
            meta[f"near_ties{i}"] = ties()
            tensors.update(pack(ids, lg, suffix=str(i)))
        print(f"[batch2] near-ties: {meta['near_ties0']} / {meta['near_ties1']}")
        summary["batch2"] = meta
        save("batch2", tensors, meta)

    if "hash" in cases:
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(HASH_SEED))[:HASH_LEN]
        lg = run_schedule(model, config, ids, [HASH_LEN], device, mon)
        t = ties()
        print(f"[hash] near-ties: {t}")
        summary["hash"] = {"token_seed": HASH_SEED, "distinct_ids": True, **t}
        save("hash", pack(ids, lg), summary["hash"])

    print("SUMMARY " + json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
