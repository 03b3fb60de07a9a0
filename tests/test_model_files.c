/*
 * test_model_files.c — the tensor table of a configuration and model directories
 * (dsmoe_model_files_*): the golden directories of tests/ref/gen_model_golden.py open
 * (single file, three shards, F32 / BF16 / F16 / F8_E4M3 with block scales), the shards
 * read the same as one file holding the same tensors, fp8 blocks equal NumPy's
 * dequantisation bit for bit, and every malformed directory is refused with an error
 * naming the tensor, the key or the file.
 */
#include "model_testutil.h"

#include <math.h>

/* ------------------------------------------------------------ helpers -- */

static int load_config(const char *dir, dsmoe_model_config *c) {
    dsmoe_status s = dsmoe_model_config_from_dir(dir, c);
    if (s != DSMOE_OK) TL_FAIL("config of %s: %s", dir, dsmoe_last_error());
    return s == DSMOE_OK;
}

static int64_t numel(const dsmoe_model_tensor_info *t) {
    return t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
}

/* One change applied while copying a golden directory (single file) to a scratch one. */
typedef struct edit {
    const char *drop;          /* tensor left out (exact name), or NULL */
    const char *drop_prefix;   /* every tensor with this prefix left out, or NULL */
    const char *reshape;       /* tensor written with its two dims swapped, or NULL */
    const char *retype;        /* tensor written as I32 (F32 tensors only), or NULL */
    const char *nan;           /* F32 tensor whose element 3 becomes NaN, or NULL */
    const char *add;           /* extra tensor (F32, 4 elements), or NULL */
    const char *cfg_from, *cfg_to; /* a substitution in config.json, or NULL */
} edit;

/* Copies MT_GOLDEN<src>/ to DSMOE_TMP/<name> with the edit; returns the new path in buf. */
static const char *make_variant(char *buf, size_t cap, const char *src, const char *name,
                                const edit *e) {
    char from[512], path[700];
    mt_scratch(buf, cap, name);
    snprintf(from, sizeof from, "%s%s/config.json", MT_GOLDEN, src);
    size_t len = 0, l2 = 0;
    char *cfg = mt_read(from, &len);
    if (!cfg) {
        TL_FAIL("cannot read %s", from);
        return buf;
    }
    if (e->cfg_from) {
        char *c2 = mt_subst(cfg, len, e->cfg_from, e->cfg_to, &l2);
        free(cfg);
        cfg = c2;
        len = l2;
    }
    snprintf(path, sizeof path, "%s/config.json", buf);
    if (cfg && !mt_write(path, cfg, len)) TL_FAIL("cannot write %s", path);
    free(cfg);

    snprintf(from, sizeof from, "%s%s/model.safetensors", MT_GOLDEN, src);
    dsmoe_safetensors *st = NULL;
    dsmoe_safetensors_writer *w = NULL;
    if (dsmoe_safetensors_open(from, &st) != DSMOE_OK ||
        dsmoe_safetensors_writer_create(&w) != DSMOE_OK) {
        TL_FAIL("cannot copy %s: %s", from, dsmoe_last_error());
        dsmoe_safetensors_close(st);
        return buf;
    }
    static float extra[4] = {1, 2, 3, 4};
    float *nan_copy = NULL;
    for (int64_t i = 0; i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view v;
        dsmoe_safetensors_at(st, i, &v);
        if (e->drop && strcmp(v.name, e->drop) == 0) continue;
        if (e->drop_prefix && strncmp(v.name, e->drop_prefix, strlen(e->drop_prefix)) == 0) continue;
        int64_t shape[2] = {v.shape[0], v.shape[1]};
        dsmoe_dtype dt = v.dtype;
        const void *data = v.data;
        if (e->reshape && strcmp(v.name, e->reshape) == 0) {
            shape[0] = v.shape[1];
            shape[1] = v.shape[0];
        }
        if (e->retype && strcmp(v.name, e->retype) == 0) dt = DSMOE_DTYPE_I32;
        if (e->nan && !nan_copy && strcmp(v.name, e->nan) == 0) {
            nan_copy = (float *)malloc(v.nbytes);
            memcpy(nan_copy, v.data, v.nbytes);
            nan_copy[3] = NAN;
            data = nan_copy;
        }
        ASSERT_OK(dsmoe_safetensors_writer_add(w, v.name, dt, v.ndim, shape, data));
    }
    if (e->add) {
        int64_t shape[1] = {4};
        ASSERT_OK(dsmoe_safetensors_writer_add(w, e->add, DSMOE_DTYPE_F32, 1, shape, extra));
    }
    snprintf(path, sizeof path, "%s/model.safetensors", buf);
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors_close(st);
    free(nan_copy);
    return buf;
}

