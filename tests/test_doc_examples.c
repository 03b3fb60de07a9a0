/*
 * test_doc_examples.c — the code examples of the documentation, compiled and (where
 * they can run on their own) run, so that they cannot drift from the API again.
 *
 * The examples are not copied here: when CMake configures, tests/doc_examples.cmake
 * copies the README's C quick start (the ```c block after its c-example marker)
 * and the first " * Example" block of include/dsmoe/{router,balance,io,moe}.h into
 * generated files, which each function below #includes in the middle of its body,
 * after declaring the variables the example uses (T, logits, idx, ...). A compile
 * error in an example points at its line in README.md or in the header. The
 * functions then check what the example did (valid routing, counts, freed
 * memory under ASan); the moe.h example needs a whole checkpoint and is only
 * compiled.
 */
#include "io_testutil.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

enum { E = 256, K = 8, NT = 4 };

static void random_logits(float *l, int64_t n) {
    for (int64_t i = 0; i < n; i++) l[i] = (float)tl_normal();
}

/* Every token got K distinct experts in [0, E) and positive weights summing to
 * the routed scaling factor. */
static void check_routing(const char *what, const int32_t *idx, const float *w, int64_t T,
                          double wsum) {
    for (int64_t t = 0; t < T; t++) {
        double s = 0;
        for (int k = 0; k < K; k++) {
            int32_t e = idx[t * K + k];
            tl_checks++;
            if (e < 0 || e >= E) TL_FAIL("%s: token %lld slot %d: expert %d", what, (long long)t, k, (int)e);
            for (int j = 0; j < k; j++)
                if (idx[t * K + j] == e) TL_FAIL("%s: token %lld: expert %d twice", what, (long long)t, (int)e);
            s += w[t * K + k];
        }
        ASSERT_NEAR(s, wsum, 1e-5);
    }
}

/* README.md, "C API quick start". */
static void test_readme_quick_start(void) {
    int64_t T = NT;
    int32_t idx[NT * K];
    float w[NT * K], logits[NT * E], bias[E];
    tl_seed(1);
    random_logits(logits, NT * E);
    memset(bias, 0, sizeof bias);
    for (int i = 0; i < NT * K; i++) idx[i] = -1;
    {
// cppcheck-suppress missingInclude
#include "ex_readme.inc"
        ASSERT_EQ_INT(st, DSMOE_OK);
        dsmoe_free(ws);
    }
    check_routing("README", idx, w, T, 2.5);
}

/* include/dsmoe/router.h. */
static void test_router_h(void) {
    int64_t T = NT;
    int32_t idx[NT * K];
    float w[NT * K], logits[NT * E], bias[E];
    tl_seed(2);
    random_logits(logits, NT * E);
    memset(bias, 0, sizeof bias);
    for (int i = 0; i < NT * K; i++) idx[i] = -1;
    {
// cppcheck-suppress missingInclude
#include "ex_router.inc"
        dsmoe_free(ws);
    }
    check_routing("router.h", idx, w, T, 2.5);
}

/* include/dsmoe/balance.h: two micro-batches through a router and a balancer. */
static void test_balance_h(void) {
    int64_t T = NT;
    int32_t idx[NT * K];
    float w[NT * K], l0[NT * E], l1[NT * E];
    int64_t counts[E];
    const float *logits[2] = {l0, l1};
    tl_seed(3);
    random_logits(l0, NT * E);
    random_logits(l1, NT * E);
    for (int i = 0; i < NT * K; i++) idx[i] = -1;
    for (int e = 0; e < E; e++) counts[e] = -1; /* the router overwrites them */
    dsmoe_router_config rcfg;
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &rcfg));
    dsmoe_router_output out = {.indices = idx, .weights = w};
    size_t n = dsmoe_router_workspace_size(&rcfg, T, 0, DSMOE_DTYPE_F32, 1);
    void *ws = dsmoe_malloc(n);
    {
// cppcheck-suppress missingInclude
#include "ex_balance.inc"
    }
    dsmoe_free(ws);
    /* counts are those of the second micro-batch. */
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += counts[e];
    ASSERT_EQ_INT(total, T * K);
    check_routing("balance.h", idx, w, T, 2.5);
}

/* include/dsmoe/io.h, run in a folder holding the two files it opens. */
static void test_io_h(void) {
    char dir[4096], cwd[4096];
    snprintf(dir, sizeof dir, "%s", tl_tmp("test_doc_examples.d"));
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        TL_FAIL("mkdir %s: %s", dir, strerror(errno));
        return;
    }
    ASSERT_TRUE(getcwd(cwd, sizeof cwd) != NULL);
    ASSERT_TRUE(chdir(dir) == 0);
    const int64_t hs[2] = {2, 3}, gs[2] = {4, 3};
    float h[6], g[12];
    io_fixture_values(DSMOE_DTYPE_F32, 6, h);
    io_fixture_values(DSMOE_DTYPE_F32, 12, g);
    ASSERT_OK(dsmoe_npy_write_raw("hidden.npy", DSMOE_DTYPE_F32, 2, hs, h));
    dsmoe_safetensors_writer *wr;
    ASSERT_OK(dsmoe_safetensors_writer_create(&wr));
    ASSERT_OK(dsmoe_safetensors_writer_add(wr, "mlp.gate.weight", DSMOE_DTYPE_F32, 2, gs, g));
    ASSERT_OK(dsmoe_safetensors_writer_save(wr, "layer.safetensors"));
    dsmoe_safetensors_writer_free(wr);
    dsmoe_clear_error();
    {
// cppcheck-suppress missingInclude
#include "ex_io.inc"
    }
    ASSERT_TRUE(dsmoe_last_error()[0] == '\0'); /* nothing failed */
    unlink("hidden.npy");
    unlink("layer.safetensors");
    ASSERT_TRUE(chdir(cwd) == 0);
    rmdir(dir);
}

/* include/dsmoe/moe.h: compiled only (it opens a whole layer's checkpoint). */
void doc_example_moe(int64_t T, float *y, const float *x);
void doc_example_moe(int64_t T, float *y, const float *x) {
// cppcheck-suppress missingInclude
#include "ex_moe.inc"
}

/* include/dsmoe/train.h: run (the default corpus, four windows). */
static void test_train_h(void) {
    dsmoe_clear_error();
    {
// cppcheck-suppress missingInclude
#include "ex_train.inc"
    }
    ASSERT_TRUE(dsmoe_last_error()[0] == '\0');
}

int main(void) {
    RUN(test_readme_quick_start);
    RUN(test_train_h);
    RUN(test_router_h);
    RUN(test_balance_h);
    RUN(test_io_h);
    return TEST_SUMMARY();
}
