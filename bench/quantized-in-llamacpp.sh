#!/usr/bin/env bash
# A model `slm train` made (the quickstart's ~5M-parameter Llama, trained for a short time),
# quantized by slm to q8_0 and q4_k_m, runs in llama.cpp with the greedy continuation slm
# gives, for a few prompts.
#
#   bench/quantized-in-llamacpp.sh [MODEL_FOLDER]     # default: a fresh 1.5-minute quickstart
#
# TYPES: the quantization types (default "q8_0 q4_k_m").
#
# LLAMA_COMPLETION: llama-completion built outside the repository, from the same sources as
# bench/quantize-reference.sh (`cmake --build build --target llama-completion`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
LLAMA_COMPLETION="${LLAMA_COMPLETION:-$peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-completion}"
cd "$root"
cargo build --release -p slm-cli >/dev/null 2>&1
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
model="${1:-}"
if [ -z "$model" ]; then
  "$slm" quickstart --minutes 1.5 --out "$work/qs" >"$work/qs.log" 2>&1
  model="$(dirname "$(find "$work/qs" -name config.json | head -1)")"
fi
echo "model: $model ($(git rev-parse --short HEAD))"
same=0; total=0
for ty in ${TYPES:-q8_0 q4_k_m}; do
  "$slm" quantize "$model" --type "$ty" -o "$work/$ty.gguf" >/dev/null 2>&1
  for prompt in "The whale" "Call me Ishmael." "It was a dark and stormy night, and" "The President of the United States"; do
    # slm prints the prompt before its continuation; llama-completion is told not to.
    ours="$("$slm" generate "$work/$ty.gguf" -p "$prompt" -n 24 --temp 0 2>/dev/null)"
    ours="${ours#"$prompt"}"
    theirs="$("$LLAMA_COMPLETION" -m "$work/$ty.gguf" -p "$prompt" -n 24 --temp 0 --top-k 1 \
      -no-cnv --no-display-prompt --simple-io -t "$(nproc)" 2>/dev/null | sed 's/ \[end of text\]$//')"
    total=$((total + 1))
    if [ "$(printf '%s' "$ours" | tr -d '\n')" = "$(printf '%s' "$theirs" | tr -d '\n')" ]; then
      same=$((same + 1)); verdict=same
    else
      verdict=DIFFERENT
    fi
    printf '%-7s %-40s %s\n  slm:       %s\n  llama.cpp: %s\n' "$ty" "\"$prompt\"" "$verdict" "$ours" "$theirs"
  done
done
echo "$same of $total greedy continuations identical"
