#!/usr/bin/env bash
# Runs `slm bench` and llama.cpp's llama-bench on the same GGUF with the same threads, alternating
# (A B A B ...), and prints the median ratio slm/llama.cpp for pp128, pp512 and tg128, and both
# engines' peak RSS (GNU time's maximum resident set of each run).
#
#   bench/compare-llamacpp.sh MODEL.gguf [THREADS] [PAIRS]     # THREADS may be a list: "1 2"
#
# SLM_BASELINE=path/to/an/older/slm adds that build to every round (A B C A B C ...) and a
# column comparing the two slm builds: a change's cost or gain, measured beside the peer.
#
# llama.cpp is built outside the repository (never committed): set LLAMA_BENCH to its
# llama-bench binary, or let this script build it from the PyPI sdist of llama-cpp-python into
# $SLM_PEERS (default ~/.cache/slm/peers; ~11 minutes on 2 cores).
set -euo pipefail
model="$1"; threads="${2:-2}"; pairs="${3:-5}"
root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
if [ -z "${LLAMA_BENCH:-}" ]; then
  LLAMA_BENCH="$peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench"
  if [ ! -x "$LLAMA_BENCH" ]; then
    mkdir -p "$peers"; cd "$peers"
    python3 -m pip install -q scikit-build-core cmake ninja
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d .
    tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build --target llama-bench -j"$(nproc)"
    cd "$root"
  fi
fi
(cd "$root" && cargo build --release -q -p slm-cli)
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
for t in $threads; do
out="$(mktemp -d)"
for i in $(seq "$pairs"); do
  "$slm" bench "$model" --threads "$t" --json --reps 1 >> "$out/slm.jsonl"
  if [ -n "${SLM_BASELINE:-}" ]; then
    "$SLM_BASELINE" bench "$model" --threads "$t" --json --reps 1 >> "$out/base.jsonl"
  fi
  /usr/bin/time -f '%M' -a -o "$out/llama.rss" \
    "$LLAMA_BENCH" -m "$model" -t "$t" -p 128,512 -n 128 -r 1 -o jsonl 2>/dev/null >> "$out/llama.jsonl"
done
python3 - "$out" "$model" "$t" <<'PY'
import json, os, statistics, sys
out, model, threads = sys.argv[1:]
slm = [json.loads(l) for l in open(f"{out}/slm.jsonl")]
base = [json.loads(l) for l in open(f"{out}/base.jsonl")] if os.path.exists(f"{out}/base.jsonl") else []
llama_rss = [int(l) / 1024 for l in open(f"{out}/llama.rss") if l.strip().isdigit()]
ll = {}
for l in open(f"{out}/llama.jsonl"):
    r = json.loads(l)
    key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    ll.setdefault(key, []).append(r["avg_ts"])
print(f"model {model}, threads {threads}, {len(slm)} alternating pairs, medians")
med = lambda rs, k: statistics.median(r[k] for r in rs)
extra = " baseline slm | slm/baseline |" if base else ""
print("| test | slm tok/s | llama.cpp tok/s | slm/llama.cpp |" + extra)
print("|---|---|---|---|" + ("---|---|" if base else ""))
for k in ("pp128", "pp512", "tg128"):
    a = med(slm, k); b = statistics.median(ll[k])
    row = f"| {k} | {a:.1f} | {b:.1f} | {a/b:.2f}x |"
    if base:
        c = med(base, k); row += f" {c:.1f} | {a/c:.3f}x |"
    print(row)
a = med(slm, "peak_rss_mb"); b = statistics.median(llama_rss)
row = f"| peak RSS | {a:.0f} MB | {b:.0f} MB | {a/b:.2f}x |"
if base:
    c = med(base, "peak_rss_mb"); row += f" {c:.0f} MB | {a/c:.3f}x |"
print(row)
PY
done