/* Opening `dir` fails with `want` and a message containing each needle. */
static void expect_refused(const char *dir, dsmoe_status want, const char *n1, const char *n2) {
    dsmoe_model_config c;
    if (!load_config(dir, &c)) return;
    dsmoe_model_files *mf = (dsmoe_model_files *)&c; /* must become NULL */
    ASSERT_STATUS(dsmoe_model_files_open(dir, &c, &mf), want);
    ASSERT_TRUE(mf == NULL);
    if (n1 && !strstr(dsmoe_last_error(), n1))
        TL_FAIL("%s: message '%s' lacks '%s'", dir, dsmoe_last_error(), n1);
    if (n2 && !strstr(dsmoe_last_error(), n2))
        TL_FAIL("%s: message '%s' lacks '%s'", dir, dsmoe_last_error(), n2);
    dsmoe_model_files_close(mf);
}

/* ------------------------------------------------------------ the table -- */

static void test_table_deepseek_v3(void) {
    char path[512];
    snprintf(path, sizeof path, "%sconfigs/deepseek_v3.json", MT_GOLDEN);
    size_t len;
    char *t = mt_read(path, &len);
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    free(t);
    /* Per layer: 9 attention tensors (q_lora) + 3 dense or 1 + 1 + 3·256 + 3 MoE. */
    const int64_t dense = 12, moe = 9 + 1 + 1 + 768 + 3;
    const int64_t main_n = 3 + 3 * dense + 58 * moe;
    ASSERT_EQ_INT(dsmoe_model_tensor_count(&c, 0), main_n);
    ASSERT_EQ_INT(dsmoe_model_tensor_count(&c, 1), main_n + 6 + moe);
    ASSERT_EQ_INT(dsmoe_model_tensor_count(&c, 2), -1);
    dsmoe_model_tensor_spec s;
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 0, &s));
    ASSERT_TRUE(strcmp(s.name, "model.embed_tokens.weight") == 0);
    ASSERT_EQ_INT(s.shape[0], 129280);
    ASSERT_EQ_INT(s.shape[1], 7168);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 2, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.0.self_attn.q_a_proj.weight") == 0);
    ASSERT_EQ_INT(s.shape[0], 1536);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 4, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.0.self_attn.q_b_proj.weight") == 0);
    ASSERT_EQ_INT(s.shape[0], 128 * 192);
    ASSERT_EQ_INT(s.shape[1], 1536);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 1 + 3 * dense, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.3.input_layernorm.weight") == 0);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 1 + 3 * dense + 9 + 1, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.3.mlp.gate.e_score_correction_bias") == 0);
    ASSERT_EQ_INT(s.ndim, 1);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, 1 + 3 * dense + 9 + 2 + 3 * 255 + 2, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.3.mlp.experts.255.down_proj.weight") == 0);
    ASSERT_EQ_INT(s.shape[0], 7168);
    ASSERT_EQ_INT(s.shape[1], 2048);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, main_n - 1, &s));
    ASSERT_TRUE(strcmp(s.name, "lm_head.weight") == 0);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, main_n + 3, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.61.eh_proj.weight") == 0);
    ASSERT_EQ_INT(s.shape[1], 2 * 7168);
    ASSERT_EQ_INT(s.mtp, 1);
    ASSERT_OK(dsmoe_model_tensor_at(&c, 1, main_n + 6 + moe - 1, &s));
    ASSERT_TRUE(strcmp(s.name, "model.layers.61.mlp.shared_experts.down_proj.weight") == 0);
    ASSERT_STATUS(dsmoe_model_tensor_at(&c, 1, main_n + 6 + moe, &s), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_model_tensor_at(&c, 1, -1, &s), DSMOE_STATUS_INVALID_ARGUMENT);
    /* Names are unique. */
    int64_t n = dsmoe_model_tensor_count(&c, 1);
    int dup = 0;
    char prev[DSMOE_MODEL_NAME_MAX] = "";
    for (int64_t i = 0; i < n && !dup; i += 97) { /* a sample: consecutive names differ */
        ASSERT_OK(dsmoe_model_tensor_at(&c, 1, i, &s));
        dup = strcmp(prev, s.name) == 0;
        snprintf(prev, sizeof prev, "%s", s.name);
    }
    ASSERT_EQ_INT(dup, 0);
}

