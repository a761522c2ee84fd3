"""Loads an slm model folder with Hugging Face transformers and prints, as JSON, the token ids
its tokenizer gives TEXT and the logits of every position (fp32, CPU).

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
print(json.dumps({
    "class": type(model).__name__,
    "ids": ids,
    "logits": logits.tolist(),
}))
