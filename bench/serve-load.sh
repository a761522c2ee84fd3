#!/usr/bin/env bash
# Load on loopback: `slm serve` with 64 concurrent streaming clients for a few minutes, every
# fifth disconnecting mid-stream (bench/serve_load.py load). Checks no errors, [DONE] on every
# finished stream, bounded RSS, and that the server stops generating for clients that left.
#
#   bench/serve-load.sh MODEL.gguf [CLIENTS] [SECONDS] [PARALLEL]    # default: 64 180 16
set -euo pipefail
model="$1"; clients="${2:-64}"; seconds="${3:-180}"; parallel="${4:-16}"
root="$(cd "$(dirname "$0")/.." && pwd)"
SLM="${SLM:-$root/target/release/slm}"
[ -x "$SLM" ] || (cd "$root" && cargo build --release -p slm-cli)
port=18932
"$SLM" serve "$model" --port "$port" --parallel "$parallel" --metrics 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
python3 "$root/bench/serve_load.py" load "http://127.0.0.1:$port" --clients "$clients" \
  --seconds "$seconds" --pid "$pid" --max-rss-mb 1024
