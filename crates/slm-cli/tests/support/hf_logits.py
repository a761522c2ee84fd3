"""Loads an slm model folder with Hugging Face transformers and prints, as JSON, the token ids
its tokenizer gives TEXT and the logits of every position (fp32, CPU); and the logits again
with the rotated keys and the values rounded to f16, as a KV cache in f16 holds them (how much
that rounding alone moves this model's logits).

    python hf_logits.py MODEL_DIR TEXT
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
print(json.dumps({
    "class": type(model).__name__,
    "ids": ids,
    "logits": logits.tolist(),
    "logits_f16_kv": logits_f16_kv.tolist(),
}))
