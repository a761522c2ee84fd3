#!/usr/bin/env bash
# Training throughput side by side: `slm bench --train SHAPE` and the same model in PyTorch
# (bench/train_torch.py), alternating (A B A B ...), same threads. Prints the median tokens/s
# of each, the ratio slm/PyTorch, peak RSS and the forward/backward/optimizer split.
#
#   bench/compare-train.sh [SHAPES] [THREADS] [PAIRS] [STEPS]      e.g. "tiny small" 2 3 4
#
# The shape smollm2 (SmolLM2-135M, sequence 128, batch 16) is compared with transformers'
# LlamaForCausalLM (bench/finetune_torch.py); LORA=R trains rank-R adapters on every
# projection instead, in slm and in PEFT.
#
# PyTorch comes from $SLM_PYTHON (default: the venv .ci/run makes, ~/.cache/slm/pyenv, from
# requirements-dev.txt). SLM_TORCH_COMPILE=1 also runs torch.compile. SLM_BASELINE=path/to/an
# older slm adds that build to every round, as the row "slm-baseline".
set -euo pipefail
shapes="${1:-tiny small}"; threads="${2:-2}"; pairs="${3:-3}"; steps="${4:-4}"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${SLM_PYTHON:-$HOME/.cache/slm/pyenv/bin/python}"
if ! "$py" -c "import torch" 2>/dev/null; then
  py="$HOME/.cache/slm/pyenv/bin/python"
  python3 -m venv "$HOME/.cache/slm/pyenv"
  "$py" -m pip install -q -r "$root/requirements-dev.txt"
fi
(cd "$root" && cargo build --release -q -p slm-cli)
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
out="$(mktemp -d)"
engines="eager"; [ "${SLM_TORCH_COMPILE:-0}" = 1 ] && engines="eager compile"
for shape in $shapes; do
  for i in $(seq "$pairs"); do
    lora=(); [ -n "${LORA:-}" ] && lora=(--lora "$LORA")
    peer="$root/bench/train_torch.py"; peer_args=(--shape "$shape")
    [ "$shape" = smollm2 ] && { peer="$root/bench/finetune_torch.py"; peer_args=("${lora[@]}"); }
    "$slm" bench --train "$shape" "${lora[@]}" --threads "$threads" --steps "$steps" --json >> "$out/$shape.slm.jsonl"
    if [ -n "${SLM_BASELINE:-}" ]; then
      "$SLM_BASELINE" bench --train "$shape" --threads "$threads" --steps "$steps" --json \
        >> "$out/$shape.slm-baseline.jsonl"
    fi
    for e in $engines; do
      flag=""; [ "$e" = compile ] && flag="--compile"
      "$py" "$peer" "${peer_args[@]}" --threads "$threads" --steps "$steps" $flag --json \
        2>/dev/null >> "$out/$shape.torch-$e.jsonl"
    done
  done
done
python3 - "$out" "$threads" "$shapes" <<'PY'
import glob, json, os, statistics, sys
out, threads, shapes = sys.argv[1], sys.argv[2], sys.argv[3].split()
med = lambda rs, k: statistics.median(r[k] for r in rs)
print(f"threads {threads}; medians of {{n}} runs each, alternating".replace("{n}", "the"))
print("| shape | engine | tokens/s | ratio slm/engine | forward s | backward s | optimizer s | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|")
for shape in shapes:
    slm = [json.loads(l) for l in open(f"{out}/{shape}.slm.jsonl")]
    rows = [("slm", slm)]
    for f in sorted(glob.glob(f"{out}/{shape}.torch-*.jsonl") + glob.glob(f"{out}/{shape}.slm-baseline.jsonl")):
        rows.append((os.path.basename(f).split(".")[1], [json.loads(l) for l in open(f)]))
    s = med(slm, "tokens_per_s")
    for name, rs in rows:
        t = med(rs, "tokens_per_s")
        ratio = "" if name == "slm" else f"{s / t:.2f}x"
        print(f"| {shape} | {name} | {t:.0f} | {ratio} | {med(rs, 'forward_s'):.3f} | "
              f"{med(rs, 'backward_s'):.3f} | {med(rs, 'optimizer_s'):.3f} | {med(rs, 'peak_rss_mb'):.0f} |")
PY