/* ------------------------------------------------------------ golden dirs -- */

static void check_golden(const char *name, int32_t shards, int32_t mtp, const char *dtype) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s%s", MT_GOLDEN, name);
    dsmoe_model_config c;
    if (!load_config(dir, &c)) return;
    dsmoe_model_files *mf = NULL;
    ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
    if (!mf) return;
    ASSERT_EQ_INT(dsmoe_model_files_shard_count(mf), shards);
    ASSERT_EQ_INT(dsmoe_model_files_mtp_depths(mf), mtp);
    /* Every tensor of the table is there with its shape and reads as finite fp32. */
    int64_t n = dsmoe_model_tensor_count(&c, mtp);
    ASSERT_TRUE(n > 0);
    for (int64_t i = 0; i < n; i++) {
        dsmoe_model_tensor_spec s;
        dsmoe_model_tensor_info t;
        ASSERT_OK(dsmoe_model_tensor_at(&c, mtp, i, &s));
        ASSERT_OK(dsmoe_model_files_get(mf, s.name, &t));
        if (tl_failures) break;
        ASSERT_TRUE(strcmp(t.name, s.name) == 0);
        ASSERT_EQ_INT(t.shape[0], s.shape[0]);
        ASSERT_EQ_INT(t.shape[1], s.shape[1]);
        ASSERT_TRUE(t.shard >= 0 && t.shard < shards);
        if (strcmp(dtype, "F8_E4M3") == 0) {
            /* V3's choice: projections fp8, the rest BF16. */
            int proj = t.ndim == 2 && !strstr(t.name, "embed_tokens") && !strstr(t.name, "lm_head") &&
                       !strstr(t.name, "mlp.gate.weight");
            ASSERT_TRUE(strcmp(t.stored_dtype, proj ? "F8_E4M3" : "BF16") == 0);
            ASSERT_EQ_INT(t.has_scale, proj);
        } else {
            ASSERT_TRUE(strcmp(t.stored_dtype, dtype) == 0);
            ASSERT_EQ_INT(t.has_scale, 0);
        }
        float *w = (float *)malloc((size_t)numel(&t) * sizeof *w);
        memset(w, 0xff, (size_t)numel(&t) * sizeof *w); /* NaN: every element must be written */
        ASSERT_OK(dsmoe_model_files_read_f32(mf, s.name, w));
        int finite = 1;
        for (int64_t k = 0; k < numel(&t); k++) finite &= isfinite(w[k]) != 0;
        ASSERT_TRUE(finite);
        free(w);
    }
    dsmoe_model_tensor_info t;
    ASSERT_STATUS(dsmoe_model_files_get(mf, "model.layers.99.input_layernorm.weight", &t),
                  DSMOE_STATUS_NOT_FOUND);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "model.layers.99.input_layernorm.weight") != NULL);
    dsmoe_model_files_close(mf);
}

