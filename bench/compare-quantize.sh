#!/usr/bin/env bash
# slm quantize beside llama-quantize on one F16 GGUF of SmolLM2-135M-Instruct (made by slm
# from the fetched Q4_1 asset, as bench/quantize-reference.sh makes it), alternating, each
# with all cores: wall time and peak RSS (GNU time) per round, and whether the two outputs
# hold the same tensor bytes.
#
#   bench/compare-quantize.sh TYPE [ROUNDS] [IMATRIX]
#   bench/compare-quantize.sh q4_k_m 3
#   bench/compare-quantize.sh q4_k_m 3 crates/slm-compress/tests/reference/imatrix.gguf
#
# LLAMA_QUANTIZE: llama-quantize built outside the repository (bench/quantize-reference.sh
# builds it into $SLM_PEERS).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ty="$1"; rounds="${2:-3}"; imatrix="${3:-}"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
LLAMA_QUANTIZE="${LLAMA_QUANTIZE:-$peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-quantize}"
cd "$root"
cargo build --release -p slm-cli -p slm-compress --examples --bins >/dev/null 2>&1
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
hashes="${CARGO_TARGET_DIR:-$root/target}/release/examples/tensor_hashes"
asset="${SLM_ASSETS:-$HOME/.cache/slm/assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
"$slm" export "$asset" --format hf --type f16 -o "$work/hf16" >/dev/null 2>&1
"$slm" export "$work/hf16" --format gguf --type f16 -o "$work/f16.gguf" >/dev/null 2>&1
threads="$(nproc)"
llama_args=(); slm_args=()
if [ -n "$imatrix" ]; then llama_args=(--imatrix "$imatrix"); slm_args=(--imatrix "$imatrix"); fi
measure() { # label, command...
  local label="$1"; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>&1
  read -r wall rss < "$work/time"
  printf '%s %s s %s MB\n' "$label" "$wall" "$((rss / 1024))"
}
echo "type $ty, imatrix ${imatrix:-none}, $threads threads, $(git rev-parse --short HEAD)"
for r in $(seq "$rounds"); do
  rm -f "$work/l.gguf" "$work/s.gguf"
  measure "round $r llama-quantize" "$LLAMA_QUANTIZE" "${llama_args[@]}" "$work/f16.gguf" "$work/l.gguf" "$ty" "$threads"
  measure "round $r slm-quantize  " "$slm" quantize "$work/f16.gguf" --type "$ty" "${slm_args[@]}" -o "$work/s.gguf"
done
if cmp -s <("$hashes" "$work/l.gguf" | sort) <("$hashes" "$work/s.gguf" | sort); then
  echo "tensor data: identical"
else
  echo "tensor data: DIFFERENT"
fi
