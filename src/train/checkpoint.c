/*
 * checkpoint.c — a training run's checkpoint folder, written atomically and read back
 * with every check:
 *   config.json                 the model (DeepseekV3 keys, "dsmoe_vocab": "bytes")
 *   model.safetensors           every tensor of the training model under its Hugging Face
 *                               name (MTP depths at layer L + d, the correction biases,
 *                               the MTP depths' copies of the shared embedding and head)
 *   training_state.safetensors  AdamW's moments, the step, the data order's RNG, every
 *                               balancer, the run config, the data files' sizes and hashes
 *   dsmoe_checksums.txt         size and hash of each file above (written last)
 * dsmoe_model_open reads the folder as a model directory (it looks only at config.json
 * and model.safetensors).
 */
#include "train/run_internal.h"

#include "io/io_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CKPT_SUMS "dsmoe_checksums.txt"
#define STATE_VERSION 1
enum { STATE_INTS = 10, STATE_FLTS = 4 };

/* ----------------------------------------------------------------- hashes -- */

uint64_t dsmoe__hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    for (; n >= 8; n -= 8, s += 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    for (; n > 0; n--, s++) {
        h = (h ^ *s) * 0x100000001B3ull;
        h ^= h >> 29;
    }
    return h;
}

dsmoe_status dsmoe__hash_file(const char *path, uint64_t *hash, int64_t *bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return dsmoe__error(DSMOE_STATUS_IO, "%s: cannot open: %s", path, strerror(errno));
    enum { CHUNK = 1 << 20 };
    unsigned char *buf = (unsigned char *)malloc(CHUNK);
    if (!buf) {
        fclose(f);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", path);
    }
    uint64_t h = DSMOE__HASH_INIT;
    int64_t total = 0;
    size_t got;
    while ((got = fread(buf, 1, CHUNK, f)) > 0) {
        h = dsmoe__hash_bytes(h, buf, got);
        total += (int64_t)got;
    }
    int bad = ferror(f);
    fclose(f);
    free(buf);
    if (bad) return dsmoe__error(DSMOE_STATUS_IO, "%s: read error", path);
    *hash = dsmoe__hash_bytes(h, &total, sizeof total);
    *bytes = total;
    return DSMOE_OK;
}

/* ------------------------------------------------------------------ paths -- */

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = (char *)malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static const char *const ckpt_files[3] = {"config.json", DSMOE__CKPT_MODEL, DSMOE__CKPT_STATE};

/* ------------------------------------------------------------------- save -- */

static dsmoe_status add_f32(dsmoe_safetensors_writer *w, const char *name, const float *p, int64_t n) {
    return dsmoe_safetensors_writer_add(w, name, DSMOE_DTYPE_F32, 1, &n, p);
}

static dsmoe_status write_model(const char *path, const dsmoe__ckpt_state *s) {
    dsmoe_safetensors_writer *w = NULL;
    dsmoe_status st = dsmoe_safetensors_writer_create(&w);
    const int64_t nt = dsmoe_train_model_tensor_count(s->tm);
    for (int64_t i = 0; st == DSMOE_OK && i < nt; i++) {
        dsmoe_train_tensor t;
        if ((st = dsmoe_train_model_tensor(s->tm, i, &t)) != DSMOE_OK) break;
        st = dsmoe_safetensors_writer_add(w, t.spec.name, DSMOE_DTYPE_F32, t.spec.ndim,
                                          t.spec.shape, t.data);
    }
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "format", "pt");
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_save(w, path);
    dsmoe_safetensors_writer_free(w);
    return st;
}