static void test_golden_dirs(void) {
    check_golden("v3_yarn_q", 1, 1, "F32");
    check_golden("v2_glg_sharded", 3, 0, "BF16");
    check_golden("moonlight_freq", 1, 0, "F16");
    check_golden("fp8_blocks", 1, 0, "F8_E4M3");
    dsmoe_model_files_close(NULL);
    ASSERT_EQ_INT(dsmoe_model_files_mtp_depths(NULL), 0);
}

/* The shards against one file holding the same tensors (written by dsmoe's writer). */
static void test_shards_match_single_file(void) {
    char src[512], dir[512], path[700];
    snprintf(src, sizeof src, "%sv2_glg_sharded", MT_GOLDEN);
    mt_scratch(dir, sizeof dir, "model_single");
    dsmoe_model_config c;
    if (!load_config(src, &c)) return;
    snprintf(path, sizeof path, "%s/config.json", src);
    char to[700];
    snprintf(to, sizeof to, "%s/config.json", dir);
    ASSERT_TRUE(mt_copy(path, to));
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    dsmoe_safetensors *st[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s/model-%05d-of-00003.safetensors", src, k + 1);
        ASSERT_OK(dsmoe_safetensors_open(path, &st[k]));
        for (int64_t i = 0; st[k] && i < dsmoe_safetensors_count(st[k]); i++) {
            dsmoe_tensor_view v;
            dsmoe_safetensors_at(st[k], i, &v);
            ASSERT_OK(dsmoe_safetensors_writer_add(w, v.name, v.dtype, v.ndim, v.shape, v.data));
        }
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    for (int k = 0; k < 3; k++) dsmoe_safetensors_close(st[k]);

    dsmoe_model_files *a = NULL, *b = NULL;
    ASSERT_OK(dsmoe_model_files_open(src, &c, &a));
    ASSERT_OK(dsmoe_model_files_open(dir, &c, &b));
    if (!a || !b) goto done;
    ASSERT_EQ_INT(dsmoe_model_files_shard_count(b), 1);
    int64_t n = dsmoe_model_tensor_count(&c, 0);
    int same = 1, spread = 0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_model_tensor_spec s;
        dsmoe_model_tensor_info ta, tb;
        dsmoe_model_tensor_at(&c, 0, i, &s);
        ASSERT_OK(dsmoe_model_files_get(a, s.name, &ta));
        ASSERT_OK(dsmoe_model_files_get(b, s.name, &tb));
        spread |= 1 << ta.shard;
        float *x = (float *)malloc((size_t)numel(&ta) * sizeof *x);
        float *y = (float *)malloc((size_t)numel(&ta) * sizeof *y);
        memset(x, 0xff, (size_t)numel(&ta) * sizeof *x);
        memset(y, 0x7f, (size_t)numel(&ta) * sizeof *y);
        ASSERT_OK(dsmoe_model_files_read_f32(a, s.name, x));
        ASSERT_OK(dsmoe_model_files_read_f32(b, s.name, y));
        same &= memcmp(x, y, (size_t)numel(&ta) * sizeof *x) == 0;
        free(x);
        free(y);
    }
    ASSERT_TRUE(same);
    ASSERT_EQ_INT(spread, 7); /* tensors came from all three shards */
done:
    dsmoe_model_files_close(a);
    dsmoe_model_files_close(b);
}

/* ------------------------------------------------------------ fp8 -- */

