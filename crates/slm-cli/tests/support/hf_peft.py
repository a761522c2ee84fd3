"""Loads a LoRA adapter folder written by slm with PEFT over its base model folder (through
transformers' Auto classes: a causal LM, or a classifier with as many labels as the adapter's
saved score layer has rows) and prints, as JSON, PEFT's class and the logits of each row of
token ids (every position for a causal LM or a token head; a sequence head's one row).

    python hf_peft.py BASE_DIR ADAPTER_DIR '[[ids...], ...]' [MERGED_DIR]

With MERGED_DIR (slm's merge of the adapter into the base) it also prints `merge_diff`, the
largest difference between PEFT's own merge (merge_and_unload) and that folder's weights, and
`logits_f64`, the merged folder's logits computed by transformers in float64 (a reference
both float32 forwards are measured against).
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
merged = sys.argv[4] if len(sys.argv) > 4 else None
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
    if merged is not None:
        ours = AutoModelForCausalLM.from_pretrained(merged, **kwargs).state_dict()
        theirs = model.merge_and_unload().state_dict()
        assert ours.keys() == theirs.keys(), (ours.keys() ^ theirs.keys())
        out["merge_diff"] = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        kwargs["dtype"] = torch.float64
        exact = AutoModelForCausalLM.from_pretrained(merged, **kwargs)
        out["logits_f64"] = [exact(input_ids=torch.tensor([r])).logits[0].tolist() for r in rows]
print(json.dumps(out))
