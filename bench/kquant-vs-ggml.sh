#!/usr/bin/env bash
# slm's K-quant matmul against libggml's on the same bytes, bit for bit: for each K-quant type,
# SmolLM2's first down projection (576 x 1536) as llama-quantize --pure writes it, times random
# activations of 1, 4, 5, 8, 16, 37, 77 and 130 rows, through ggml's CPU backend (its repacked buffer for
# Q4_K and Q2_K, as llama.cpp loads a model; also 575 rows, which it does not repack) and
# through `slm_kernels::kquant::KMatrix` (examples/kmatmul.rs). Prints, per case, how many of the
# output rows are equal in every bit.
#
#   bench/kquant-vs-ggml.sh [F16.gguf]
#
# F16.gguf: SmolLM2-135M-Instruct in F16 (default: made from the Q4_1 asset by slm quantize).
# llama.cpp is the peer build of bench/compare-llamacpp.sh ($SLM_PEERS); its library is linked
# by a small harness compiled here, outside the repository. GGML_LIB names another build's
# library folder: an AVX2-only build (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
# -DGGML_F16C=ON) with SLM_GGML_FLAVOR=avx2 checks slm's reproduction of that build, and
# SLM_KERNELS=avx2 runs slm's AVX2 kernels on an AVX-512 CPU. An AVX2 build does not repack
# Q2_K: give it Q2K_REPACKED=0.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
peers="${SLM_PEERS:-$HOME/.cache/slm/peers}"
llama="$peers/llama_cpp_python-0.3.36/vendor/llama.cpp"
[ -x "$llama/build/bin/llama-quantize" ] || { echo "needs the llama.cpp peer build (bench/compare-llamacpp.sh builds it)"; exit 1; }
py="${SLM_PYTHON:-python3}"
work="$(mktemp -d)"
(cd "$root" && cargo build --release -q -p slm-cli && cargo build --release -q -p slm-kernels --example kmatmul)
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
kmatmul="${CARGO_TARGET_DIR:-$root/target}/release/examples/kmatmul"
f16="${1:-}"
if [ -z "$f16" ]; then
  f16="$work/f16.gguf"
  "$slm" quantize "$HOME/.cache/slm/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf" --allow-requantize --type f16 -o "$f16" >/dev/null
fi
cat > "$work/mm.cpp" <<'CPP'
// mm TYPE N K M weights.bin x.bin out.bin REPACK: y = x W^T through ggml's CPU backend.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
ggml_backend_buffer_type_t ggml_backend_cpu_repack_buffer_type(void);
static std::vector<char> slurp(const char *p) {
    FILE *f = fopen(p, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    std::vector<char> v(n); if (fread(v.data(), 1, n, f) != (size_t) n) exit(1); fclose(f); return v;
}
int main(int, char **argv) {
    int type = atoi(argv[1]); long N = atol(argv[2]), K = atol(argv[3]), M = atol(argv[4]);
    auto w = slurp(argv[5]); auto x = slurp(argv[6]); int repack = atoi(argv[8]);
    ggml_init_params ip = { 16 * 1024 * 1024, nullptr, true };
    ggml_context *cw = ggml_init(ip), *cx = ggml_init(ip);
    ggml_tensor *W = ggml_new_tensor_2d(cw, (ggml_type) type, K, N);
    ggml_tensor *X = ggml_new_tensor_2d(cx, GGML_TYPE_F32, K, M);
    ggml_tensor *Y = ggml_mul_mat(cx, W, X);
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, 2);
    ggml_backend_alloc_ctx_tensors_from_buft(cw, repack ? ggml_backend_cpu_repack_buffer_type() : ggml_backend_cpu_buffer_type());
    ggml_backend_tensor_set(W, w.data(), 0, w.size());
    ggml_cgraph *g = ggml_new_graph(cx); ggml_build_forward_expand(g, Y);
    ggml_backend_alloc_ctx_tensors(cx, be);
    ggml_backend_tensor_set(X, x.data(), 0, x.size());
    ggml_backend_graph_compute(be, g);
    std::vector<float> y(N * M); ggml_backend_tensor_get(Y, y.data(), 0, y.size() * 4);
    FILE *f = fopen(argv[7], "wb"); fwrite(y.data(), 4, y.size(), f); fclose(f);
    return 0;
}
CPP
lib="${GGML_LIB:-$llama/build/bin}"
g++ -O2 -std=c++17 -o "$work/mm" "$work/mm.cpp" -I"$llama/ggml/include" -L"$lib" \
  -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$lib"
export LD_LIBRARY_PATH="$lib"
# type name, ggml id, repacked by llama.cpp on this CPU
for spec in "Q2_K 10 1" "Q3_K 11 0" "Q4_K 12 1" "Q5_K 13 0" "Q6_K 14 0"; do
  set -- $spec
  "$llama/build/bin/llama-quantize" --pure "$f16" "$work/$1.gguf" "$1" >/dev/null 2>&1
done
PYTHONPATH="$llama/gguf-py" "$py" - "$work" <<'PY'
import sys, gguf, numpy as np
work = sys.argv[1]
for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
    r = gguf.GGUFReader(f"{work}/{t}.gguf")
    b = [x for x in r.tensors if x.name == "blk.0.ffn_down.weight"][0].data.tobytes()
    open(f"{work}/{t}.bin", "wb").write(b)
    open(f"{work}/{t}_575.bin", "wb").write(b[: len(b) // 576 * 575])
rng = np.random.default_rng(0)
for m in [1, 4, 5, 8, 16, 37, 77, 130]:
    (rng.standard_normal((m, 1536)).astype(np.float32) * np.float32(0.5)).tofile(f"{work}/x{m}.bin")
PY
echo "| type | rows | batch | rows equal to libggml's, bit for bit |"
echo "|---|---|---|---|"
for spec in "Q2_K 10 ${Q2K_REPACKED:-1} 576" "Q3_K 11 0 576" "Q4_K 12 1 576" "Q5_K 13 0 576" "Q6_K 14 0 576" "Q4_K 12 0 575" "Q2_K 10 0 575"; do
  set -- $spec
  suffix=""; [ "$4" = 575 ] && suffix=_575
  lower="$(echo "$1" | tr 'A-Z' 'a-z')"
  for m in 1 4 5 8 16 37 77 130; do
    "$work/mm" "$2" "$4" 1536 "$m" "$work/$1$suffix.bin" "$work/x$m.bin" "$work/ggml.bin" "$3" 2>/dev/null
    "$kmatmul" "$lower" "$4" 1536 "$m" "$work/$1$suffix.bin" "$work/x$m.bin" "$work/slm.bin"
    eq="$("$py" -c "
import numpy as np
a = np.fromfile('$work/slm.bin', np.uint32).reshape($m, -1); b = np.fromfile('$work/ggml.bin', np.uint32).reshape($m, -1)
print(int((a == b).all(axis=1).sum()))")"
    echo "| $1 | $4 | $m | $eq of $m |"
  done
done
rm -rf "$work"
