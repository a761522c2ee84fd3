"""Loads a classifier folder written by slm with Hugging Face transformers (the class its
config.json names, through the Auto classes) and prints, as JSON, the class and the logits of
each row of token ids: per row for a sequence head (rows right-padded with pad_token_id in
one batch, so transformers finds each row's last real token itself), per token for a token
head.

    python hf_heads.py MODEL_DIR '[[ids...], [ids...]]'
"""
import json
import sys

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

model_dir, rows = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(model_dir)
cls = config.architectures[0]
auto = (
    AutoModelForSequenceClassification
    if cls.endswith("ForSequenceClassification")
    else AutoModelForTokenClassification
)
model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
model.eval()
out = {"class": type(model).__name__, "labels": [config.id2label[i] for i in range(config.num_labels)]}
with torch.no_grad():
    if cls.endswith("ForSequenceClassification"):
        width = max(len(r) for r in rows)
        batch = [r + [config.pad_token_id] * (width - len(r)) for r in rows]
        out["logits"] = model(torch.tensor(batch)).logits.tolist()
    else:
        out["logits"] = [model(torch.tensor([r])).logits[0].tolist() for r in rows]
print(json.dumps(out))
