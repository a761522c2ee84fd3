#!/usr/bin/env bash
# Distillation against training from scratch, same student, same tokens: a 28M-parameter
# student with SmolLM2's tokenizer (d_model 384, 6 layers, 6 heads, 2 kv heads, ffn 1024,
# tied, context 256), trained on Moby-Dick and every fourth State of the Union address (the
# fetched corpora; about 785k training tokens), once with the next-token cross-entropy and
# once distilled from SmolLM2-135M-Instruct Q4_1 (forward KL at T = 1, its top 64 from
# `slm distill cache`, alpha 1). Both runs read the same cache and draw the same windows
# (the cross-entropy run is `kind = "kd"` with alpha 0: the distillation term weighs
# nothing), so they differ in their loss alone. Then perplexity on held-out text of another
# source (Pride and Prejudice, ../shared/fixtures/reference/eval.txt) for both students and
# the teacher. Prints wall times and peak RSS (GNU time).
#
#   bench/distill.sh [OUT] [TOKENS]       # default: runs/distill 600064
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-runs/distill}"; tokens="${2:-600064}"
assets="${SLM_ASSETS:-$HOME/.cache/slm/assets}"
heldout="${HELDOUT:-$root/../shared/fixtures/reference/eval.txt}"
SLM="${SLM:-$root/target/release/slm}"
[ -x "$SLM" ] || (cd "$root" && cargo build --release -p slm-cli)
teacher="$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$assets/corpora/moby-dick.txt" ] || bash "$root/../shared/fetch-assets.sh" corpora
mkdir -p "$out"; out="$(cd "$out" && pwd)"; cd "$out"
[ -f tok.json ] || { "$SLM" export "$teacher" --format hf -o teacher_hf >/dev/null; cp teacher_hf/tokenizer.json tok.json; }
if [ ! -d shards ]; then
  mkdir -p corpus
  cp "$assets/corpora/moby-dick.txt" corpus/
  ls "$assets/corpora/sotu" | sed -n '1~4p' | while read -r f; do cp "$assets/corpora/sotu/$f" corpus/; done
  "$SLM" data prepare corpus --tokenizer tok.json -o shards
fi
timed() { /usr/bin/time -f "$1: %e s wall, peak RSS %M KB" "${@:2}"; }
[ -d targets ] || timed cache "$SLM" distill cache "$teacher" --data shards --tokenizer tok.json \
  --top-k 64 --context 256 --batch 16 -o targets
recipe() { # name alpha
  cat > "$1.toml" <<EOF
[run]
out = "$1"
seed = 1
[data]
shards = "shards"
tokenizer = "tok.json"
[model]
d_model = 384
layers = 6
heads = 6
kv_heads = 2
ffn = 1024
context = 256
tied_embeddings = true
[objective]
kind = "kd"
[teacher]
model = "$teacher"
alpha = $2
top_k = 64
cache = "targets"
[budget]
tokens = $tokens
[optim]
batch = 16
lr = 1e-3
warmup = 50
[eval]
interval = 100
batches = 8
[checkpoint]
interval = 100
EOF
}
recipe scratch 0.0
recipe distilled 1.0
for r in scratch distilled; do
  rm -rf "$r"; timed "$r" "$SLM" train "$r.toml" 2>&1 | tail -1
done
for m in scratch/model distilled/model "$teacher"; do
  "$SLM" eval "$m" --task "perplexity:$heldout" --ctx 256 2>&1 | tail -1
done
