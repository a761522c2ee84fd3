"""Loads an slm model folder with Hugging Face transformers and prints, as JSON, the token ids
its tokenizer gives TEXT and the logits of every position (fp32, CPU); and the logits again
with the rotated keys and the values rounded to f16, as a KV cache in f16 holds them (how much
that rounding alone moves this model's logits).

    python hf_logits.py MODEL_DIR TEXT
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation="eager"
)
model.eval()
ids = tok(text)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]

import transformers.models.llama.modeling_llama as llama

rotate = llama.apply_rotary_pos_emb


def rotate_then_round_keys(q, k, *args, **kwargs):
    q, k = rotate(q, k, *args, **kwargs)
    return q, k.half().float()


llama.apply_rotary_pos_emb = rotate_then_round_keys
for layer in model.model.layers:
    layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: out.half().float())
with torch.no_grad():
    logits_f16_kv = model(torch.tensor([ids])).logits[0]


def f16_cache_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """llama.cpp's CPU flash attention over an f16 KV cache, one query at a time
    (ggml_compute_forward_flash_attn_ext_f16_one_chunk, as slm's attention.rs follows it): the
    query rounded to f16, f32 scores, and softmax(QK)V accumulated online in f16, each
    multiply-add rounded once (float64 stands in for the fused multiply-add)."""
    q = query[0].double().numpy().astype(np.float32)
    k = key[0].numpy().astype(np.float16).astype(np.float32)
    v = value[0].numpy().astype(np.float16)
    heads, t, d = q.shape
    rep = heads // k.shape[0]
    out = np.zeros((t, heads, d), np.float32)
    for h in range(heads):
        kh, vh = k[h // rep], v[h // rep]
        for i in range(t):
            q16 = q[h, i].astype(np.float16).astype(np.float32)
            m, total = np.float32(-np.inf), np.float32(0)
            acc = np.zeros(d, np.float16)
            for j in range(i + 1):
                s = np.float32(np.dot(kh[j], q16)) * np.float32(scaling)
                ms, vs = np.float32(1), np.float32(1)
                if s > m:
                    old, m = m, s
                    ms = np.float32(np.exp(np.float32(old - m)))
                    acc = (acc.astype(np.float32) * ms).astype(np.float16)
                else:
                    vs = np.float32(np.exp(np.float32(s - m)))
                acc = (vh[j].astype(np.float64) * np.float64(vs) + acc.astype(np.float64)).astype(
                    np.float16
                )
                total = np.float32(np.float64(total) * np.float64(ms) + np.float64(vs))
            out[i, h] = acc.astype(np.float32) * (np.float32(1) / total)
    return torch.from_numpy(out)[None], None


llama.eager_attention_forward = f16_cache_attention
with torch.no_grad():
    logits_f16_cache = model(torch.tensor([ids])).logits[0]
print(json.dumps({
    "class": type(model).__name__,
    "ids": ids,
    "logits": logits.tolist(),
    "logits_f16_kv": logits_f16_kv.tolist(),
    "logits_f16_cache": logits_f16_cache.tolist(),
}))