static dsmoe_status write_state(const char *path, const dsmoe__ckpt_state *s) {
    const dsmoe_run_config *rc = s->rc;
    size_t np = 0;
    dsmoe_train_model_params(s->tm, &np);
    const int32_t n_moe = dsmoe_train_model_moe_count(s->tm);
    int64_t ints[STATE_INTS] = {STATE_VERSION,
                                s->step,
                                (int64_t)s->rng.state,
                                s->tokens,
                                (int64_t)np,
                                n_moe,
                                dsmoe_train_model_tensor_count(s->tm),
                                (int64_t)s->corpus_hash,
                                s->last_eval_step,
                                s->bal != NULL};
    double flts[STATE_FLTS] = {s->last_train_loss, s->last_val_loss, s->last_val_maxvio,
                               s->elapsed_s};
    int64_t ci[DSMOE__RUN_INT_FIELDS];
    double cf[DSMOE__RUN_FLOAT_FIELDS];
    dsmoe__run_config_pack(rc, ci, cf);
    dsmoe_safetensors_writer *w = NULL;
    dsmoe_status st = dsmoe_safetensors_writer_create(&w);
    if (st != DSMOE_OK) return st;
    const int64_t n = (int64_t)np, n_si = STATE_INTS, n_sf = STATE_FLTS,
                  n_ci = DSMOE__RUN_INT_FIELDS, n_cf = DSMOE__RUN_FLOAT_FIELDS,
                  n_df = rc->n_data_files;
    char key[64], val[64], names[1024];
    if (st == DSMOE_OK) st = add_f32(w, "adamw.m", s->m, n);
    if (st == DSMOE_OK) st = add_f32(w, "adamw.v", s->v, n);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_add(w, "run.state", DSMOE_DTYPE_I64, 1, &n_si, ints);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_add(w, "run.state_f64", DSMOE_DTYPE_F64, 1, &n_sf, flts);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_add(w, "run.config_int", DSMOE_DTYPE_I64, 1, &n_ci, ci);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_add(w, "run.config_float", DSMOE_DTYPE_F64, 1, &n_cf, cf);
    if (st == DSMOE_OK && n_df > 0) {
        st = dsmoe_safetensors_writer_add(w, "data.bytes", DSMOE_DTYPE_I64, 1, &n_df, s->data_bytes);
        if (st == DSMOE_OK)
            st = dsmoe_safetensors_writer_add(w, "data.hash", DSMOE_DTYPE_I64, 1, &n_df, s->data_hash);
    }
    for (int32_t k = 0; s->bal && st == DSMOE_OK && k < n_moe; k++) {
        snprintf(key, sizeof key, "balancer.%d.", (int)dsmoe_train_model_moe_layer(s->tm, k));
        st = dsmoe_balancer_write(s->bal[k], w, key);
    }
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "format", "dsmoe.training_state");
    snprintf(val, sizeof val, "%d", STATE_VERSION);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "version", val);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "strategy", rc->strategy);
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "preset", rc->preset);
    if (st == DSMOE_OK && rc->corpus.fortunes_dir)
        st = dsmoe_safetensors_writer_set_metadata(w, "fortunes_dir", rc->corpus.fortunes_dir);
    for (int32_t i = 0; st == DSMOE_OK && i < rc->n_data_files; i++) {
        snprintf(key, sizeof key, "data_file.%d", (int)i);
        st = dsmoe_safetensors_writer_set_metadata(w, key, rc->data_files[i]);
    }
    for (int f = 0; f < 2 && st == DSMOE_OK; f++) {
        size_t o = 0;
        names[0] = '\0';
        for (int i = 0; dsmoe__run_field_name(f, i); i++)
            o += (size_t)snprintf(names + o, sizeof names - o, "%s%s", i ? "," : "",
                                  dsmoe__run_field_name(f, i));
        st = dsmoe_safetensors_writer_set_metadata(w, f ? "config_float_names" : "config_int_names",
                                                   names);
    }
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_save(w, path);
    dsmoe_safetensors_writer_free(w);
    return st;
}

