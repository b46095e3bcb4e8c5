// Reference driver over llama.cpp's C API (built by scripts/build-llama-cpp.sh): prints what the
// correctness tests compare against. Our own code; it only calls llama.h.
//   llama_golden MODEL tokenize FILE        -> ids of FILE's text (BOS per model, no special parsing)
//   llama_golden MODEL greedy N FILE        -> prompt ids, then N greedy ids
//   llama_golden MODEL argmax < ids         -> argmax of the logits at every position (one window)
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static std::string slurp(const char *path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

static std::vector<llama_token> tokenize(const llama_vocab *v, const std::string &text) {
    int n = -llama_tokenize(v, text.data(), (int)text.size(), nullptr, 0, true, false);
    std::vector<llama_token> out(n);
    llama_tokenize(v, text.data(), (int)text.size(), out.data(), n, true, false);
    return out;
}

static void print_ids(const std::vector<llama_token> &ids) {
    for (size_t i = 0; i < ids.size(); i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: llama_golden MODEL tokenize|greedy|argmax ...\n"); return 2; }
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::string mode = argv[2];
    if (mode == "tokenize") {
        print_ids(tokenize(vocab, slurp(argv[3])));
        return 0;
    }
    std::vector<llama_token> ids;
    int n_gen = 0;
    if (mode == "greedy") {
        n_gen = atoi(argv[3]);
        ids = tokenize(vocab, slurp(argv[4]));
    } else {
        int t;
        while (std::cin >> t) ids.push_back(t);
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + n_gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 2;
    // Flash attention off unless asked: the FA kernel accumulates V in f16, and on SmolLM2 llama.cpp's own
    // FA-on and FA-off argmax agree on only 96.6% of positions; the unfused path is the stabler reference.
    cp.flash_attn_type = getenv("LLAMA_GOLDEN_FA") ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context *ctx = llama_init_from_model(model, cp);
    llama_batch b = llama_batch_init(ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0;
        b.logits[i] = mode == "argmax" || i + 1 == ids.size();
    }
    b.n_tokens = ids.size();
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    if (mode == "argmax") {
        std::vector<llama_token> out;
        for (size_t i = 0; i < ids.size(); i++) out.push_back(argmax(llama_get_logits_ith(ctx, i), n_vocab));
        print_ids(out);
        return 0;
    }
    print_ids(ids);
    std::vector<llama_token> out;
    int pos = ids.size();
    llama_token next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    for (int k = 0; k < n_gen; k++) {
        out.push_back(next);
        llama_batch one = llama_batch_get_one(&next, 1);
        (void)pos;
        if (llama_decode(ctx, one)) { fprintf(stderr, "decode failed\n"); return 1; }
        next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        pos++;
    }
    print_ids(out);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
