"""seqeval's entity scores for seeded random tag sequences (valid BIO and not: I- after O,
type switches inside an entity, IOBES-style E-/S- tags), as JSON on stdout:
{"gold": [[[tags]]...], "pred": ..., "report": {type: {precision, recall, f1, support}}}
for several (gold, pred) cases."""
import json
import random

from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities

rng = random.Random(20)
TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "E-PER", "S-LOC"]


def sentences():
    return [[rng.choice(TAGS) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 8))]


cases = []
for _ in range(300):
    gold = sentences()
    # A prediction that mostly agrees: each tag kept, or replaced at random.
    pred = [[t if rng.random() < 0.7 else rng.choice(TAGS) for t in s] for s in gold]
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    cases.append({
        "gold": gold,
        "pred": pred,
        "gold_entities": [list(e) for e in get_entities(gold)],
        "report": {
            k: {m: float(v[m]) for m in ("precision", "recall", "f1-score")} | {"support": int(v["support"])}
            for k, v in report.items()
        },
    })
print(json.dumps(cases))
