"""Loads a LoRA adapter folder written by slm with PEFT over its base model folder (through
transformers' Auto classes: a causal LM, or a classifier with as many labels as the adapter's
saved score layer has rows) and prints, as JSON, PEFT's class and the logits of each row of
token ids (every position for a causal LM or a token head; a sequence head's one row).

    python hf_peft.py BASE_DIR ADAPTER_DIR '[[ids...], ...]'
"""
import json
import sys

import torch
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

base, adapter, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
task = PeftConfig.from_pretrained(adapter).task_type
kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
if task == "CAUSAL_LM":
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
else:
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as f:
        labels = f.get_slice("base_model.model.score.weight").get_shape()[0]
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    model = auto.from_pretrained(base, num_labels=labels, **kwargs)
model = PeftModel.from_pretrained(model, adapter)
model.eval()
out = {"class": type(model).__name__, "task": str(task), "logits": []}
with torch.no_grad():
    for r in rows:
        # (labels) for a sequence head, (positions, outputs) otherwise.
        out["logits"].append(model(input_ids=torch.tensor([r])).logits[0].tolist())
print(json.dumps(out))
