#!/usr/bin/env bash
# The cost of a distillation update read from a cache against a plain next-token update of
# the same student (bench/distill.sh's: its folder, shards and cache), PAIRS alternating
# pairs of UPDATES updates each; prints each run's median tokens/s over its updates after
# the first 4 (buffers warming up), and their ratio.
#
#   bench/distill-speed.sh [OUT] [PAIRS] [UPDATES]   # default: runs/distill 3 20
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(cd "${1:-runs/distill}" && pwd)"; pairs="${2:-3}"; updates="${3:-20}"
SLM="${SLM:-$root/target/release/slm}"
cd "$out"
[ -f distilled.toml ] && [ -d targets ] || { echo "run bench/distill.sh $out first" >&2; exit 1; }
tokens=$((updates * 16 * 256))
sed "s/^out = .*/out = \"speed_kd\"/; s/^tokens = .*/tokens = $tokens/; s/^interval = 100/interval = 0/" distilled.toml > speed_kd.toml
# The plain run: the same student without [objective] and [teacher].
awk '/^\[objective\]/{skip=1} /^\[budget\]/{skip=0} !skip' speed_kd.toml | sed 's/^out = .*/out = "speed_ce"/' > speed_ce.toml
median() { python3 -c "
import json, statistics, sys
r = [json.loads(l)['tokens_per_s'] for l in open(sys.argv[1])][4:]
print(round(statistics.median(r), 1))" "$1/metrics.jsonl"; }
for p in $(seq "$pairs"); do
  for r in speed_ce speed_kd; do
    rm -rf "$r"; "$SLM" train "$r.toml" >/dev/null 2>&1
    echo "pair $p $r $(median "$r") tok/s"
  done
done | tee speed.log
python3 - <<'PY'
import statistics
rows = [l.split() for l in open("speed.log")]
ce = statistics.median(float(r[3]) for r in rows if r[2] == "speed_ce")
kd = statistics.median(float(r[3]) for r in rows if r[2] == "speed_kd")
print(f"plain {ce} tok/s, distilled from the cache {kd} tok/s: a distilled update costs {ce / kd:.3f}x")
PY
