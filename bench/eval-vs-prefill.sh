#!/usr/bin/env bash
# Must-show 4 of issue 23: `slm eval`'s tokens/s on a multiple-choice file beside the same
# model's pp512 (`slm bench`), same binary, same threads, alternating (bench, eval, bench,
# eval ...), medians.
#
#   bench/eval-vs-prefill.sh MODEL.gguf TASK.jsonl [THREADS] [ROUNDS]
#
# SLM_BASELINE=path/to/an/older/slm adds that build to every round and its own line.
# A spread sample of HellaSwag (every 25th question) is what the full set costs per token:
#   awk 'NR % 25 == 1' ../shared/fixtures/evals/hellaswag.jsonl > /tmp/hs25.jsonl
set -euo pipefail
model="$1"; task="$2"; threads="${3:-2}"; rounds="${4:-3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$root" && cargo build --release -q -p slm-cli)
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
builds=("slm:$slm")
[ -n "${SLM_BASELINE:-}" ] && builds+=("baseline:$SLM_BASELINE")
for i in $(seq "$rounds"); do
  for b in "${builds[@]}"; do
    name="${b%%:*}"; bin="${b#*:}"
    "$bin" bench "$model" --threads "$threads" --json --reps 1 >> "$out/$name.bench"
    "$bin" eval "$model" --task "choice:$task" --threads "$threads" --out "$out/e.json" >/dev/null
    python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["tasks"][0]; print(t["tokens"], t["seconds"])' \
      "$out/e.json" >> "$out/$name.eval"
  done
done
python3 - "$out" "$model" "$task" "$threads" "${builds[@]}" <<'PY'
import json, statistics, sys
out, model, task, threads, *builds = sys.argv[1:]
print(f"model {model}, task {task}, threads {threads}, medians of alternating rounds")
print("| build | pp512 tok/s | eval tokens | eval s | eval tok/s | eval / pp512 |")
print("|---|---|---|---|---|---|")
for b in builds:
    name = b.split(":", 1)[0]
    pp = statistics.median(json.loads(l)["pp512"] for l in open(f"{out}/{name}.bench"))
    runs = [l.split() for l in open(f"{out}/{name}.eval")]
    tokens = int(runs[0][0])
    secs = statistics.median(float(r[1]) for r in runs)
    print(f"| {name} | {pp:.1f} | {tokens} | {secs:.1f} | {tokens / secs:.1f} | {tokens / secs / pp:.3f} |")
PY