dsmoe_status dsmoe__ckpt_save(const char *dir, const dsmoe__ckpt_state *s) {
    dsmoe__dir_txn t;
    dsmoe_status st = dsmoe__dir_begin(&t, dir);
    if (st != DSMOE_OK) return st;
    char *paths[3] = {0}, *sums = join(t.tmp, CKPT_SUMS);
    for (int i = 0; i < 3; i++) paths[i] = join(t.tmp, ckpt_files[i]);
    if (!paths[0] || !paths[1] || !paths[2] || !sums) {
        st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "checkpoint: out of memory");
        goto fail;
    }
    if ((st = dsmoe_model_config_write(&s->rc->model, t.tmp)) != DSMOE_OK) goto fail;
    if ((st = write_model(paths[1], s)) != DSMOE_OK) goto fail;
    if (s->before_state && (st = s->before_state(s->hook_ctx)) != DSMOE_OK) goto fail;
    if ((st = write_state(paths[2], s)) != DSMOE_OK) goto fail;
    {
        char text[512];
        size_t o = (size_t)snprintf(text, sizeof text, "dsmoe checkpoint 1\n");
        for (int i = 0; i < 3; i++) {
            uint64_t h = 0;
            int64_t bytes;
            if ((st = dsmoe__hash_file(paths[i], &h, &bytes)) != DSMOE_OK) goto fail;
            o += (size_t)snprintf(text + o, sizeof text - o, "%s %lld %016" PRIx64 "\n",
                                  ckpt_files[i], (long long)bytes, h);
        }
        FILE *f = fopen(sums, "wb");
        if (!f || fwrite(text, 1, o, f) != o || fclose(f) != 0) {
            st = dsmoe__error(DSMOE_STATUS_IO, "%s: cannot write: %s", sums, strerror(errno));
            goto fail;
        }
    }
    for (int i = 0; i < 3; i++) free(paths[i]);
    free(sums);
    return dsmoe__dir_commit(&t);
fail:
    for (int i = 0; i < 3; i++) free(paths[i]);
    free(sums);
    dsmoe__dir_abort(&t);
    return st;
}

/* ------------------------------------------------------------------- load -- */

static int all_finite(const void *p, int64_t n);

/* Tensor i is a routed expert's that a sharded model does not hold: a resume reads only
 * the rank's own experts (and every replicated tensor). */
static int not_held(dsmoe_train_model *tm, int64_t i) {
    int32_t first = 0, last = -1;
    if (!dsmoe_train_model_expert_shard(tm, &first, &last)) return 0;
    const int32_t e = dsmoe_train_model_tensor_expert(tm, i, NULL);
    return e >= 0 && (e < first || e > last);
}

/* The moments of the tensors held are finite (the rest of the arrays, padding included,
 * holds zeros by construction and is not read). */
static int moments_finite(dsmoe_train_model *tm, const char *m, const char *v) {
    const int64_t n_tensors = dsmoe_train_model_tensor_count(tm);
    for (int64_t i = 0; i < n_tensors; i++) {
        dsmoe_train_tensor t;
        dsmoe_train_model_tensor(tm, i, &t);
        if (!t.trainable || not_held(tm, i)) continue;
        const size_t at = (size_t)t.offset * sizeof(float);
        if (!all_finite(m + at, t.n) || !all_finite(v + at, t.n)) return 0;
    }
    return 1;
}