static void test_fp8_decode(void) {
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x00) == 0.0f);
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x80) == 0.0f && signbit(dsmoe_fp8_e4m3_to_f32(0x80)));
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x01) == ldexpf(1.0f, -9));  /* smallest subnormal */
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x07) == ldexpf(7.0f, -9));  /* largest subnormal */
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x08) == ldexpf(1.0f, -6));  /* smallest normal */
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x38) == 1.0f);
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x3C) == 1.5f);
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0x7E) == 448.0f);
    ASSERT_TRUE(dsmoe_fp8_e4m3_to_f32(0xFE) == -448.0f);
    ASSERT_TRUE(isnan(dsmoe_fp8_e4m3_to_f32(0x7F)) && isnan(dsmoe_fp8_e4m3_to_f32(0xFF)));
    /* 0x00..0x7E strictly increasing, consecutive codes one step apart inside a binade,
     * and the sign bit mirrors. */
    int mono = 1, mirror = 1;
    for (int b = 1; b <= 0x7E; b++) {
        mono &= dsmoe_fp8_e4m3_to_f32((uint8_t)b) > dsmoe_fp8_e4m3_to_f32((uint8_t)(b - 1));
        mirror &= dsmoe_fp8_e4m3_to_f32((uint8_t)(b | 0x80)) == -dsmoe_fp8_e4m3_to_f32((uint8_t)b);
        if ((b & 7) && b >= 8) {
            float step = dsmoe_fp8_e4m3_to_f32((uint8_t)b) - dsmoe_fp8_e4m3_to_f32((uint8_t)(b - 1));
            mono &= step == ldexpf(1.0f, ((b >> 3) & 15) - 10);
        }
    }
    ASSERT_TRUE(mono);
    ASSERT_TRUE(mirror);
}

/* Block-scaled tensors against NumPy's fp32(fp8) * fp32(scale), bit for bit (the 130-wide
 * dense FFN has a partial block at the edge in each direction). */
static void test_fp8_blocks(void) {
    char dir[512], path[900];
    snprintf(dir, sizeof dir, "%sfp8_blocks", MT_GOLDEN);
    dsmoe_model_config c;
    if (!load_config(dir, &c)) return;
    ASSERT_EQ_INT(c.fp8_block_rows, 128);
    dsmoe_model_files *mf = NULL;
    ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
    if (!mf) return;
    static const char *const names[] = {"model.layers.0.mlp.gate_proj.weight",
                                        "model.layers.0.mlp.down_proj.weight",
                                        "model.layers.1.self_attn.kv_b_proj.weight"};
    for (int k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s/dequant.%s.npy", dir, names[k]);
        int64_t n;
        double *want = mt_npy64(path, &n);
        dsmoe_model_tensor_info t;
        ASSERT_OK(dsmoe_model_files_get(mf, names[k], &t));
        ASSERT_TRUE(strcmp(t.stored_dtype, "F8_E4M3") == 0);
        ASSERT_EQ_INT(numel(&t), n);
        /* Poisoned first: malloc may hand back the chunk the golden values were read into. */
        float *got = (float *)malloc((size_t)n * sizeof *got);
        memset(got, 0xff, (size_t)n * sizeof *got);
        ASSERT_OK(dsmoe_model_files_read_f32(mf, names[k], got));
        int64_t bad = 0;
        for (int64_t i = 0; want && i < n; i++) bad += (double)got[i] != want[i];
        if (bad) TL_FAIL("%s: %lld of %lld elements differ from NumPy", names[k], (long long)bad, (long long)n);
        free(got);
        free(want);
    }
    dsmoe_model_files_close(mf);
}

static void test_fp8_refusals(void) {
    char dir[512];
    snprintf(dir, sizeof dir, "%sfp8_noscale", MT_GOLDEN);
    expect_refused(dir, DSMOE_STATUS_NOT_FOUND, "model.layers.0.self_attn.q_b_proj.weight_scale_inv",
                   NULL);
    snprintf(dir, sizeof dir, "%sfp8_badscale", MT_GOLDEN);
    expect_refused(dir, DSMOE_STATUS_SHAPE_MISMATCH,
                   "model.layers.0.self_attn.q_b_proj.weight_scale_inv", "(1, 1)");
    /* The same files with a config.json that does not declare the quantization. */
    char src[512], to[700], from[700];
    snprintf(src, sizeof src, "%sfp8_blocks", MT_GOLDEN);
    mt_scratch(dir, sizeof dir, "model_fp8_noquant");
    snprintf(from, sizeof from, "%s/config.json", src);
    size_t len, l2;
    char *t = mt_read(from, &len);
    char *t2 = t ? mt_subst(t, len, "\"quantization_config\"", "\"quantization_config_x\"", &l2) : NULL;
    snprintf(to, sizeof to, "%s/config.json", dir);
    ASSERT_TRUE(t2 && mt_write(to, t2, l2));
    free(t);
    free(t2);
    snprintf(from, sizeof from, "%s/model.safetensors", src);
    snprintf(to, sizeof to, "%s/model.safetensors", dir);
    ASSERT_TRUE(mt_copy(from, to));
    expect_refused(dir, DSMOE_STATUS_FORMAT, "quantization_config", "is F8_E4M3");
}

