#!/usr/bin/env bash
# A model whose every matrix is a K-quant, for speed comparisons: SmolLM2's widths (576, 1536)
# are not multiples of 256, so its Q4_K_M keeps Q5_0/Q8_0 fallbacks everywhere but ffn_down.
# This is a Llama of SmolLM2's tokenizer and vocabulary with width 768, FFN 2048, 12 layers,
# 12 heads (4 KV), randomly initialised by transformers (seed 0; 113M parameters), written as
# an F16 GGUF by `slm export` and quantized by `slm quantize` (whose bytes are
# llama-quantize's).
#
#   bench/make-kquant-model.sh OUTDIR [TYPE...]      # default TYPE: q4_k_m
#
# Then e.g. bench/compare-llamacpp.sh OUTDIR/m768.q4_k_m.gguf "1 2" 3.
set -euo pipefail
out="$1"; shift
types=("$@")
[ "${#types[@]}" -gt 0 ] || types=(q4_k_m)
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${SLM_PYTHON:-$HOME/.cache/slm/pyenv/bin/python}"
asset="$HOME/.cache/slm/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$root" && cargo build --release -q -p slm-cli)
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# SmolLM2's tokenizer files, by way of an F16 folder of the asset.
"$slm" quantize "$asset" --allow-requantize --type f16 -o "$work/f16.gguf" >/dev/null
"$slm" export "$work/f16.gguf" --format hf --type f16 -o "$work/hf" >/dev/null
mkdir "$work/m768"
cp "$work/hf/tokenizer.json" "$work/hf/tokenizer_config.json" "$work/hf/generation_config.json" "$work/m768/"
"$py" - "$work/hf/config.json" "$work/m768" <<'PY'
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
c = json.load(open(sys.argv[1]))
c.update(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
         num_attention_heads=12, num_key_value_heads=4, head_dim=64)
cfg = LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(sys.argv[2], safe_serialization=True)
PY
"$slm" export "$work/m768" --format gguf --type f16 -o "$out/m768.f16.gguf" >/dev/null
for t in "${types[@]}"; do
  "$slm" quantize "$out/m768.f16.gguf" --type "$t" -o "$out/m768.$t.gguf" >/dev/null
  echo "$out/m768.$t.gguf"
done
