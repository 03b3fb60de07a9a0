/*
 * fuzz_layer.c — libFuzzer target for the layer's and the balancer's load paths on
 * top of the safetensors reader: any input that opens must either give a layer
 * config (dsmoe_moe_config_from_safetensors), a layer that loads and runs a forward
 * pass on two tokens, and a balancer state that reads back — or fail with a status
 * and a message, leaving the layer's tensors untouched; a file that loads loads into
 * the packed weight layout too and routes the same. The one-call load
 * (dsmoe_moe_load_from) checks every tensor before it allocates: a layer it returns is
 * never larger than the file, and routes with the config dsmoe saved in it, if any.
 * Tensor names are tried bare and under the prefix the file's first gate weight
 * suggests.
 */
#include "dsmoe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

volatile float fuzz_sink;

/* Failure must come with a message. */
static void check_failure(dsmoe_status s) {
    if (s != DSMOE_OK && !dsmoe_last_error()[0]) abort();
}

/* The prefix of "<prefix>gate.weight" for the file's first such tensor, or "". */
static void find_prefix(const dsmoe_safetensors *st, char *buf, size_t size) {
    buf[0] = '\0';
    for (int64_t i = 0; i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view v;
        if (dsmoe_safetensors_at(st, i, &v) != DSMOE_OK) abort();
        size_t n = strlen(v.name), k = strlen("gate.weight");
        if (n >= k && strcmp(v.name + n - k, "gate.weight") == 0 && n - k < size) {
            memcpy(buf, v.name, n - k);
            buf[n - k] = '\0';
            return;
        }
    }
}

static void try_layer(const dsmoe_safetensors *st, const char *prefix) {
    dsmoe_moe_config cfg;
    dsmoe_moe_config_default(&cfg);
    cfg.n_shared = -1; /* from the shared experts' shape, if present */
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_moe_config_from_safetensors(&cfg, st, prefix);
    check_failure(s);
    if (s != DSMOE_OK) return;
    /* a router the inferred sizes always admit: one group, top-1 or top-2 */
    const int32_t E = cfg.router.n_experts;
    cfg.router.n_groups = 1;
    cfg.router.topk_groups = 1;
    cfg.router.top_k = E >= 2 ? 2 : 1;
    cfg.router.group_score = DSMOE_GROUP_SCORE_MAX;
    char name[600];
    dsmoe_tensor_view bv;
    snprintf(name, sizeof name, "%sgate.e_score_correction_bias", prefix);
    cfg.router.use_bias = dsmoe_safetensors_get(st, name, &bv) == DSMOE_OK;
    cfg.max_tokens = 2;
    cfg.n_threads = 1;
    /* the file holds the gate and expert 0, so the sizes are small, but E copies of an
     * expert are allocated: keep the layer under 64 MiB */
    if ((double)E * (3.0 * cfg.expert_size + 1) * cfg.hidden_size > 16.0 * 1024 * 1024) return;
    dsmoe_moe *m = NULL;
    s = dsmoe_moe_create(&cfg, &m);
    check_failure(s);
    if (s != DSMOE_OK) return;
    size_t np = 0;
    float *p = dsmoe_moe_params(m, &np);
    float first = np ? p[0] : 0.0f;
    dsmoe_clear_error();
    s = dsmoe_moe_load_safetensors(m, st, prefix);
    check_failure(s);
    if (s != DSMOE_OK) {
        /* nothing written on failure (the layer starts zeroed) */
        if (np && memcmp(&first, &p[0], sizeof first) != 0) abort();
    } else {
        const size_t D = (size_t)cfg.hidden_size;
        float *x = (float *)calloc(2 * D, sizeof(float)), *y = (float *)malloc(2 * D * sizeof(float));
        if (!x || !y) abort();
        for (size_t i = 0; i < 2 * D; i++) x[i] = (float)((int)(i % 7) - 3) * 0.25f;
        s = dsmoe_moe_forward(m, y, x, 2, 1);
        check_failure(s);
        if (s == DSMOE_OK) fuzz_sink = y[0] + y[2 * D - 1];
        /* the same file into the packed layout: it loads too, and routes the same way
         * (the gate weight is not packed) */
        dsmoe_moe_config pc = cfg;
        pc.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
        dsmoe_moe *mp = NULL;
        if (dsmoe_moe_create(&pc, &mp) != DSMOE_OK) abort();
        if (dsmoe_moe_load_safetensors(mp, st, prefix) != DSMOE_OK) abort();
        dsmoe_status sp = dsmoe_moe_forward(mp, y, x, 2, 1);
        if ((sp == DSMOE_OK) != (s == DSMOE_OK)) abort();
        if (sp == DSMOE_OK) {
            const dsmoe_moe_routing *a = dsmoe_moe_last_routing(m), *b = dsmoe_moe_last_routing(mp);
            if (memcmp(a->indices, b->indices, 2 * (size_t)cfg.router.top_k * sizeof(int32_t)) != 0)
                abort();
            fuzz_sink = y[0] + y[2 * D - 1];
        }
        dsmoe_moe_free(mp);
        free(x);
        free(y);
    }
    dsmoe_moe_free(m);
}