/* An fp8 shard cut short anywhere (inside the length, the header, the data) is refused
 * with an error, never read past its end (the private image and the header rewrite). */
static void test_fp8_truncated(void) {
    char dir[512], from[700], to[700];
    snprintf(from, sizeof from, "%sfp8_blocks/model.safetensors", MT_GOLDEN);
    size_t len;
    char *img = mt_read(from, &len);
    ASSERT_TRUE(img != NULL && len > 64);
    if (!img) return;
    uint64_t hn;
    memcpy(&hn, img, 8);
    const size_t cuts[] = {0, 5, 8, 9, 8 + (size_t)hn / 2, 8 + (size_t)hn - 1, 8 + (size_t)hn,
                           8 + (size_t)hn + 100, len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "model_fp8_cut%zu", i);
        mt_scratch(dir, sizeof dir, name);
        snprintf(from, sizeof from, "%sfp8_blocks/config.json", MT_GOLDEN);
        snprintf(to, sizeof to, "%s/config.json", dir);
        ASSERT_TRUE(mt_copy(from, to));
        snprintf(to, sizeof to, "%s/model.safetensors", dir);
        ASSERT_TRUE(mt_write(to, img, cuts[i]));
        dsmoe_model_config c;
        dsmoe_model_files *mf = NULL;
        ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
        dsmoe_status s = dsmoe_model_files_open(dir, &c, &mf);
        if (s != DSMOE_STATUS_FORMAT)
            TL_FAIL("cut at %zu of %zu: %s (%s), want FORMAT", cuts[i], len, dsmoe_status_name(s),
                    dsmoe_last_error());
        ASSERT_TRUE(mf == NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "model.safetensors") != NULL);
        dsmoe_model_files_close(mf);
    }
    free(img);
}

/* ------------------------------------------------------------ refusals -- */

