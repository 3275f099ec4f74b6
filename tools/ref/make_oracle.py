#!/usr/bin/env python3
"""Independent oracle for ds4: a tiny DeepSeek V4 checkpoint and golden logits.

What it does (CPU, float32, deterministic for a given seed and torch build):
  1. Builds a tiny DeepSeek V4 config that has every layer kind the real model
     has (spec model.md §1.2): window-only layers, ratio-4 layers with
     compressor + lightning indexer whose top-k (16) is smaller than the
     number of compressed rows, a ratio-128 layer, hash-routed layers (one of
     them ratio 4, as layer 2 of the real model) and biased top-k layers.
  2. Draws random weights from the seed and rounds each tensor to the dtype
     DeepSeek ships it in (FP8 E4M3 with UE8M0 128x128 block scales, packed
     FP4 E2M1 with UE8M0 per-32 scales, BF16, F32, I64 hash table), so the
     float weights the model computes with are *exactly* what the checkpoint
     stores. The checkpoint is written in DeepSeek's own tensor naming (the
     layout `ds4-convert` reads), in two safetensors shards plus an index,
     with config.json and a small byte-level BPE tokenizer.json.
  3. Loads the same weights into Hugging Face transformers'
     DeepseekV4ForCausalLM and computes the logits of every position of one
     token sequence twice:
       - "unpatched": HF as shipped;
       - "patched":   HF plus the two quantisation-aware simulations DeepSeek's
         reference applies and HF omits (spec §10 rows 1-2): the FP8 round
         trip of KV rows (dims 0..head_dim-rope_dim-1, blocks of 64) and the
         Hadamard rotation + FP4 round trip of indexer queries and rows.
     The patched run is the golden: it computes the model as DeepSeek
     defines it (spec §3.3-3.4).
  4. Writes goldens (float32 little-endian, [n_pos][n_vocab]) and oracle.json
     (tokens, shapes, versions, comparison statistics).

Usage: make_oracle.py OUTDIR [--seed N] [--n-tokens N]
"""
import argparse
import json
import math
import os
import struct

import torch

# ---------------------------------------------------------------------------
# Configuration. Dims chosen so the converted GGUF is self-consistent for ds4
# (src/model/model.h): head_dim - rope_dim = 64 (one FP8 block), indexer head
# dim a power of two, every expert row length (hidden 256, ff 256) a multiple
# of the 256-element K-quant block, every FP8 matrix a whole number of 128x128
# blocks, and 256-element rows for the FP4 per-32 scales.
# ---------------------------------------------------------------------------
N_LAYER = 5
RATIOS = [0, 0, 4, 128, 4]          # + one trailing 0 for the (absent) MTP slot
NATIVE_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 512,
    "hidden_size": 256,
    "moe_intermediate_size": 256,
    "num_hidden_layers": N_LAYER,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "sliding_window": 128,
    "compress_ratios": RATIOS + [0],
    "compress_rope_theta": 160000.0,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 4,
    "index_head_dim": 128,
    "index_topk": 16,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}
# Keys HF's DeepseekV4Config understands; the rest (quantization_config would
# make HF quantise the model) stay out of the HF config.
HF_KEYS = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "qk_rope_head_dim",
           "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "n_shared_experts",
           "num_experts_per_tok", "num_hash_layers", "scoring_func", "norm_topk_prob",
           "routed_scaling_factor", "swiglu_limit", "sliding_window", "compress_ratios",
           "compress_rope_theta", "rope_theta", "index_n_heads", "index_head_dim", "index_topk",
           "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "max_position_embeddings",
           "num_nextn_predict_layers", "bos_token_id", "eos_token_id", "hidden_act",
           "tie_word_embeddings"]

C = NATIVE_CONFIG
D, V, H, HD, RD = C["hidden_size"], C["vocab_size"], C["num_attention_heads"], C["head_dim"], C["qk_rope_head_dim"]
QL, G, OL, E, K, FF = C["q_lora_rank"], C["o_groups"], C["o_lora_rank"], C["n_routed_experts"], C["num_experts_per_tok"], C["moe_intermediate_size"]
IH, IHD, HC = C["index_n_heads"], C["index_head_dim"], C["hc_mult"]
NHASH = C["num_hash_layers"]

