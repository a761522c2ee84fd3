#!/usr/bin/env bash
# Makes the reference that crates/slm-compress/tests/quantize_reference.rs holds slm to: the
# tensor data llama-quantize writes for each file type from one F16 GGUF of
# SmolLM2-135M-Instruct, without and with an importance matrix (llama-imatrix's, over the
# first 8 windows of 512 tokens of data/quickstart/moby-dick-003.txt, one window per batch
# as slm runs them, committed as imatrix.gguf). The F16 input is made by slm from the fetched Q4_1 asset (Q4_1 ->
# Hugging Face folder in f16 -> GGUF in f16, `slm export` both ways), so the test can make
# the same file without llama.cpp; its tensor hashes are recorded too.
#
#   bench/quantize-reference.sh            # writes crates/slm-compress/tests/reference/*.txt
#
# llama.cpp is built outside the repository (never committed): set LLAMA_QUANTIZE to its
# llama-quantize binary, or let this script build it from the PyPI sdist of llama-cpp-python
# into $SLM_PEERS (default ~/.cache/slm/peers).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
src="$peers/llama_cpp_python-0.3.36/vendor/llama.cpp"
LLAMA_QUANTIZE="${LLAMA_QUANTIZE:-$src/build/bin/llama-quantize}"
LLAMA_IMATRIX="${LLAMA_IMATRIX:-$src/build/bin/llama-imatrix}"
if [ ! -x "$LLAMA_QUANTIZE" ] || [ ! -x "$LLAMA_IMATRIX" ]; then
  mkdir -p "$peers"; cd "$peers"
  if [ ! -d "$src" ]; then
    python3 -m pip install -q scikit-build-core cmake ninja
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d .
    tar xzf llama_cpp_python-0.3.36.tar.gz
  fi
  cd "$src"
  [ -d build ] || cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
  cmake --build build --target llama-quantize llama-imatrix -j"$(nproc)"
fi
cd "$root"
cargo build --release -p slm-cli -p slm-compress --examples --bins
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
hashes="${CARGO_TARGET_DIR:-$root/target}/release/examples/tensor_hashes"
asset="${SLM_ASSETS:-$HOME/.cache/slm/assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
"$slm" export "$asset" --format hf --type f16 -o "$work/hf16" >/dev/null
"$slm" export "$work/hf16" --format gguf --type f16 -o "$work/f16.gguf" >/dev/null
out="$root/crates/slm-compress/tests/reference"
mkdir -p "$out"
"$hashes" "$work/f16.gguf" | sort > "$out/input-f16.txt"
calib="$root/data/quickstart/moby-dick-003.txt"
"$LLAMA_IMATRIX" -m "$work/f16.gguf" -f "$calib" -o "$out/imatrix.gguf" --chunks 8 -c 512 -b 512 -t "$(nproc)" >"$work/imatrix.log" 2>&1
for t in q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k; do
  "$LLAMA_QUANTIZE" "$work/f16.gguf" "$work/$t.gguf" "$t" 2 >"$work/$t.log" 2>&1
  "$hashes" "$work/$t.gguf" | sort > "$out/$t.txt"
done
for t in q4_0 q5_1 q2_k q3_k_m q4_k_m q5_k_m q6_k; do
  "$LLAMA_QUANTIZE" --imatrix "$out/imatrix.gguf" "$work/f16.gguf" "$work/$t-imatrix.gguf" "$t" 2 >"$work/$t-imatrix.log" 2>&1
  "$hashes" "$work/$t-imatrix.gguf" | sort > "$out/$t-imatrix.txt"
done
{
  echo "Tensor data hashes (name type sha256, sorted) of llama-quantize's outputs from input-f16.txt's file"
  echo "(TYPE-imatrix.txt: with imatrix.gguf, llama-imatrix's over the first 8 windows of 512 tokens of data/quickstart/moby-dick-003.txt),"
  echo "made by bench/quantize-reference.sh with llama.cpp from llama-cpp-python 0.3.36's sdist"
  echo "(vendor/llama.cpp, built with GGML_NATIVE=ON). The reference quantizers do not depend on the CPU."
} > "$out/README"
echo "wrote $out"
