// Dumps llama.cpp logits for bench/compare-numerics.py (our code, built against a llama.cpp
// build outside the repository):
//   L=path/to/llama.cpp; gcc -O2 bench/llama_dump_logits.c -I$L/include -I$L/ggml/include \
//     -L$L/build/bin -lllama -lggml -lggml-base -lm -Wl,-rpath,$L/build/bin -o llama-dump-logits
// Usage: llama-dump-logits MODEL N_GREEDY ID...   (writes logits.bin; NOFA=1 disables flash attention)
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
int main(int argc, char **argv) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *m = llama_model_load_from_file(argv[1], mp);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_threads = 2; cp.n_threads_batch = 2; cp.n_batch = 512; if (getenv("NOFA")) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *c = llama_init_from_model(m, cp);
    int n = argc - 3; int ngen = atoi(argv[2]);
    llama_token *ids = malloc(sizeof(llama_token) * n);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[i + 3]);
    llama_decode(c, llama_batch_get_one(ids, n));
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(m));
    float *l = llama_get_logits_ith(c, -1);
    // print all logits to file
    FILE *f = fopen("logits.bin", "wb"); fwrite(l, 4, nv, f); fclose(f);
    printf("greedy:");
    for (int g = 0; g < ngen; g++) {
        float *lg = llama_get_logits_ith(c, -1);
        int best = 0; for (int i = 1; i < nv; i++) if (lg[i] > lg[best]) best = i;
        printf(" %d", best); fflush(stdout);
        llama_token t = best;
        llama_decode(c, llama_batch_get_one(&t, 1));
    }
    printf("\n");
    return 0;
}