# ---------------------------------------------------------------------------
# Number formats (spec §2.6, §3.3, §3.4).
# ---------------------------------------------------------------------------
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def pow2_scale(amax, qmax, floor):
    """UE8M0-style power-of-two scale: 2^ceil(log2(max(amax, floor)/qmax))."""
    return torch.exp2(torch.ceil(torch.log2(torch.clamp(amax, min=floor) / qmax)))


def e2m1_code(a):
    """|x| (already divided by its scale, <= 6) -> E2M1 magnitude code 0..7,
    round to nearest, ties to the even code. Midpoints between codes c and c+1
    round down when c is even, up when c is odd."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    code = torch.zeros_like(a, dtype=torch.int64)
    for c, m in enumerate(mids):
        code += (a > m) if c % 2 == 0 else (a >= m)
    return code


def fp8_sim(x, block=64):
    """FP8 E4M3 round trip of the last dim in blocks (spec §3.3)."""
    shp = x.shape
    xb = x.float().reshape(*shp[:-1], shp[-1] // block, block)
    s = pow2_scale(xb.abs().amax(-1, keepdim=True), 448.0, 1e-4)
    q = torch.clamp(xb / s, -448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(shp).to(x.dtype)


def hadamard(x):
    """Walsh-Hadamard transform of the last dim (Sylvester order), / sqrt(n)."""
    n = x.shape[-1]
    y = x.float().clone()
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


def fp4_sim(x, block=32):
    """FP4 E2M1 round trip of the last dim in blocks (spec §3.4)."""
    shp = x.shape
    xb = x.float().reshape(*shp[:-1], shp[-1] // block, block)
    s = pow2_scale(xb.abs().amax(-1, keepdim=True), 6.0, 6.0 * 2.0 ** -126)
    a = torch.clamp(xb.abs() / s, max=6.0)
    q = E2M1[e2m1_code(a)] * torch.sign(xb)
    return (q * s).reshape(shp).to(x.dtype)


def quant_fp8_blocks(w):
    """[out, in] float -> (E4M3 bytes [out, in] u8, UE8M0 exponents
    [ceil(out/128), ceil(in/128)] u8, dequantised float)."""
    o, i = w.shape
    assert o % 128 == 0 and i % 128 == 0, "oracle dims keep FP8 blocks whole"
    wb = w.reshape(o // 128, 128, i // 128, 128).permute(0, 2, 1, 3)
    s = pow2_scale(wb.abs().amax((-1, -2), keepdim=True), 448.0, 2.0 ** -120)
    q = torch.clamp(wb / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    deq = (q.float() * s).permute(0, 2, 1, 3).reshape(o, i)
    qbytes = q.permute(0, 2, 1, 3).reshape(o, i).view(torch.uint8)
    exps = (torch.log2(s).reshape(o // 128, i // 128) + 127).to(torch.uint8)
    return qbytes, exps, deq


def quant_fp4_rows(w):
    """[out, in] float -> (packed I8 [out, in/2], UE8M0 [out, in/32] u8,
    dequantised float). Low nibble = even element; bit 3 = sign."""
    o, i = w.shape
    wb = w.reshape(o, i // 32, 32)
    s = pow2_scale(wb.abs().amax(-1, keepdim=True), 6.0, 2.0 ** -120)
    a = torch.clamp(wb.abs() / s, max=6.0)
    code = e2m1_code(a)
    neg = (wb < 0) & (code > 0)      # no negative zero codes
    deq = (E2M1[code] * torch.where(neg, -1.0, 1.0) * s).reshape(o, i)
    nib = (code + 8 * neg.long()).reshape(o, i)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    exps = (torch.log2(s).reshape(o, i // 32) + 127).to(torch.uint8)
    return packed, exps, deq


# ---------------------------------------------------------------------------
# Weights in DeepSeek's naming. Each entry: name -> (kind, float tensor) with
# kind in fp8 / fp4 / bf16 / f16 / f32 / i64. The float tensor is already
# rounded to what the stored format represents exactly.
# ---------------------------------------------------------------------------
def make_weights(seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean

    W = {}
    quant = {}   # name -> (bytes tensor, exps tensor) for fp8/fp4

    def put(name, kind, t):
        if kind == "fp8":
            qb, ex, t = quant_fp8_blocks(t)
            quant[name] = (qb, ex)
        elif kind == "fp4":
            qb, ex, t = quant_fp4_rows(t)
            quant[name] = (qb, ex)
        elif kind in ("bf16", "f16"):
            # f16 tensors are bf16 values too: bf16 numbers of moderate
            # exponent are exact in f16, so both encodings carry one value.
            t = t.to(torch.bfloat16).float()
        W[name] = (kind, t)

    def hc(prefix, rows):
        put(prefix + "_fn", "f32", randn(rows, HC * D, std=0.03))
        put(prefix + "_base", "f32", randn(rows, std=0.3))
        put(prefix + "_scale", "f32", randn(3 if rows != HC else 1, std=0.25, mean=0.5))

    put("embed.weight", "bf16", randn(V, D))
    for L in range(N_LAYER):
        p, R = f"layers.{L}.", RATIOS[L]
        hc(p + "hc_attn", (2 + HC) * HC)
        put(p + "attn_norm.weight", "bf16", randn(D, std=0.1, mean=1.0))
        put(p + "attn.wq_a.weight", "fp8", randn(QL, D, std=D ** -0.5))
        put(p + "attn.q_norm.weight", "bf16", randn(QL, std=0.1, mean=1.0))
        put(p + "attn.wq_b.weight", "fp8", randn(H * HD, QL, std=QL ** -0.5))
        put(p + "attn.wkv.weight", "fp8", randn(HD, D, std=D ** -0.5))
        # The attention kv norm is stored F16 (DeepSeek: BF16) so the
        # converter's F16 decoding runs too; the value is the same.
        put(p + "attn.kv_norm.weight", "f16", randn(HD, std=0.1, mean=1.0))
        put(p + "attn.wo_a.weight", "fp8", randn(G * OL, H * HD // G, std=(H * HD // G) ** -0.5))
        put(p + "attn.wo_b.weight", "fp8", randn(D, G * OL, std=(G * OL) ** -0.5))
        put(p + "attn.attn_sink", "f32", randn(H))
        if R:
            Wd = (2 if R == 4 else 1) * HD
            put(p + "attn.compressor.ape", "f32", randn(R, Wd, std=0.5))
            put(p + "attn.compressor.wkv.weight", "bf16", randn(Wd, D, std=D ** -0.5))
            put(p + "attn.compressor.wgate.weight", "bf16", randn(Wd, D, std=D ** -0.5))
            put(p + "attn.compressor.norm.weight", "bf16", randn(HD, std=0.1, mean=1.0))
        if R == 4:
            put(p + "attn.indexer.wq_b.weight", "fp8", randn(IH * IHD, QL, std=QL ** -0.5))
            put(p + "attn.indexer.weights_proj.weight", "bf16", randn(IH, D, std=D ** -0.5))
            put(p + "attn.indexer.compressor.ape", "f32", randn(R, 2 * IHD, std=0.5))
            put(p + "attn.indexer.compressor.wkv.weight", "bf16", randn(2 * IHD, D, std=D ** -0.5))
            put(p + "attn.indexer.compressor.wgate.weight", "bf16", randn(2 * IHD, D, std=D ** -0.5))
            put(p + "attn.indexer.compressor.norm.weight", "bf16", randn(IHD, std=0.1, mean=1.0))
        hc(p + "hc_ffn", (2 + HC) * HC)
        put(p + "ffn_norm.weight", "bf16", randn(D, std=0.1, mean=1.0))
        put(p + "ffn.gate.weight", "bf16", randn(E, D, std=D ** -0.5))
        if L < NHASH:
            # K distinct experts per token id.
            tid = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)])
            W[p + "ffn.gate.tid2eid"] = ("i64", tid)
        else:
            put(p + "ffn.gate.bias", "f32", randn(E, std=0.2))
        # Gate/up std 3: the SwiGLU clamp at 10 (3.3 sigma) is hit now and then.
        for e in range(E):
            q = p + f"ffn.experts.{e}."
            put(q + "w1.weight", "fp4", randn(FF, D, std=3 * D ** -0.5))
            put(q + "w2.weight", "fp4", randn(D, FF, std=FF ** -0.5))
            put(q + "w3.weight", "fp4", randn(FF, D, std=3 * D ** -0.5))
        put(p + "ffn.shared_experts.w1.weight", "fp8", randn(FF, D, std=3 * D ** -0.5))
        put(p + "ffn.shared_experts.w2.weight", "fp8", randn(D, FF, std=FF ** -0.5))
        put(p + "ffn.shared_experts.w3.weight", "fp8", randn(FF, D, std=3 * D ** -0.5))
    hc("hc_head", HC)
    put("norm.weight", "bf16", randn(D, std=0.1, mean=1.0))
    put("head.weight", "bf16", randn(V, D, std=2 * D ** -0.5))
    return W, quant, g


# ---------------------------------------------------------------------------
# safetensors writer (the format is tiny; writing it here keeps full control
# over the dtype strings: F8_E4M3, F8_E8M0, I8 packed FP4, ...).
# ---------------------------------------------------------------------------
def tobytes(t):
    """Little-endian bytes of a tensor (x86-64 hosts are little-endian)."""
    u = t.contiguous().view(torch.uint8).reshape(-1)
    try:
        return u.numpy().tobytes()
    except Exception:  # torch built without numpy
        return bytes(u.tolist())


def tensor_bytes(kind, t):
    dt = {"f32": ("F32", torch.float32), "f16": ("F16", torch.float16),
          "bf16": ("BF16", torch.bfloat16), "i64": ("I64", torch.int64)}[kind]
    return dt[0], tobytes(t.to(dt[1]))


def write_safetensors(path, entries):
    """entries: list of (name, dtype_str, shape, raw bytes)."""
    header, off = {}, 0
    for name, dt, shape, raw in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for _, _, _, raw in entries:
            f.write(raw)


def save_checkpoint(outdir, W, quant):
    entries = []
    for name, (kind, t) in W.items():
        if kind in ("fp8", "fp4"):
            qb, ex = quant[name]
            base = name[: -len(".weight")]
            if kind == "fp8":
                entries.append((name, "F8_E4M3", qb.shape, tobytes(qb)))
            else:
                entries.append((name, "I8", qb.shape, tobytes(qb)))
            entries.append((base + ".scale", "F8_E8M0", ex.shape, tobytes(ex)))
        else:
            dt, raw = tensor_bytes(kind, t)
            entries.append((name, dt, t.shape, raw))
    # Two shards split at the layer boundary nearest the middle, so the
    # converter's index.json handling runs.
    split = next(i for i, e in enumerate(entries) if e[0].startswith(f"layers.{N_LAYER // 2}."))
    shards = [("model-00001-of-00002.safetensors", entries[:split]),
              ("model-00002-of-00002.safetensors", entries[split:])]
    weight_map, total = {}, 0
    for fname, ents in shards:
        write_safetensors(os.path.join(outdir, fname), ents)
        for e in ents:
            weight_map[e[0]] = fname
            total += len(e[3])
    with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(NATIVE_CONFIG, f, indent=1)


def verify_checkpoint(outdir, W):
    """Decode the written shards independently of the encoder and compare
    with the float weights the model uses: the bytes must mean exactly them."""
    idx = json.load(open(os.path.join(outdir, "model.safetensors.index.json")))["weight_map"]
    tensors = {}
    for fname in sorted(set(idx.values())):
        blob = open(os.path.join(outdir, fname), "rb").read()
        n = struct.unpack("<Q", blob[:8])[0]
        hdr = json.loads(blob[8:8 + n])
        base = 8 + n
        for name, d in hdr.items():
            if name == "__metadata__":
                continue
            b, e = d["data_offsets"]
            u8 = torch.frombuffer(bytearray(blob[base + b:base + e]), dtype=torch.uint8)
            tensors[name] = (d["dtype"], d["shape"], u8)
    bad = []
    for name, (kind, t) in W.items():
        dt, shape, u8 = tensors[name]
        if dt == "F8_E4M3":
            v = u8.view(torch.float8_e4m3fn).float().reshape(shape)
            _, _, ex = tensors[name[:-len(".weight")] + ".scale"]
            s = torch.exp2(ex.float() - 127).reshape(shape[0] // 128, shape[1] // 128)
            v = v * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
        elif dt == "I8":
            lo, hi = (u8 & 15).long(), (u8 >> 4).long()
            codes = torch.stack([lo, hi], -1).reshape(shape[0], shape[1] * 2)
            v = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
            _, _, ex = tensors[name[:-len(".weight")] + ".scale"]
            v = v * torch.exp2(ex.float() - 127).reshape(shape[0], -1).repeat_interleave(32, 1)
        else:
            tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}[dt]
            v = u8.view(tdt).reshape(shape)
        if not torch.equal(v.to(t.dtype), t):
            bad.append(name)
    if bad:
        raise SystemExit(f"checkpoint bytes do not decode to the model weights: {bad[:8]}")
    return len(W)


# ---------------------------------------------------------------------------
# Tokenizer: byte-level BPE with the 256 GPT-2 byte symbols, a few merges,
# the DeepSeek specials the engine looks up by spelling, placeholders up to V.
# ---------------------------------------------------------------------------
def byte_symbols():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_tokenizer(outdir):
    sym = byte_symbols()
    specials = [(0, "<｜begin▁of▁sentence｜>"), (1, "<｜end▁of▁sentence｜>"), (2, "<｜▁pad▁｜>")]
    vocab = {}
    nid = 3
    for b in range(256):
        vocab[sym[b]] = nid
        nid += 1
    # Merges, each of two existing tokens (prefix-closed, like the real vocab).
    sp = sym[ord(" ")]
    pairs = [("t", "h"), ("th", "e"), (sp, "t"), (sp, "the"), ("i", "n"), ("e", "r"), ("a", "n"),
             ("o", "n"), ("r", "e"), (sp, "a"), (sp, "s"), ("in", "g"), (sp, "w"), ("o", "u"),
             (sp, "c"), ("e", "n"), ("a", "t"), (sp, "i"), ("i", "s"), (sp, "o"), ("l", "l"),
             (sp, "h"), ("e", "s"), (sp, "b"), ("o", "r"), ("e", "d"), (sp, "f"), ("i", "t"),
             (sp, "m"), ("a", "r"), (sp, "d"), (sp, "p"), ("a", "l"), ("i", "c"), ("t", "o"),
             (sp, "to"), (sp, "an"), ("an", "d"), (sp, "and"), (sp, "in")]
    merges = []
    for a, b in pairs:
        assert a in vocab and b in vocab, (a, b)
        merges.append(f"{a} {b}")
        if a + b not in vocab:
            vocab[a + b] = nid
            nid += 1
    names = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>",
             "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>",
             "<｜read_url｜>", "<｜image｜>"]
    added = [{"id": i, "content": s, "special": True} for i, s in specials]
    for s in names:
        added.append({"id": nid, "content": s, "special": True})
        nid += 1
    k = 0
    while nid < V:
        added.append({"id": nid, "content": f"<｜place▁holder▁no▁{k}｜>", "special": True})
        nid += 1
        k += 1
    for a in added:
        a.update({"single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
    tok = {"version": "1.0", "added_tokens": added,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": []},
           "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------------------
# HF model
# ---------------------------------------------------------------------------
RENAMES = [
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.wkv", "self_attn.compressor.indexer.kv_proj"),
    ("attn.indexer.compressor.wgate", "self_attn.compressor.indexer.gate_proj"),
    ("attn.indexer.compressor.norm", "self_attn.compressor.indexer.kv_norm"),
    ("attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj"),
    ("attn.indexer.weights_proj", "self_attn.compressor.indexer.scorer.weights_proj"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.wkv", "self_attn.compressor.kv_proj"),
    ("attn.compressor.wgate", "self_attn.compressor.gate_proj"),
    ("attn.compressor.norm", "self_attn.compressor.kv_norm"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a", "self_attn.q_a_proj"), ("attn.wq_b", "self_attn.q_b_proj"),
    ("attn.q_norm", "self_attn.q_a_norm"), ("attn.wkv", "self_attn.kv_proj"),
    ("attn.kv_norm", "self_attn.kv_norm"), ("attn.wo_a", "self_attn.o_a_proj"),
    ("attn.wo_b", "self_attn.o_b_proj"), ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.shared_experts.w1", "mlp.shared_experts.gate_proj"),
    ("ffn.shared_experts.w3", "mlp.shared_experts.up_proj"),
    ("ffn.shared_experts.w2", "mlp.shared_experts.down_proj"),
]
GLOBAL = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
          "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
          "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def hf_state_dict(W):
    sd = {}
    for name, (kind, t) in W.items():
        if name in GLOBAL:
            sd[GLOBAL[name]] = t
            continue
        _, L, rest = name.split(".", 2)
        if rest.startswith("ffn.experts."):
            continue
        for nat, hf in RENAMES:
            if rest == nat or rest.startswith(nat + "."):
                sd[f"model.layers.{L}.{hf}{rest[len(nat):]}"] = t
                break
        else:
            raise KeyError(name)
    for L in range(N_LAYER):
        p = f"layers.{L}.ffn.experts."
        sd[f"model.layers.{L}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([W[p + f"{e}.w1.weight"][1], W[p + f"{e}.w3.weight"][1]]) for e in range(E)])
        sd[f"model.layers.{L}.mlp.experts.down_proj"] = torch.stack(
            [W[p + f"{e}.w2.weight"][1] for e in range(E)])
    return sd


def spec_inv_freq(base, yarn):
    """Per-pair RoPE frequencies of spec §3.2."""
    k = torch.arange(RD // 2, dtype=torch.float64)
    theta = base ** (-2 * k / RD)
    if not yarn:
        return theta
    f, orig, bf, bs = 16.0, 65536.0, 32.0, 1.0

    def corr(beta):
        return RD * math.log(orig / (2 * math.pi * beta)) / (2 * math.log(base))
    low, high = max(0, math.floor(corr(bf))), min(RD - 1, math.ceil(corr(bs)))
    r = torch.clamp((k - low) / ((high - low) if high > low else 0.001), 0, 1)
    return theta * (1 - r) + theta / f * r


def build_hf(W, log):
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    kw = {k: NATIVE_CONFIG[k] for k in HF_KEYS}
    kw["rope_parameters"] = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                             "beta_fast": 32.0, "beta_slow": 1.0}
    cfg = DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    log(f"layer_types {cfg.layer_types}; mlp_layer_types {cfg.mlp_layer_types}")
    log(f"rope_parameters {cfg.rope_parameters}")
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    sd = hf_state_dict(W)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and "inv_freq" not in k]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise SystemExit(f"state dict mismatch: missing {missing[:8]} unexpected {unexpected[:8]} shapes {bad_shape[:8]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    # RoPE frequencies: check HF's against spec §3.2; force the spec's if not.
    fixes = []
    for name, buf in model.named_buffers():
        if name.endswith("main_inv_freq") or name.endswith("compress_inv_freq"):
            comp = "compress" in name.rsplit(".", 1)[-1]
            want = spec_inv_freq(C["compress_rope_theta"] if comp else C["rope_theta"], comp).float()
            err = (buf.double() - want.double()).abs().max().item() / want.abs().max().item()
            if err > 1e-6:
                fixes.append((name, err))
                buf.copy_(want)
    log(f"rope inv_freq differing from spec (forced to spec): {fixes if fixes else 'none'}")
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb"):
            for lt in getattr(mod, "layer_types", []):
                s = getattr(mod, f"{lt}_attention_scaling", 1.0)
                if abs(float(s) - 1.0) > 1e-9:
                    log(f"WARNING {name}.{lt}_attention_scaling = {s}; forcing 1.0")
                    setattr(mod, f"{lt}_attention_scaling", 1.0)
    return model


def stable_topk(x, k, dim=-1, largest=True, sorted=True):
    """torch.topk with a defined tie rule: among equal values the lowest index
    wins (ds4's rule, spec §4.6 / §10 row 10). Ties are common here: with FP4
    indexer inputs and only 4 indexer heads, many rows score exactly 0."""
    v, i = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((v.narrow(dim, 0, k), i.narrow(dim, 0, k)))


class Patches:
    """Make HF compute the model as DeepSeek defines it:
      - FP8 round trip of KV rows (spec §3.3) as a forward hook on the kv
        norms: it touches dims 0..HD-RD-1 and RoPE only the tail, so rounding
        right after the norm equals rounding after RoPE;
      - Hadamard + FP4 round trip of indexer queries and rows (spec §3.4) as a
        pre-hook on the indexer scorer, whose inputs are post-RoPE;
      - top-k ties broken towards the lowest index (router and indexer).
    f16_kv additionally rounds every KV row the attention reads (raw window
    and compressed rows, after RoPE) through f16: ds4's storage convention
    (spec §7.1, §10 row 7), which the CPU engine follows."""

    def __init__(self, model, f16_kv=False):
        import transformers.models.deepseek_v4.modeling_deepseek_v4 as M
        self.M, self.handles = M, []
        nope = HD - RD

        def kv_hook(mod, args, out):
            return torch.cat([fp8_sim(out[..., :nope]), out[..., nope:]], dim=-1)

        def scorer_pre(mod, args):
            q, ckv, hs = args
            return (fp4_sim(hadamard(q)), fp4_sim(hadamard(ckv)), hs)

        for L, layer in enumerate(model.model.layers):
            at = layer.self_attn
            self.handles.append(at.kv_norm.register_forward_hook(kv_hook))
            if at.compressor is not None:
                self.handles.append(at.compressor.kv_norm.register_forward_hook(kv_hook))
                if hasattr(at.compressor, "indexer"):
                    self.handles.append(at.compressor.indexer.scorer.register_forward_pre_hook(scorer_pre))
        self.saved = (torch.topk, torch.Tensor.topk, M.eager_attention_forward)
        torch.topk = stable_topk
        torch.Tensor.topk = stable_topk
        if f16_kv:
            orig = M.eager_attention_forward

            def attn_f16(module, query, key, value, *a, **k):
                key = key.to(torch.float16).to(key.dtype)
                return orig(module, query, key, key, *a, **k)
            M.eager_attention_forward = attn_f16

    def remove(self):
        for h in self.handles:
            h.remove()
        torch.topk, torch.Tensor.topk, self.M.eager_attention_forward = self.saved


class IndexerTap:
    """Records the indexer's top-k selections per layer (sets per position)."""

    def __init__(self, model):
        self.sel, self.handles = {}, []
        for L, layer in enumerate(model.model.layers):
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                def hook(mod, args, out, L=L):
                    self.sel.setdefault(L, []).append(out.detach().clone())
                self.handles.append(comp.indexer.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_full(model, ids):
    return model(input_ids=ids[None], use_cache=False).logits[0].float()


@torch.no_grad()
def run_chunked(model, ids, chunks):
    """Prefill in chunks through HF's cache; chunks = list of lengths."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out, pos = [], 0
    for n in chunks:
        o = model(input_ids=ids[None, pos:pos + n], past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(pos, pos + n)[None])
        out.append(o.logits[0].float())
        pos += n
    return torch.cat(out)


def sel_sets(tap, L):
    t = tap.sel[L][0][0]  # [S, k]
    return [frozenset(int(i) for i in row if i >= 0) for row in t]


def compare(a, b):
    d = (a - b).abs()
    rel = (d.amax(-1) / b.abs().amax(-1)).max().item()
    return {"max_abs": d.max().item(), "max_rel_per_pos": rel,
            "argmax_equal": int((a.argmax(-1) == b.argmax(-1)).sum()), "n": a.shape[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--n-tokens", type=int, default=300)
    ap.add_argument("--no-hf", action="store_true", help="only write the checkpoint")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    os.makedirs(a.outdir, exist_ok=True)
    logf = open(os.path.join(a.outdir, "oracle.log"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")

    W, quant, g = make_weights(a.seed)
    # Tokens: BOS then random ids (specials excluded except BOS at 0).
    ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(3, V, (a.n_tokens - 1,), generator=g)])
    save_checkpoint(a.outdir, W, quant)
    log(f"checkpoint written; {verify_checkpoint(a.outdir, W)} tensors decode back exactly")
    make_tokenizer(a.outdir)
    meta = {"seed": a.seed, "n_tokens": a.n_tokens, "n_vocab": V, "tokens": ids.tolist(),
            "config": NATIVE_CONFIG, "torch": torch.__version__}
    if a.no_hf:
        json.dump(meta, open(os.path.join(a.outdir, "oracle.json"), "w"), indent=1)
        return
    model = build_hf(W, log)
    import transformers
    meta["transformers"] = transformers.__version__

    tap = IndexerTap(model)
    runs, sels = {}, {}
    for name, kind in (("unpatched", None), ("patched", False), ("patched_f16kv", True)):
        patches = Patches(model, f16_kv=kind) if kind is not None else None
        runs[name] = run_full(model, ids)
        sels[name] = {L: sel_sets(tap, L) for L in tap.sel}
        tap.sel.clear()
        if name == "patched":
            # Sensitivity of the golden itself: the same model with every
            # embedding row scaled by (1 + 1e-6 noise). Positions that move
            # a lot sit on a discontinuity (a rounding or top-k decision).
            emb = model.model.embed_tokens.weight
            keep = emb.detach().clone()
            with torch.no_grad():
                emb.mul_(1 + 1e-6 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(7)))
            pert = run_full(model, ids)
            with torch.no_grad():
                emb.copy_(keep)
            tap.sel.clear()
            for cname, chunks in (("chunked_100", [100, 100, len(ids) - 200]),
                                  ("chunked_7_then_decode", [7] + [1] * 60 + [len(ids) - 67])):
                try:
                    c = run_chunked(model, ids, chunks)
                    stats_extra = compare(c, runs["patched"])
                except Exception as ex:  # HF's cache path is not what the goldens rely on
                    stats_extra = f"failed: {type(ex).__name__}: {ex}"
                runs.setdefault("_extra", {})["hf_patched_" + cname + "_vs_full"] = stats_extra
                tap.sel.clear()
        if patches:
            patches.remove()
    tap.remove()
    un, pa, pa16 = runs["unpatched"], runs["patched"], runs["patched_f16kv"]
    if torch.equal(pa, pa16):
        raise SystemExit("f16 KV patch had no effect (attention interface not patched?)")
    S = len(ids)
    stats = {"patched_vs_unpatched": compare(un, pa), "patched_f16kv_vs_patched": compare(pa16, pa),
             "patched_perturbed_1e-6_vs_patched": compare(pert, pa)}
    stats.update(runs["_extra"])
    rel = ((pert - pa).abs().amax(-1) / pa.abs().amax(-1))
    stats["patched_perturbed_positions_over_1e-4"] = [int(p) for p in torch.nonzero(rel > 1e-4).flatten()]
    idx = {}
    for L in sels["patched"]:
        def ndiff(a, b):
            return [p for p in range(S) if sels[a][L][p] != sels[b][L][p]]
        d_un, d_16 = ndiff("patched", "unpatched"), ndiff("patched", "patched_f16kv")
        idx[L] = {"positions_selection_differs_unpatched": len(d_un), "first_unpatched": d_un[:10],
                  "positions_selection_differs_f16kv": len(d_16), "first_f16kv": d_16[:10],
                  "max_selected": max(len(x) for x in sels["patched"][L]), "rows_at_end": S // 4}
    stats["indexer"] = idx
    top = torch.softmax(pa, -1).amax(-1)
    stats["patched_top1_prob"] = {"min": top.min().item(), "median": top.median().item(), "max": top.max().item()}
    stats["patched_logit_absmax"] = pa.abs().max().item()
    meta["stats"] = stats
    for nm, t in (("golden_patched.f32", pa), ("golden_patched_f16kv.f32", pa16), ("golden_unpatched.f32", un)):
        with open(os.path.join(a.outdir, nm), "wb") as f:
            f.write(tobytes(t.float()))
    json.dump(meta, open(os.path.join(a.outdir, "oracle.json"), "w"), indent=1)
    log(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