static void test_refusals_single(void) {
    char dir[512];
    edit e;
    memset(&e, 0, sizeof e);
    e.drop = "model.layers.1.self_attn.kv_b_proj.weight";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_missing", &e);
    expect_refused(dir, DSMOE_STATUS_NOT_FOUND, "model.layers.1.self_attn.kv_b_proj.weight", "missing");

    memset(&e, 0, sizeof e);
    e.add = "model.layers.0.self_attn.rotary_emb.inv_freq";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_extra", &e);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.layers.0.self_attn.rotary_emb.inv_freq", NULL);

    memset(&e, 0, sizeof e);
    e.reshape = "model.layers.2.mlp.experts.5.up_proj.weight";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_shape", &e);
    expect_refused(dir, DSMOE_STATUS_SHAPE_MISMATCH, "model.layers.2.mlp.experts.5.up_proj.weight",
                   "(23, 9), want (9, 23)");

    memset(&e, 0, sizeof e);
    e.retype = "model.norm.weight";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_dtype", &e);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.norm.weight", "I32");

    memset(&e, 0, sizeof e);
    e.add = "model.layers.0.input_layernorm.weight_scale_inv";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_stray_scale", &e);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.layers.0.input_layernorm.weight_scale_inv",
                   "not F8_E4M3");

    /* The MTP layer: partly stored is an error, absent is fine. */
    memset(&e, 0, sizeof e);
    e.drop = "model.layers.3.hnorm.weight";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_mtp_part", &e);
    expect_refused(dir, DSMOE_STATUS_NOT_FOUND, "model.layers.3.hnorm.weight", "MTP");
    memset(&e, 0, sizeof e);
    e.drop_prefix = "model.layers.3.";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_mtp_none", &e);
    dsmoe_model_config c;
    dsmoe_model_files *mf = NULL;
    if (load_config(dir, &c)) {
        ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
        ASSERT_EQ_INT(dsmoe_model_files_mtp_depths(mf), 0);
        dsmoe_model_files_close(mf);
    }

    /* A config with fewer layers than the files: the rest are extra tensors. */
    memset(&e, 0, sizeof e);
    e.cfg_from = "\"num_hidden_layers\": 3";
    e.cfg_to = "\"num_hidden_layers\": 2";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_fewer_layers", &e);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.layers.", "not part of the model");

    /* Tied embeddings: a stored lm_head is extra. */
    memset(&e, 0, sizeof e);
    e.add = "lm_head.weight";
    make_variant(dir, sizeof dir, "moonlight_freq", "model_tied_head", &e);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "lm_head.weight", NULL);
    /* ... and untied without one: missing. */
    memset(&e, 0, sizeof e);
    e.cfg_from = "\"tie_word_embeddings\": true";
    e.cfg_to = "\"tie_word_embeddings\": false";
    make_variant(dir, sizeof dir, "moonlight_freq", "model_untied", &e);
    expect_refused(dir, DSMOE_STATUS_NOT_FOUND, "lm_head.weight", NULL);

    /* A non-finite weight opens (the check costs a pass) but does not read. */
    memset(&e, 0, sizeof e);
    e.nan = "model.layers.1.mlp.gate.weight";
    make_variant(dir, sizeof dir, "v3_yarn_q", "model_nan", &e);
    mf = NULL;
    if (load_config(dir, &c)) {
        ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
        float w[8 * 23];
        ASSERT_STATUS(dsmoe_model_files_read_f32(mf, "model.layers.1.mlp.gate.weight", w),
                      DSMOE_STATUS_NON_FINITE);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "model.layers.1.mlp.gate.weight") != NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "element 3") != NULL);
        dsmoe_model_files_close(mf);
    }

    /* No weights at all. */
    char empty[512], to[700], from[700];
    mt_scratch(empty, sizeof empty, "model_empty");
    snprintf(from, sizeof from, "%sv3_yarn_q/config.json", MT_GOLDEN);
    snprintf(to, sizeof to, "%s/config.json", empty);
    ASSERT_TRUE(mt_copy(from, to));
    expect_refused(empty, DSMOE_STATUS_IO, "model.safetensors", NULL);
    /* Not a safetensors file: the reader's message, with the path. */
    snprintf(to, sizeof to, "%s/model.safetensors", empty);
    ASSERT_TRUE(mt_write(to, "not a model", 11));
    expect_refused(empty, DSMOE_STATUS_FORMAT, to, NULL);
}

/* Sharded directories: a scratch copy of v2_glg_sharded with the index edited. */
static const char *shard_variant(char *dir, size_t cap, const char *name, const char *from_text,
                                 const char *to_text, int drop_shard) {
    char src[512], from[700], to[700];
    snprintf(src, sizeof src, "%sv2_glg_sharded", MT_GOLDEN);
    mt_scratch(dir, cap, name);
    snprintf(from, sizeof from, "%s/config.json", src);
    snprintf(to, sizeof to, "%s/config.json", dir);
    ASSERT_TRUE(mt_copy(from, to));
    for (int k = 1; k <= 3; k++) {
        if (k == drop_shard) continue;
        snprintf(from, sizeof from, "%s/model-%05d-of-00003.safetensors", src, k);
        snprintf(to, sizeof to, "%s/model-%05d-of-00003.safetensors", dir, k);
        ASSERT_TRUE(mt_copy(from, to));
    }
    snprintf(from, sizeof from, "%s/model.safetensors.index.json", src);
    snprintf(to, sizeof to, "%s/model.safetensors.index.json", dir);
    size_t len, l2;
    char *t = mt_read(from, &len);
    char *t2 = t && from_text ? mt_subst(t, len, from_text, to_text, &l2) : NULL;
    if (t2) ASSERT_TRUE(mt_write(to, t2, l2));
    else if (t) ASSERT_TRUE(mt_write(to, t, len));
    free(t);
    free(t2);
    return dir;
}

