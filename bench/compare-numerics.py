#!/usr/bin/env python3
"""slm's logits and greedy continuations against llama.cpp, prompt by prompt.

Always compares with the fixtures in ../shared/fixtures/reference (llama.cpp, AVX-512 build).
With --llama-dump BIN (bench/llama_dump_logits.c compiled against a local llama.cpp build, see
its header) it also runs that llama.cpp on the same prompts and compares all 49,152 logits.

    cargo build --release -p slm-model --example dump_logits
    python3 bench/compare-numerics.py [--llama-dump BIN] [--fixture q4_1|q8_0] [--model GGUF]
"""
import argparse, json, os, subprocess, tempfile
import numpy as np

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument('--llama-dump')
ap.add_argument('--fixture', default='q4_1')
ap.add_argument('--model')
ap.add_argument('--slm', default=os.path.join(os.environ.get('CARGO_TARGET_DIR', os.path.join(root, 'target')), 'release/examples/dump_logits'))
a = ap.parse_args()
ref = json.load(open(os.path.join(root, '../shared/fixtures/reference', f'smollm2-135m-instruct-{a.fixture}.llamacpp.json')))
model = a.model or os.path.expanduser(f'~/.cache/slm/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf')
tmp = tempfile.mkdtemp()

def run(cmd, out):
    txt = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp).stdout
    greedy = [int(x) for x in txt.split('greedy:')[1].split()]
    return np.fromfile(out, dtype=np.float32), greedy

worst = 0.0
for p in ref['prompts']:
    ids = [str(i) for i in p['token_ids']]
    n = str(len(p['greedy_ids']))
    ours, g = run([a.slm, model, os.path.join(tmp, 'slm.bin'), n] + ids, os.path.join(tmp, 'slm.bin'))
    rel = max(abs(ours[t['id']] - t['logit']) / abs(t['logit']) for t in p['top10'])
    worst = max(worst, rel)
    same_set = set(np.argsort(-ours)[:10]) == {t['id'] for t in p['top10']}
    match = next((i for i, (x, y) in enumerate(zip(g, p['greedy_ids'])) if x != y), len(g))
    line = f"{p['name']:14} fixture: top10 set {'same' if same_set else 'DIFFERS'}, max rel {rel:.2e}, greedy equal for {match}/{len(g)}"
    if a.llama_dump:
        theirs, lg = run([a.llama_dump, model, n] + ids, os.path.join(tmp, 'logits.bin'))
        lmatch = next((i for i, (x, y) in enumerate(zip(g, lg)) if x != y), len(g))
        line += f" | local llama.cpp: max |diff| {np.abs(ours - theirs).max():.2e}, greedy equal for {lmatch}/{len(g)}"
    print(line)
print(f'max relative top-10 logit difference vs fixture: {worst:.2e}')