/* The one-call load: every tensor is checked before the layer is allocated, so a layer
 * that loads is no larger than the file (each of its elements has at least 2 bytes
 * there, each tensor a header entry longer than its padding); a config dsmoe saved
 * with the layer is the one it routes with. */
static void try_load(const dsmoe_safetensors *st, const char *prefix, size_t file_size) {
    dsmoe_moe_config opts;
    dsmoe_moe_config_default(&opts);
    opts.n_shared = -1;
    opts.router.n_groups = 1;
    opts.router.topk_groups = 1;
    opts.router.top_k = 1;
    opts.router.group_score = DSMOE_GROUP_SCORE_MAX;
    opts.router.use_bias = 0;
    opts.max_tokens = 2;
    opts.n_threads = 1;
    dsmoe_moe *m = (dsmoe_moe *)(uintptr_t)1;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_moe_load_from(st, prefix, &opts, &m);
    check_failure(s);
    if (s != DSMOE_OK) {
        if (m != NULL) abort();
        return;
    }
    const dsmoe_moe_config *c = dsmoe_moe_get_config(m);
    if (dsmoe_moe_param_count(c) > file_size + 64) abort();
    dsmoe_moe_config saved;
    if (dsmoe_moe_saved_config(st, prefix, &saved) == DSMOE_OK &&
        memcmp(&saved.router, &c->router, sizeof saved.router) != 0)
        abort();
    const size_t D = (size_t)c->hidden_size;
    float *x = (float *)calloc(2 * D, sizeof(float)), *y = (float *)malloc(2 * D * sizeof(float));
    if (!x || !y) abort();
    for (size_t i = 0; i < 2 * D; i++) x[i] = (float)((int)(i % 5) - 2) * 0.5f;
    s = dsmoe_moe_forward(m, y, x, 2, 1);
    check_failure(s);
    if (s == DSMOE_OK) fuzz_sink = y[0] + y[2 * D - 1];
    free(x);
    free(y);
    dsmoe_moe_free(m);
}

static void try_balancer(const dsmoe_safetensors *st, const char *prefix) {
    char name[600];
    snprintf(name, sizeof name, "%sgate.", prefix);
    dsmoe_balancer *b = (dsmoe_balancer *)(uintptr_t)1;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_balancer_read(st, name, &b);
    check_failure(s);
    if (s != DSMOE_OK) {
        if (b != NULL) abort();
        return;
    }
    const float *bias = dsmoe_balancer_bias(b);
    if (!bias) abort();
    fuzz_sink = bias[0];
    dsmoe_balancer_free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dsmoe_safetensors *st = NULL;
    if (dsmoe_safetensors_open_memory(data, size, &st) != DSMOE_OK) return 0;
    char prefix[512];
    find_prefix(st, prefix, sizeof prefix);
    try_layer(st, "");
    if (prefix[0]) try_layer(st, prefix);
    try_load(st, prefix, size);
    try_balancer(st, prefix);
    dsmoe_safetensors_close(st);
    return 0;
}