/* Checks every file of checkpoint dir against dsmoe_checksums.txt. */
static dsmoe_status verify_sums(const char *dir) {
    dsmoe_status st = dsmoe__dir_recover(dir);
    if (st != DSMOE_OK) return st;
    char *sums = join(dir, CKPT_SUMS);
    if (!sums) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "checkpoint: out of memory");
    FILE *f = fopen(sums, "rb");
    if (!f) {
        st = dsmoe__error(errno == ENOENT ? DSMOE_STATUS_FORMAT : DSMOE_STATUS_IO,
                          "%s: %s (not a dsmoe training checkpoint?)", sums, strerror(errno));
        free(sums);
        return st;
    }
    char line[512];
    int ok = fgets(line, sizeof line, f) && strcmp(line, "dsmoe checkpoint 1\n") == 0;
    for (int i = 0; ok && i < 3; i++) {
        char name[64] = "";
        long long bytes = -1;
        unsigned long long h = 0;
        if (!fgets(line, sizeof line, f) ||
            sscanf(line, "%63s %lld %16llx", name, &bytes, &h) != 3 ||
            strcmp(name, ckpt_files[i]) != 0) {
            ok = 0;
            break;
        }
        char *p = join(dir, name);
        if (!p) {
            ok = 0;
            break;
        }
        uint64_t fh = 0;
        int64_t fb = -1;
        st = dsmoe__hash_file(p, &fh, &fb);
        if (st == DSMOE_OK && fb != bytes)
            st = dsmoe__error(DSMOE_STATUS_FORMAT,
                              "%s: %lld bytes where the checkpoint recorded %lld (truncated or "
                              "changed)",
                              p, (long long)fb, bytes);
        else if (st == DSMOE_OK && fh != (uint64_t)h)
            st = dsmoe__error(DSMOE_STATUS_FORMAT,
                              "%s: its contents differ from the hash the checkpoint recorded "
                              "(corrupt or changed)",
                              p);
        free(p);
        if (st != DSMOE_OK) {
            fclose(f);
            free(sums);
            return st;
        }
    }
    fclose(f);
    if (!ok) st = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: not a dsmoe checkpoint list of files", sums);
    free(sums);
    return st;
}

/* A tensor of the state file with the dtype and element count expected. */
static dsmoe_status state_get(const dsmoe_safetensors *st, const char *path, const char *name,
                              dsmoe_dtype dt, int64_t n, dsmoe_tensor_view *v) {
    if (dsmoe_safetensors_get(st, name, v) != DSMOE_OK)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: tensor %s is missing", path, name);
    if (v->dtype != dt || v->ndim != 1 || v->shape[0] != n)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "%s: tensor %s has dtype %s and %d dims (%lld), expected %s (%lld)",
                            path, name, dsmoe_dtype_name(v->dtype), (int)v->ndim,
                            (long long)v->shape[0], dsmoe_dtype_name(dt), (long long)n);
    return DSMOE_OK;
}

static int all_finite(const void *p, int64_t n) {
    const float *f = (const float *)p;
    for (int64_t i = 0; i < n; i++) {
        float x;
        memcpy(&x, f + i, sizeof x);
        if (!isfinite(x)) return 0;
    }
    return 1;
}

/* The run config of an open state file (strings borrowed from the file; fortunes_dir
 * and data files through the store's block). */
static dsmoe_status state_config(const dsmoe_safetensors *st, const char *path,
                                 const dsmoe_model_config *model, dsmoe__run_config_store *out) {
    const char *fmt = dsmoe_safetensors_metadata(st, "format");
    const char *ver = dsmoe_safetensors_metadata(st, "version");
    if (!fmt || strcmp(fmt, "dsmoe.training_state") != 0 || !ver || atoi(ver) != STATE_VERSION)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: not a dsmoe training state of version %d",
                            path, STATE_VERSION);
    for (int f = 0; f < 2; f++) {
        const char *names = dsmoe_safetensors_metadata(st, f ? "config_float_names" : "config_int_names");
        char want[1024];
        size_t o = 0;
        want[0] = '\0';
        for (int i = 0; dsmoe__run_field_name(f, i); i++)
            o += (size_t)snprintf(want + o, sizeof want - o, "%s%s", i ? "," : "",
                                  dsmoe__run_field_name(f, i));
        if (!names || strcmp(names, want) != 0)
            return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: the run config's fields are not this "
                                "version's", path);
    }
    dsmoe_tensor_view ci, cf;
    dsmoe_status s;
    if ((s = state_get(st, path, "run.config_int", DSMOE_DTYPE_I64, DSMOE__RUN_INT_FIELDS, &ci)) != DSMOE_OK ||
        (s = state_get(st, path, "run.config_float", DSMOE_DTYPE_F64, DSMOE__RUN_FLOAT_FIELDS, &cf)) != DSMOE_OK)
        return s;
    int64_t ints[DSMOE__RUN_INT_FIELDS];
    double flts[DSMOE__RUN_FLOAT_FIELDS];
    memcpy(ints, ci.data, sizeof ints);
    memcpy(flts, cf.data, sizeof flts);
    dsmoe_run_config rc;
    memset(&rc, 0, sizeof rc);
    rc.model = *model;
    dsmoe__run_config_unpack(&rc, ints, flts);
    const char *strategy = dsmoe_safetensors_metadata(st, "strategy");
    const char *preset = dsmoe_safetensors_metadata(st, "preset");
    if (!strategy || !preset || strlen(strategy) >= sizeof rc.strategy ||
        strlen(preset) >= sizeof rc.preset || rc.n_data_files < 0 || rc.n_data_files > 100000)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: strategy, preset or data files missing", path);
    memcpy(rc.strategy, strategy, strlen(strategy) + 1);
    memcpy(rc.preset, preset, strlen(preset) + 1);
    rc.corpus.fortunes_dir = dsmoe_safetensors_metadata(st, "fortunes_dir");
    const char **files = NULL;
    if (rc.n_data_files > 0) {
        files = (const char **)calloc((size_t)rc.n_data_files, sizeof *files);
        if (!files) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", path);
        for (int32_t i = 0; i < rc.n_data_files; i++) {
            char key[64];
            snprintf(key, sizeof key, "data_file.%d", (int)i);
            if (!(files[i] = dsmoe_safetensors_metadata(st, key))) {
                free((void *)files);
                return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: metadata %s is missing", path, key);
            }
        }
        rc.data_files = files;
    }
    s = dsmoe__run_config_own(out, &rc);
    free((void *)files);
    return s;
}

