#!/usr/bin/env bash
# Serving throughput of `slm serve` beside llama.cpp's llama-server on one GGUF, both with the
# same threads and as many parallel slots as concurrent streams, measured alternately (slm,
# llama-server, slm, ...): aggregate generated tokens/s at each stream count (every stream
# sends REQUESTS greedy completions of 128 tokens with ignore_eos, one after another) and the
# median time to first token. Prints one JSON line per run and the median ratio per count.
#
#   bench/compare-serve.sh MODEL.gguf [THREADS] [ROUNDS] [STREAMS...]   # default: 2 3 1 4 16
#
# llama-server is built outside the repository from the PyPI sdist of llama-cpp-python (as
# bench/compare-llamacpp.sh builds llama-bench): set LLAMA_SERVER, or build it with
#   cmake --build build --target llama-server   (in $SLM_PEERS/llama_cpp_python-0.3.36/vendor/llama.cpp)
set -euo pipefail
model="$1"; threads="${2:-2}"; rounds="${3:-3}"; shift $(( $# < 3 ? $# : 3 ))
counts=("${@:-1 4 16}"); [ $# -eq 0 ] && counts=(1 4 16)
root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
LLAMA_SERVER="${LLAMA_SERVER:-$peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server}"
[ -x "$LLAMA_SERVER" ] || { echo "no llama-server at $LLAMA_SERVER (see the comment above)" >&2; exit 1; }
SLM="${SLM:-$root/target/release/slm}"
[ -x "$SLM" ] || (cd "$root" && cargo build --release -p slm-cli)
port=18931
out="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

wait_ready() {
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not become ready" >&2; return 1
}

run() { # engine streams
  local engine="$1" s="$2"
  if [ "$engine" = slm ]; then
    "$SLM" serve "$model" --port "$port" --threads "$threads" --parallel "$s" --ctx 1024 2>/dev/null &
  else
    "$LLAMA_SERVER" -m "$model" --port "$port" -t "$threads" -tb "$threads" -np "$s" \
      -c $((s * 1024)) --no-webui >/dev/null 2>&1 &
  fi
  local pid=$!
  wait_ready
  # One untimed request warms both up alike (page cache, first allocations).
  python3 "$root/bench/serve_load.py" throughput "http://127.0.0.1:$port" --streams 1 --requests 1 --max-tokens 8 >/dev/null
  python3 "$root/bench/serve_load.py" throughput "http://127.0.0.1:$port" --streams "$s" --requests "${REQUESTS:-2}" --max-tokens 128 \
    | sed "s/^{/{\"engine\": \"$engine\", /" | tee -a "$out/runs.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for r in $(seq "$rounds"); do
  for s in "${counts[@]}"; do
    run slm "$s"
    run llama-server "$s"
  done
done
python3 - "$out/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for s in sorted({r["streams"] for r in runs}):
    med = lambda e, k: statistics.median(r[k] for r in runs if r["engine"] == e and r["streams"] == s)
    a, b = med("slm", "tokens_per_second"), med("llama-server", "tokens_per_second")
    ta, tb = med("slm", "ttft_median_s"), med("llama-server", "ttft_median_s")
    print(f"streams {s:2d}: slm {a:7.1f} tok/s, llama-server {b:7.1f} tok/s, ratio {a/b:.2f}x; "
          f"time to first token slm {ta*1000:.0f} ms, llama-server {tb*1000:.0f} ms ({tb/ta:.2f}x faster)")
PY