static void test_refusals_sharded(void) {
    char dir[512];
    shard_variant(dir, sizeof dir, "model_shard_ok", NULL, NULL, 0);
    dsmoe_model_config c;
    dsmoe_model_files *mf = NULL;
    if (load_config(dir, &c)) {
        ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
        ASSERT_EQ_INT(dsmoe_model_files_shard_count(mf), 3);
        dsmoe_model_files_close(mf);
    }
    /* A shard file missing. */
    shard_variant(dir, sizeof dir, "model_shard_gone", NULL, NULL, 2);
    expect_refused(dir, DSMOE_STATUS_IO, "model-00002-of-00003.safetensors", NULL);
    /* weight_map puts a tensor in the wrong shard. */
    shard_variant(dir, sizeof dir, "model_shard_wrong",
                  "\"lm_head.weight\": \"model-00003-of-00003.safetensors\"",
                  "\"lm_head.weight\": \"model-00001-of-00003.safetensors\"", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "lm_head.weight", NULL);
    /* weight_map lists a tensor no shard has. */
    shard_variant(dir, sizeof dir, "model_shard_phantom", "\"weight_map\": {",
                  "\"weight_map\": {\"model.layers.0.self_attn.q_proj.bias\": "
                  "\"model-00001-of-00003.safetensors\", ", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.layers.0.self_attn.q_proj.bias", "no such tensor");
    /* A tensor a shard has is not in weight_map. */
    shard_variant(dir, sizeof dir, "model_shard_unlisted",
                  "\"lm_head.weight\": \"model-00003-of-00003.safetensors\",", "", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "lm_head.weight", "nowhere");
    /* A file name that leaves the directory. */
    shard_variant(dir, sizeof dir, "model_shard_path",
                  "\"lm_head.weight\": \"model-00003-of-00003.safetensors\"",
                  "\"lm_head.weight\": \"../model-00003-of-00003.safetensors\"", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "lm_head.weight", "not a file name");
    /* No weight_map; malformed JSON. */
    shard_variant(dir, sizeof dir, "model_shard_nomap", "\"weight_map\"", "\"weight_mop\"", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "weight_map", NULL);
    shard_variant(dir, sizeof dir, "model_shard_json", "\"metadata\": {", "\"metadata\": {,", 0);
    expect_refused(dir, DSMOE_STATUS_FORMAT, "model.safetensors.index.json", "byte");
    /* Both a single file and an index. */
    shard_variant(dir, sizeof dir, "model_shard_both", NULL, NULL, 0);
    char from[700], to[700];
    snprintf(from, sizeof from, "%s/model-00001-of-00003.safetensors", dir);
    snprintf(to, sizeof to, "%s/model.safetensors", dir);
    ASSERT_TRUE(mt_copy(from, to));
    expect_refused(dir, DSMOE_STATUS_FORMAT, "both present", NULL);
}

static void test_bad_arguments(void) {
    dsmoe_model_files *mf = NULL;
    dsmoe_model_config c;
    memset(&c, 0, sizeof c);
    ASSERT_STATUS(dsmoe_model_files_open(NULL, &c, &mf), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_model_files_open(".", &c, &mf), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(mf == NULL);
    ASSERT_EQ_INT(dsmoe_model_tensor_count(&c, 0), -1);
}

int main(void) {
    RUN(test_table_deepseek_v3);
    RUN(test_golden_dirs);
    RUN(test_shards_match_single_file);
    RUN(test_fp8_decode);
    RUN(test_fp8_blocks);
    RUN(test_fp8_refusals);
    RUN(test_fp8_truncated);
    RUN(test_refusals_single);
    RUN(test_refusals_sharded);
    RUN(test_bad_arguments);
    return TEST_SUMMARY();
}
