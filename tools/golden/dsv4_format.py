"""Shared helpers for the golden-reference tools: the DeepSeek-V4 checkpoint
format (spec §4) — dtype decoding, quantisation, a minimal safetensors writer,
and the runtime-name -> transformers-name mapping (spec §4.7).

Everything here is written from the spec; no code is taken from other projects.
"""

import json
import math
import os
import struct

import torch

# --------------------------------------------------------------------------
# Element decoders (spec §4.2)
# --------------------------------------------------------------------------


def _e4m3fn_table():
    """256-entry byte -> fp32 table for FP8 e4m3fn (bias 7, no inf, 0x7F/0xFF NaN)."""
    vals = []
    for b in range(256):
        sign = -1.0 if (b >> 7) & 1 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            vals.append(float("nan"))
        elif e == 0:
            vals.append(sign * (m / 8.0) * 2.0 ** -6)
        else:
            vals.append(sign * (1.0 + m / 8.0) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float32)


E4M3_TABLE = _e4m3fn_table()

# e2m1 nibble -> value; bit 3 is the sign.
FP4_TABLE = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)


def as_u8(t):
    """Reinterpret any 1-byte tensor as uint8 (no numeric conversion)."""
    assert t.element_size() == 1, t.dtype
    return t.contiguous().view(torch.uint8)


def decode_e4m3(t):
    return E4M3_TABLE[as_u8(t).long()]


def decode_e8m0(t):
    """value = 2^(b-127) built from the fp32 bit pattern; 0xFF -> NaN."""
    b = as_u8(t).to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)  # b=0 -> 2^-127 (subnormal)
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def decode_fp4_packed(t):
    """I8 [N, K/2] -> fp32 [N, K]; low nibble is the even K index."""
    u = as_u8(t)
    lo = FP4_TABLE[(u & 0xF).long()]
    hi = FP4_TABLE[(u >> 4).long()]
    return torch.stack([lo, hi], dim=-1).reshape(u.shape[0], u.shape[1] * 2)


def dequant_fp8(w, s, block=(128, 128)):
    """FP8 weight [N,K] with e8m0 block scales [ceil(N/bn), ceil(K/bk)]."""
    v = decode_e4m3(w)
    sc = decode_e8m0(s)
    n, k = v.shape
    bn, bk = block
    assert sc.shape == (math.ceil(n / bn), math.ceil(k / bk)), (v.shape, sc.shape)
    full = sc.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return v * full


def dequant_fp4(w, s, group=32):
    """Packed FP4 [N,K/2] with e8m0 scales [N, K/32]."""
    v = decode_fp4_packed(w)
    sc = decode_e8m0(s)
    n, k = v.shape
    assert sc.shape == (n, k // group), (v.shape, sc.shape)
    return v * sc.repeat_interleave(group, 1)


# --------------------------------------------------------------------------
# Quantisers (used only by fake_ckpt.py, the stand-in checkpoint writer)
# --------------------------------------------------------------------------


def _pow2_scale_exp(amax, qmax):
    """Exponent e with 2^e = 2^ceil(log2(amax/qmax)) (ue8m0 scale)."""
    return torch.ceil(torch.log2(amax / qmax))


def quant_fp8(w, block=128):
    """fp32 [N,K] -> (uint8 e4m3 bytes [N,K], uint8 e8m0 bytes [N/128, K/128])."""
    n, k = w.shape
    assert n % block == 0 and k % block == 0
    blk = w.reshape(n // block, block, k // block, block)
    amax = blk.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    e = _pow2_scale_exp(amax, 448.0)
    scale = torch.exp2(e)
    q = (blk / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.reshape(n, k).view(torch.uint8)
    sbytes = (e + 127).to(torch.uint8)
    return q, sbytes


def quant_fp4(w, group=32):
    """fp32 [N,K] -> (uint8 packed [N,K/2], uint8 e8m0 [N,K/32])."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    amax = g.abs().amax(dim=2).clamp_min(6 * 2.0 ** -126)
    e = _pow2_scale_exp(amax, 6.0)
    x = (g / torch.exp2(e)[..., None]).clamp(-6, 6).reshape(n, k)
    mags = FP4_TABLE[:8]
    idx = (x.abs()[..., None] - mags).abs().argmin(dim=-1)  # nearest magnitude
    nib = idx | ((x < 0).long() << 3)
    nib = torch.where(idx == 0, torch.zeros_like(nib), nib)
    nib = nib.to(torch.uint8).reshape(n, k // 2, 2)
    packed = nib[..., 0] | (nib[..., 1] << 4)
    return packed, (e + 127).to(torch.uint8)


# --------------------------------------------------------------------------
# Minimal safetensors writer (exact dtype strings, incl. F8_E4M3 / F8_E8M0)
# --------------------------------------------------------------------------

_DT = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16",
}


def write_safetensors(path, tensors, metadata=None, dtypes=None):
    """tensors: ordered dict name -> torch tensor; dtypes: optional name -> dtype string
    overriding the torch-derived one (used to label uint8 payloads F8_E4M3 / F8_E8M0 / I8)."""
    dtypes = dtypes or {}
    header = {}
    blobs = []
    off = 0
    for name, t in tensors.items():
        t = t.contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dt = dtypes.get(name, _DT[t.dtype])
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return off


def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def read_safetensors_raw(path):
    """Read every tensor as (dtype string, shape, uint8 tensor of its payload)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], buf[a:b])
    return out, header.get("__metadata__", {})


_TORCH_OF = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32}


def raw_to_tensor(dt, shape, u8):
    """Plain dtypes -> typed tensor; 1-byte dtypes stay uint8 (decode them explicitly)."""
    if dt in _TORCH_OF:
        return u8.clone().view(_TORCH_OF[dt]).reshape(shape)
    if dt in ("F8_E4M3", "F8_E8M0", "I8", "U8"):
        return u8.clone().reshape(shape)
    raise ValueError(f"unsupported dtype {dt}")


# --------------------------------------------------------------------------
# Name mapping, runtime names -> transformers DeepseekV4ForCausalLM (spec §4.7)
# --------------------------------------------------------------------------

_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}

# suffix after "layers.L." -> suffix after "model.layers.L."
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}


def map_name(name):
    """Runtime weight name (without '.scale') -> transformers name, or None if ignored
    (mtp.*) ; experts are handled separately ('EXPERT', L, E, w)."""
    if name.startswith("mtp."):
        return None
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if parts[0] != "layers":
        raise KeyError(f"unmapped tensor {name}")
    L = int(parts[1])
    rest = ".".join(parts[2:])
    if rest.startswith("ffn.experts."):
        e = int(parts[4])
        w = parts[5]
        assert parts[6] == "weight", name
        return ("EXPERT", L, e, w)
    if rest not in _LAYER:
        raise KeyError(f"unmapped tensor {name}")
    return f"model.layers.{L}.{_LAYER[rest]}"


def sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_files(model_dir):
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    with open(idx) as f:
        wm = json.load(f)["weight_map"]
    return wm, sorted(set(wm.values()))
