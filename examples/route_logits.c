/* route_logits.c — the smallest complete use of the dsmoe router: route a few tokens
 * of random logits with the DeepSeek-V3 preset and print each token's experts. */
#include <dsmoe.h>

#include <stdio.h>
#include <stdlib.h>

int main(void) {
    dsmoe_router_config cfg;
    if (dsmoe_router_preset("deepseek-v3", &cfg) != DSMOE_OK) return 1;
    enum { T = 4 };
    const int E = cfg.n_experts, K = cfg.top_k;
    float *logits = malloc(sizeof(float) * T * E), *bias = calloc((size_t)E, sizeof(float));
    float *weights = malloc(sizeof(float) * T * K);
    int32_t *indices = malloc(sizeof(int32_t) * T * K);
    unsigned seed = 1;
    for (int i = 0; i < T * E; i++) {
        seed = seed * 1664525u + 1013904223u;
        logits[i] = (float)(seed >> 8) / (float)(1u << 24) * 4.0f - 2.0f;
    }
    size_t ws_size = dsmoe_router_workspace_size(&cfg, T, 0, DSMOE_DTYPE_F32, 1);
    void *ws = dsmoe_malloc(ws_size);
    dsmoe_router_output out = {.indices = indices, .weights = weights};
    dsmoe_status st = dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 1);
    if (st != DSMOE_OK) {
        fprintf(stderr, "routing failed: %s: %s\n", dsmoe_strerror(st), dsmoe_last_error());
        return 1;
    }
    for (int t = 0; t < T; t++) {
        float sum = 0;
        printf("token %d:", t);
        for (int k = 0; k < K; k++) {
            printf(" %d(%.3f)", indices[t * K + k], weights[t * K + k]);
            sum += weights[t * K + k];
        }
        printf("  sum %.4f\n", sum);
    }
    printf("dsmoe %s, kernels %s\n", dsmoe_version(), dsmoe_isa());
    dsmoe_free(ws);
    free(logits);
    free(bias);
    free(weights);
    free(indices);
    return 0;
}
