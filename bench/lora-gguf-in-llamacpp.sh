#!/usr/bin/env bash
# LoRA over a quantized GGUF base, end to end into llama.cpp: adapters trained over
# SmolLM2-135M-Instruct Q4_1 with its projections kept in their blocks (a short chat
# fine-tune: replies that repeat a word), merged into the base with `slm lora merge`,
# quantized by slm, and run greedily by slm and by llama.cpp's llama-completion
# (bench/quantized-in-llamacpp.sh), which must continue every prompt the same way.
#
#   bench/lora-gguf-in-llamacpp.sh [BASE.gguf]    # default: the fetched SmolLM2 Q4_1
#
# TYPES: the merged model's quantization types (default "q4_1 q8_0 q4_k_m").
# LLAMA_COMPLETION: as bench/quantized-in-llamacpp.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-${SLM_ASSETS:-$HOME/.cache/slm/assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cd "$root"
cargo build --release -p slm-cli >/dev/null 2>&1
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
python3 - "$work/chat.jsonl" <<'PY'
import json, sys
words = ["red", "blue", "green", "sea", "whale", "storm", "ship", "gold"]
with open(sys.argv[1], "w") as f:
    for i in range(64):
        w, n = words[i % len(words)], 2 + i % 6
        f.write(json.dumps({"messages": [
            {"role": "user", "content": f"Say {w} {n} times."},
            {"role": "assistant", "content": " ".join([w] * n)}]}) + "\n")
PY
cat > "$work/lora.toml" <<TOML
[run]
out = "$work/run"
seed = 1
[data]
train = "$work/chat.jsonl"
valid_fraction = 0.125
[model]
parent = "$base"
[objective]
kind = "sft"
[budget]
epochs = 6
[optim]
batch = 8
lr = 2e-3
warmup = 4
[lora]
r = 16
alpha = 32
targets = ["q", "k", "v", "o", "gate", "up", "down"]
TOML
echo "training LoRA over $base ($(git rev-parse --short HEAD))"
/usr/bin/time -f "train: %e s wall, peak RSS %M KB" "$slm" train "$work/lora.toml" 2>&1 | tail -3
"$slm" lora merge "$base" "$work/run/adapter" -o "$work/merged" >/dev/null 2>&1
prompt='<|im_start|>user
Say whale 4 times.<|im_end|>
<|im_start|>assistant
'
echo "base:   $("$slm" generate "$base" -p "$prompt" -n 12 --temp 0 2>/dev/null | tail -1)"
echo "merged: $("$slm" generate "$work/merged" -p "$prompt" -n 12 --temp 0 2>/dev/null | tail -1)"
TYPES="${TYPES:-q4_1 q8_0 q4_k_m}" bash bench/quantized-in-llamacpp.sh "$work/merged"