dsmoe_status dsmoe__ckpt_read_config(const char *dir, dsmoe__run_config_store *out) {
    dsmoe__dir_recover(dir);
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return dsmoe__error(DSMOE_STATUS_IO, "%s: no checkpoint there (%s)", dir, strerror(errno));
    dsmoe_status s = verify_sums(dir);
    if (s != DSMOE_OK) return s;
    dsmoe_model_config model;
    if ((s = dsmoe_model_config_from_dir(dir, &model)) != DSMOE_OK) return s;
    char *path = join(dir, DSMOE__CKPT_STATE);
    if (!path) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "checkpoint: out of memory");
    dsmoe_safetensors *st = NULL;
    if ((s = dsmoe_safetensors_open(path, &st)) == DSMOE_OK) s = state_config(st, path, &model, out);
    dsmoe_safetensors_close(st);
    free(path);
    return s;
}

dsmoe_status dsmoe__ckpt_load(const char *dir, dsmoe__ckpt_state *s) {
    dsmoe_status r = verify_sums(dir);
    if (r != DSMOE_OK) return r;
    char *cfg_path = join(dir, "config.json"), *mpath = join(dir, DSMOE__CKPT_MODEL),
         *spath = join(dir, DSMOE__CKPT_STATE);
    dsmoe_safetensors *ms = NULL, *ss = NULL;
    dsmoe_balancer **nb = NULL;
    const int32_t n_moe = dsmoe_train_model_moe_count(s->tm);
    const int64_t n_tensors = dsmoe_train_model_tensor_count(s->tm);
    size_t np = 0;
    float *params = dsmoe_train_model_params(s->tm, &np);
    dsmoe__run_config_store saved = {0};
    if (!cfg_path || !mpath || !spath) {
        r = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "checkpoint: out of memory");
        goto done;
    }
    /* config.json */
    {
        dsmoe_model_config mc;
        if ((r = dsmoe_model_config_from_dir(dir, &mc)) != DSMOE_OK) goto done;
        char a[4096], b[4096];
        if (dsmoe_model_config_to_json(&mc, a, sizeof a) < 0 ||
            dsmoe_model_config_to_json(&s->rc->model, b, sizeof b) < 0 || strcmp(a, b) != 0) {
            r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: the model differs from this run's", cfg_path);
            goto done;
        }
    }
    /* training state */
    if ((r = dsmoe_safetensors_open(spath, &ss)) != DSMOE_OK) goto done;
    if ((r = state_config(ss, spath, &s->rc->model, &saved)) != DSMOE_OK) goto done;
    if ((r = dsmoe__run_config_compare(s->rc, &saved.rc)) != DSMOE_OK) {
        r = dsmoe__error_prefix(r, spath);
        goto done;
    }
    dsmoe_tensor_view vs, vf, vm, vv;
    if ((r = state_get(ss, spath, "run.state", DSMOE_DTYPE_I64, STATE_INTS, &vs)) != DSMOE_OK ||
        (r = state_get(ss, spath, "run.state_f64", DSMOE_DTYPE_F64, STATE_FLTS, &vf)) != DSMOE_OK ||
        (r = state_get(ss, spath, "adamw.m", DSMOE_DTYPE_F32, (int64_t)np, &vm)) != DSMOE_OK ||
        (r = state_get(ss, spath, "adamw.v", DSMOE_DTYPE_F32, (int64_t)np, &vv)) != DSMOE_OK)
        goto done;
    int64_t si[STATE_INTS];
    double sf[STATE_FLTS];
    memcpy(si, vs.data, sizeof si);
    memcpy(sf, vf.data, sizeof sf);
    if (si[0] != STATE_VERSION || si[1] < 0 || si[1] > s->rc->steps || si[3] < 0 ||
        si[4] != (int64_t)np || si[5] != n_moe || si[6] != n_tensors ||
        si[9] != (s->bal != NULL)) {
        r = dsmoe__error(DSMOE_STATUS_FORMAT,
                         "%s: run.state does not fit this run (step %lld of %lld, %lld parameters "
                         "for %zu, %lld MoE layers for %d)",
                         spath, (long long)si[1], (long long)s->rc->steps, (long long)si[4], np,
                         (long long)si[5], (int)n_moe);
        goto done;
    }
    if (s->rc->n_data_files > 0) {
        dsmoe_tensor_view db, dh;
        const int64_t nd = s->rc->n_data_files;
        if ((r = state_get(ss, spath, "data.bytes", DSMOE_DTYPE_I64, nd, &db)) != DSMOE_OK ||
            (r = state_get(ss, spath, "data.hash", DSMOE_DTYPE_I64, nd, &dh)) != DSMOE_OK)
            goto done;
        for (int64_t i = 0; i < nd; i++) {
            int64_t b, h;
            memcpy(&b, (const int64_t *)db.data + i, sizeof b);
            memcpy(&h, (const int64_t *)dh.data + i, sizeof h);
            if (b != s->data_bytes[i] || h != s->data_hash[i]) {
                r = dsmoe__error(DSMOE_STATUS_FORMAT,
                                 "data file %s changed since the checkpoint (%lld bytes then, %lld "
                                 "now%s)",
                                 s->rc->data_files[i], (long long)b, (long long)s->data_bytes[i],
                                 b == s->data_bytes[i] ? ", other contents" : "");
                goto done;
            }
        }
    }
    if (!moments_finite(s->tm, (const char *)vm.data, (const char *)vv.data)) {
        r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: adamw moments hold a NaN or Inf", spath);
        goto done;
    }
    if ((uint64_t)si[7] != s->corpus_hash) {
        r = dsmoe__error(DSMOE_STATUS_FORMAT,
                         "%s: the training data differ from the run's (the corpus's tokens changed)",
                         spath);
        goto done;
    }
    if (s->bal) {
        nb = (dsmoe_balancer **)calloc((size_t)n_moe, sizeof(dsmoe_balancer *));
        if (!nb) {
            r = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "checkpoint: out of memory");
            goto done;
        }
        for (int32_t k = 0; k < n_moe; k++) {
            char prefix[64];
            snprintf(prefix, sizeof prefix, "balancer.%d.", (int)dsmoe_train_model_moe_layer(s->tm, k));
            if ((r = dsmoe_balancer_read(ss, prefix, &nb[k])) != DSMOE_OK) {
                r = dsmoe__error_prefix(r, spath);
                goto done;
            }
            const dsmoe_balancer_config *a = dsmoe_balancer_get_config(nb[k]),
                                        *b = dsmoe_balancer_get_config(s->bal[k]);
            if (a->n_experts != b->n_experts || a->rule != b->rule || a->gamma != b->gamma ||
                a->gamma_after != b->gamma_after || a->gamma_until_tokens != b->gamma_until_tokens ||
                a->recenter != b->recenter) {
                r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: balancer of layer %d differs from the run's",
                                 spath, (int)dsmoe_train_model_moe_layer(s->tm, k));
                goto done;
            }
        }
    }
    /* model.safetensors: exactly the model's tensors, F32, the right shapes, finite. */
    if ((r = dsmoe_safetensors_open(mpath, &ms)) != DSMOE_OK) goto done;
    if (dsmoe_safetensors_count(ms) != n_tensors) {
        r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: %lld tensors, this model has %lld", mpath,
                         (long long)dsmoe_safetensors_count(ms), (long long)n_tensors);
        goto done;
    }
    for (int64_t i = 0; i < n_tensors; i++) {
        dsmoe_train_tensor t;
        dsmoe_tensor_view v;
        if ((r = dsmoe_train_model_tensor(s->tm, i, &t)) != DSMOE_OK) goto done;
        if (dsmoe_safetensors_get(ms, t.spec.name, &v) != DSMOE_OK) {
            r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: tensor %s is missing", mpath, t.spec.name);
            goto done;
        }
        if (v.dtype != DSMOE_DTYPE_F32 || v.ndim != t.spec.ndim || v.shape[0] != t.spec.shape[0] ||
            (t.spec.ndim == 2 && v.shape[1] != t.spec.shape[1])) {
            r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: tensor %s has dtype %s shape (%lld, %lld), "
                             "expected F32 (%lld, %lld)",
                             mpath, t.spec.name, dsmoe_dtype_name(v.dtype), (long long)v.shape[0],
                             (long long)v.shape[1], (long long)t.spec.shape[0],
                             (long long)t.spec.shape[1]);
            goto done;
        }
        if (!not_held(s->tm, i) && !all_finite(v.data, t.n)) {
            r = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: tensor %s holds a NaN or Inf", mpath, t.spec.name);
            goto done;
        }
    }
    /* All is well: install. */
    for (int64_t i = 0; i < n_tensors; i++) {
        dsmoe_train_tensor t;
        dsmoe_tensor_view v;
        dsmoe_train_model_tensor(s->tm, i, &t);
        dsmoe_safetensors_get(ms, t.spec.name, &v);
        if (!t.trainable || not_held(s->tm, i)) continue;
        memcpy(t.data, v.data, (size_t)t.n * sizeof(float));
        /* the moments of the trainable tensors (elsewhere they are 0 in both arrays) */
        const size_t at = (size_t)t.offset * sizeof(float), len = (size_t)t.n * sizeof(float);
        memcpy(s->m + t.offset, (const char *)vm.data + at, len);
        memcpy(s->v + t.offset, (const char *)vv.data + at, len);
    }
    (void)params;
    if (s->bal) {
        for (int32_t k = 0; k < n_moe; k++) {
            dsmoe_balancer_free(s->bal[k]);
            s->bal[k] = nb[k];
            nb[k] = NULL;
            if ((r = dsmoe_train_model_set_bias(s->tm, k, dsmoe_balancer_bias(s->bal[k]))) != DSMOE_OK)
                goto done;
        }
    }
    s->step = si[1];
    s->rng.state = (uint64_t)si[2];
    s->tokens = si[3];
    s->last_eval_step = si[8];
    s->last_train_loss = sf[0];
    s->last_val_loss = sf[1];
    s->last_val_maxvio = sf[2];
    s->elapsed_s = sf[3];
done:
    if (nb)
        for (int32_t k = 0; k < n_moe; k++) dsmoe_balancer_free(nb[k]);
    free((void *)nb);
    free(saved.block);
    dsmoe_safetensors_close(ms);
    dsmoe_safetensors_close(ss);
    free(cfg_path);
    free(mpath);
    free(spath);
    return r;
}
