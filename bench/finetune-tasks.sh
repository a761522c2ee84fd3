#!/usr/bin/env bash
# Fine-tunes SmolLM2-135M-Instruct (the Q4_1 asset, exported to an f32 Hugging Face folder) to
# two tasks with classifier heads, full fine-tuning on this machine's cores, and evaluates
# each on data training never sees:
#   sentiment: a sequence-classification head on the fetched sentiment sentences (UCI's 3,000
#     review sentences, and the first 3,000 positive and 3,000 negative tweets in file order;
#     neutral tweets are left out, as SST-2 has two classes), scored on SST-2 validation (872
#     movie-review sentences, ../shared/fixtures/evals/sst2.jsonl: evaluation only), beside
#     the base model's zero-shot `--task classify` score on the same file;
#   WNUT-16: a token-classification head on four fifths of the fetched WNUT-16 tweets (every
#     fifth row held out, in file order), each tweet read twice (echo), entity F1 per type on
#     the held-out fifth.
# Prints each run's wall time and peak RSS (GNU time) and the scores; leaves everything in OUT.
#
#   bench/finetune-tasks.sh [OUT] [EPOCHS_SENTIMENT] [EPOCHS_WNUT]   # default: runs/finetune 2 3
# LORA=1 adds a LoRA run of the sentiment task (r 16, alpha 32, all seven projections) over
# the Q4_1 GGUF itself, its projections kept in their blocks.
# TASKS picks the runs (default "sentiment wnut", plus "lora" with LORA=1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-runs/finetune}"; ep_s="${2:-2}"; ep_w="${3:-3}"
assets="${SLM_ASSETS:-$HOME/.cache/slm/assets}"
evals="${SLM_EVALS:-$root/../shared/fixtures/evals}"
SLM="${SLM:-$root/target/release/slm}"
[ -x "$SLM" ] || (cd "$root" && cargo build --release -p slm-cli)
gguf="$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$assets/tasks/sentiment/uci.jsonl" ] || bash "$root/../shared/fetch-assets.sh" tasks
mkdir -p "$out"; out="$(cd "$out" && pwd)"
[ -d "$out/base" ] || "$SLM" export "$gguf" --format hf -o "$out/base"

# Two-way sentiment: UCI's sentences and a balanced share of the tweets.
{ cat "$assets/tasks/sentiment/uci.jsonl"
  awk '/"label": "positive"/ && n++ < 3000' "$assets/tasks/sentiment/tweets.jsonl"
  awk '/"label": "negative"/ && n++ < 3000' "$assets/tasks/sentiment/tweets.jsonl"
} > "$out/sentiment_train.jsonl"
# The held-out fifth of WNUT-16.
awk 'NR % 5 != 0' "$assets/tasks/ner/wnut16.jsonl" > "$out/wnut_train.jsonl"
awk 'NR % 5 == 0' "$assets/tasks/ner/wnut16.jsonl" > "$out/wnut_test.jsonl"

recipe() { # name kind train epochs
  cat > "$out/$1.toml" <<EOF

[run]
out = "$1"
[data]
train = "$3"
valid_fraction = 0.05
[model]
parent = "base"
context = 64
[objective]
kind = "$2"
[budget]
epochs = $4
[optim]
batch = 16
lr = 3e-5
warmup = 10
weight_decay = 0.0
[eval]
interval = 100
[checkpoint]
interval = 0
EOF
}
timed() { # name: runs slm train on OUT/name.toml, prints wall time and peak RSS
  rm -rf "$out/$1"
  /usr/bin/time -f "$1: %e s wall, peak RSS %M KB" "$SLM" train "$out/$1.toml" 2>&1 | grep -v '^\s*$' | tail -2
}
recipe sentiment classify "$out/sentiment_train.jsonl" "$ep_s"
recipe sentiment_lora classify "$out/sentiment_train.jsonl" "$ep_s"
recipe wnut tag "$out/wnut_train.jsonl" "$ep_w"
# The tagger reads each tweet twice (echo; rows up to 128 tokens) at lr 1e-4.
sed -i 's/^lr = 3e-5/lr = 1e-4/; s/^context = 64/context = 128/; s/^kind = "tag"/kind = "tag"\necho = true/' "$out/wnut.toml"
tasks="${TASKS:-sentiment wnut$([ "${LORA:-0}" = 1 ] && echo ' lora')}"
has() { [[ " $tasks " == *" $1 "* ]]; }
if has sentiment; then
  timed sentiment
  "$SLM" eval "$out/sentiment/model" --task "classify:$evals/sst2.jsonl" --out "$out/sst2_finetuned.json"
  "$SLM" eval "$gguf" --task "classify:$evals/sst2.jsonl" --out "$out/sst2_zero_shot.json"
fi
if has wnut; then
  timed wnut
  "$SLM" eval "$out/wnut/model" --task "tag:$out/wnut_test.jsonl" --out "$out/wnut_test.json"
fi
if has lora; then
  sed -i "s/^lr = 3e-5/lr = 3e-4/; s#^parent = \"base\"#parent = \"$gguf\"#" "$out/sentiment_lora.toml"
  printf '[lora]\nr = 16\nalpha = 32\ntargets = ["q", "k", "v", "o", "gate", "up", "down"]\n' >> "$out/sentiment_lora.toml"
  timed sentiment_lora
  rm -rf "$out/sentiment_lora_merged"
  "$SLM" lora merge "$gguf" "$out/sentiment_lora/adapter" -o "$out/sentiment_lora_merged"
  "$SLM" eval "$out/sentiment_lora_merged" --task "classify:$evals/sst2.jsonl" --out "$out/sst2_lora.json"
fi
