#!/usr/bin/env python3
"""Stand-in writer of a tiny DeepSeek-V4 checkpoint in the official on-disk format
(spec §4 and §6), used only to develop make_golden.py before tools/mkmodel exists.
The real fixtures are generated from mkmodel's output (see README.md).

  python3 tools/golden/fake_ckpt.py --out /tmp/fake_tiny --seed 1 [--shards 3]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsv4_format import quant_fp4, quant_fp8, write_safetensors  # noqa: E402

TINY = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64,
    "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 64,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 128,
    "num_hash_layers": 2, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu",
    "sliding_window": 8,
    "compress_ratios": [0, 4, 128, 4, 128, 0, 0],
    "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 256,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 16, "index_head_dim": 128, "index_topk": 16,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 4096,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shards", type=int, default=3)
    a = ap.parse_args()
    c = TINY
    g = torch.Generator().manual_seed(a.seed)

    def rn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    tensors, dtypes = {}, {}

    def put_plain(name, t):
        tensors[name] = t

    def put_bf16(name, t):
        tensors[name] = t.to(torch.bfloat16)

    def put_fp8(name, t):
        q, s = quant_fp8(t)
        tensors[name + ".weight"] = q
        dtypes[name + ".weight"] = "F8_E4M3"
        tensors[name + ".scale"] = s
        dtypes[name + ".scale"] = "F8_E8M0"

    def put_fp4(name, t):
        q, s = quant_fp4(t)
        tensors[name + ".weight"] = q
        dtypes[name + ".weight"] = "I8"
        tensors[name + ".scale"] = s
        dtypes[name + ".scale"] = "F8_E8M0"

    D, H, hd = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    V, ql, og, olr = c["vocab_size"], c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    E, k, I = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    nhc = c["hc_mult"]
    mix = (2 + nhc) * nhc
    ih, ihd = c["index_n_heads"], c["index_head_dim"]

    def lin_std(K):
        return K ** -0.5

    put_bf16("embed.weight", rn(V, D))
    put_bf16("head.weight", rn(V, D, std=lin_std(D)))
    put_bf16("norm.weight", rn(D, std=0.1, mean=1.0))
    put_plain("hc_head_fn", rn(nhc, nhc * D, std=0.02))
    put_plain("hc_head_base", rn(nhc, std=0.5))
    put_plain("hc_head_scale", rn(1, std=0.3, mean=1.0))

    def block(p, ratio, hash_layer):
        for s in ("attn", "ffn"):
            put_plain(f"{p}hc_{s}_fn", rn(mix, nhc * D, std=0.02))
            put_plain(f"{p}hc_{s}_base", rn(mix, std=0.5))
            put_plain(f"{p}hc_{s}_scale", rn(3, std=0.3, mean=1.0))
        put_bf16(f"{p}attn_norm.weight", rn(D, std=0.1, mean=1.0))
        put_bf16(f"{p}ffn_norm.weight", rn(D, std=0.1, mean=1.0))
        put_fp8(f"{p}attn.wq_a", rn(ql, D, std=lin_std(D)))
        put_bf16(f"{p}attn.q_norm.weight", rn(ql, std=0.1, mean=1.0))
        put_fp8(f"{p}attn.wq_b", rn(H * hd, ql, std=lin_std(ql)))
        put_fp8(f"{p}attn.wkv", rn(hd, D, std=lin_std(D)))
        put_bf16(f"{p}attn.kv_norm.weight", rn(hd, std=0.1, mean=1.0))
        put_fp8(f"{p}attn.wo_a", rn(og * olr, H * hd // og, std=lin_std(H * hd // og)))
        put_fp8(f"{p}attn.wo_b", rn(D, og * olr, std=lin_std(og * olr)))
        put_plain(f"{p}attn.attn_sink", rn(H))
        if ratio:
            cc = 2 if ratio == 4 else 1
            put_bf16(f"{p}attn.compressor.wkv.weight", rn(cc * hd, D, std=lin_std(D)))
            put_bf16(f"{p}attn.compressor.wgate.weight", rn(cc * hd, D, std=lin_std(D)))
            put_plain(f"{p}attn.compressor.ape", rn(ratio, cc * hd, std=0.5))
            put_bf16(f"{p}attn.compressor.norm.weight", rn(hd, std=0.1, mean=1.0))
        if ratio == 4:
            put_fp8(f"{p}attn.indexer.wq_b", rn(ih * ihd, ql, std=lin_std(ql)))
            put_bf16(f"{p}attn.indexer.weights_proj.weight", rn(ih, D, std=lin_std(D)))
            put_bf16(f"{p}attn.indexer.compressor.wkv.weight", rn(2 * ihd, D, std=lin_std(D)))
            put_bf16(f"{p}attn.indexer.compressor.wgate.weight", rn(2 * ihd, D, std=lin_std(D)))
            put_plain(f"{p}attn.indexer.compressor.ape", rn(4, 2 * ihd, std=0.5))
            put_bf16(f"{p}attn.indexer.compressor.norm.weight", rn(ihd, std=0.1, mean=1.0))
        put_bf16(f"{p}ffn.gate.weight", rn(E, D, std=lin_std(D)))
        if hash_layer:
            t = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(V)])
            put_plain(f"{p}ffn.gate.tid2eid", t.to(torch.int64))
        else:
            put_plain(f"{p}ffn.gate.bias", rn(E, std=0.1))
        put_fp8(f"{p}ffn.shared_experts.w1", rn(I, D, std=0.3))
        put_fp8(f"{p}ffn.shared_experts.w2", rn(D, I, std=lin_std(I)))
        put_fp8(f"{p}ffn.shared_experts.w3", rn(I, D, std=0.3))
        for e in range(E):
            put_fp4(f"{p}ffn.experts.{e}.w1", rn(I, D, std=0.3))
            put_fp4(f"{p}ffn.experts.{e}.w2", rn(D, I, std=lin_std(I)))
            put_fp4(f"{p}ffn.experts.{e}.w3", rn(I, D, std=0.3))

    L = c["num_hidden_layers"]
    for l in range(L):
        block(f"layers.{l}.", c["compress_ratios"][l], l < c["num_hash_layers"])
    # legacy MTP module (ignored by transformers; present to test that the loader skips it)
    block("mtp.0.", 0, False)
    put_fp8("mtp.0.e_proj", rn(D, D, std=lin_std(D)))
    put_fp8("mtp.0.h_proj", rn(D, D, std=lin_std(D)))
    for n in ("enorm", "hnorm", "norm"):
        put_bf16(f"mtp.0.{n}.weight", rn(D, std=0.1, mean=1.0))
    put_plain("mtp.0.hc_head_fn", rn(nhc, nhc * D, std=0.02))
    put_plain("mtp.0.hc_head_base", rn(nhc, std=0.5))
    put_plain("mtp.0.hc_head_scale", rn(1, std=0.3, mean=1.0))

    os.makedirs(a.out, exist_ok=True)
    names = list(tensors)
    K = a.shards
    per = (len(names) + K - 1) // K
    weight_map, total = {}, 0
    for i in range(K):
        fn = f"model-{i + 1:05d}-of-{K:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        total += write_safetensors(os.path.join(a.out, fn), part, {"format": "pt"}, dtypes)
        for n in part:
            weight_map[n] = fn
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    print(f"wrote {len(names)} tensors, {total} bytes, {K} shards to {a.out}")


if __name__ == "__main__":
    main()
