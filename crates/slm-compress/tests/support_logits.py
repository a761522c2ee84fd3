"""Loads a Hugging Face folder with transformers (f32, CPU, eager attention) and prints as JSON
the logits of every position of the token ids given.

    python support_logits.py MODEL_DIR ID,ID,...
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, attn_implementation="eager"
)
model.eval()
ids = [int(x) for x in sys.argv[2].split(",")]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
