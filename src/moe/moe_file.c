/*
 * moe_file.c — the MoE layer and its files: the routing config dsmoe saves with a
 * layer (__metadata__ "dsmoe.moe_config[@prefix]") read back, every tensor checked
 * (presence, dtype, shape, finiteness) before anything is allocated, layer discovery
 * in a checkpoint, the one-call load, and the forward over inputs of any length in
 * chunks of the reserved token count. Built on the public layer API; the layer's
 * storage stays in moe.c.
 */
#include "io/io_internal.h"
#include "moe/moe_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- metadata -- */

int dsmoe__moe_config_key(char *buf, size_t size, const char *prefix) {
    int n = prefix && prefix[0] ? snprintf(buf, size, "dsmoe.moe_config@%s", prefix)
                                : snprintf(buf, size, "dsmoe.moe_config");
    return n >= 0 && (size_t)n < size;
}

/* A strict reader for the one-line JSON of dsmoe_moe_config_json: an object of known
 * keys (each exactly once), values that are numbers, plain strings (no escapes),
 * true / false, and the nested "router" object. */
typedef struct cfg_reader {
    const char *s;
    size_t pos;
    const char *key; /* metadata key, for messages */
} cfg_reader;

static void cr_ws(cfg_reader *r) {
    while (r->s[r->pos] == ' ' || r->s[r->pos] == '\t' || r->s[r->pos] == '\n' ||
           r->s[r->pos] == '\r')
        r->pos++;
}

static dsmoe_status cr_fail(const cfg_reader *r, const char *what) {
    return dsmoe__error(DSMOE_STATUS_FORMAT, "__metadata__ %s at byte %zu: %s", r->key, r->pos,
                        what);
}

static int cr_eat(cfg_reader *r, char c) {
    cr_ws(r);
    if (r->s[r->pos] != c) return 0;
    r->pos++;
    return 1;
}

/* A string without escapes into buf. */
static dsmoe_status cr_string(cfg_reader *r, char *buf, size_t size) {
    if (!cr_eat(r, '"')) return cr_fail(r, "expected a string");
    size_t n = 0;
    while (r->s[r->pos] && r->s[r->pos] != '"') {
        if (r->s[r->pos] == '\\' || n + 1 >= size) return cr_fail(r, "unexpected string");
        buf[n++] = r->s[r->pos++];
    }
    if (r->s[r->pos] != '"') return cr_fail(r, "unterminated string");
    r->pos++;
    buf[n] = '\0';
    return DSMOE_OK;
}

static dsmoe_status cr_number(cfg_reader *r, double *v) {
    cr_ws(r);
    const char *p = r->s + r->pos;
    size_t n = strspn(p, "-+.0123456789eE");
    char tmp[64];
    if (n == 0 || n >= sizeof tmp) return cr_fail(r, "expected a number");
    memcpy(tmp, p, n);
    tmp[n] = '\0';
    char *end = NULL;
    errno = 0;
    double x = strtod(tmp, &end);
    if (end != tmp + n || errno != 0 || !isfinite(x)) return cr_fail(r, "bad number");
    r->pos += n;
    *v = x;
    return DSMOE_OK;
}

static dsmoe_status cr_int(cfg_reader *r, int32_t *v) {
    double x = 0.0;
    dsmoe_status s = cr_number(r, &x);
    if (s != DSMOE_OK) return s;
    if (x != floor(x) || x < -2147483648.0 || x > 2147483647.0)
        return cr_fail(r, "expected an integer");
    *v = (int32_t)x;
    return DSMOE_OK;
}

static dsmoe_status cr_float(cfg_reader *r, float *v) {
    double x = 0.0;
    dsmoe_status s = cr_number(r, &x);
    if (s == DSMOE_OK) *v = (float)x;
    return s;
}

static dsmoe_status cr_bool(cfg_reader *r, int32_t *v) {
    cr_ws(r);
    if (strncmp(r->s + r->pos, "true", 4) == 0) {
        r->pos += 4;
        *v = 1;
    } else if (strncmp(r->s + r->pos, "false", 5) == 0) {
        r->pos += 5;
        *v = 0;
    } else {
        return cr_fail(r, "expected true or false");
    }
    return DSMOE_OK;
}

/* One of two names: *v = 0 for a, 1 for b. */
static dsmoe_status cr_choice(cfg_reader *r, const char *a, const char *b, int *v) {
    char buf[32];
    dsmoe_status s = cr_string(r, buf, sizeof buf);
    if (s != DSMOE_OK) return s;
    if (strcmp(buf, a) == 0) *v = 0;
    else if (strcmp(buf, b) == 0) *v = 1;
    else return cr_fail(r, "unknown value");
    return DSMOE_OK;
}

static dsmoe_status cr_router(cfg_reader *r, dsmoe_router_config *c) {
    static const char *const keys[] = {"n_experts", "n_groups",  "topk_groups", "top_k",
                                       "score_func", "group_score", "group_topm", "group_mask",
                                       "normalize", "norm_eps",  "scale",     "use_bias",
                                       "precision", "nonfinite"};
    const unsigned nkeys = sizeof keys / sizeof keys[0];
    unsigned seen = 0;
    if (!cr_eat(r, '{')) return cr_fail(r, "expected the router object");
    for (;;) {
        char key[32];
        dsmoe_status s = cr_string(r, key, sizeof key);
        if (s != DSMOE_OK) return s;
        if (!cr_eat(r, ':')) return cr_fail(r, "expected ':'");
        unsigned k = 0;
        while (k < nkeys && strcmp(key, keys[k]) != 0) k++;
        if (k == nkeys) return cr_fail(r, "unknown router key");
        if (seen & (1u << k)) return cr_fail(r, "repeated router key");
        seen |= 1u << k;
        int ch = 0;
        switch (k) {
        case 0: s = cr_int(r, &c->n_experts); break;
        case 1: s = cr_int(r, &c->n_groups); break;
        case 2: s = cr_int(r, &c->topk_groups); break;
        case 3: s = cr_int(r, &c->top_k); break;
        case 4:
            s = cr_choice(r, "sigmoid", "softmax", &ch);
            c->score_func = ch ? DSMOE_SCORE_FUNC_SOFTMAX : DSMOE_SCORE_FUNC_SIGMOID;
            break;
        case 5:
            s = cr_choice(r, "max", "topsum", &ch);
            c->group_score = ch ? DSMOE_GROUP_SCORE_TOPSUM : DSMOE_GROUP_SCORE_MAX;
            break;
        case 6: s = cr_int(r, &c->group_topm); break;
        case 7:
            s = cr_choice(r, "exclude", "zero", &ch);
            c->group_mask = ch ? DSMOE_GROUP_MASK_ZERO : DSMOE_GROUP_MASK_EXCLUDE;
            break;
        case 8: s = cr_bool(r, &c->normalize); break;
        case 9: s = cr_float(r, &c->norm_eps); break;
        case 10: s = cr_float(r, &c->scale); break;
        case 11: s = cr_bool(r, &c->use_bias); break;
        case 12:
            s = cr_choice(r, "fp32", "bf16", &ch);
            c->precision = ch ? DSMOE_PRECISION_BF16 : DSMOE_PRECISION_FP32;
            break;
        default:
            s = cr_choice(r, "error", "sanitize", &ch);
            c->nonfinite = ch ? DSMOE_NONFINITE_SANITIZE : DSMOE_NONFINITE_ERROR;
            break;
        }
        if (s != DSMOE_OK) return s;
        if (cr_eat(r, '}')) break;
        if (!cr_eat(r, ',')) return cr_fail(r, "expected ',' or '}'");
    }
    if (seen != (1u << nkeys) - 1) return cr_fail(r, "a router key is missing");
    return DSMOE_OK;
}

static dsmoe_status cr_config(cfg_reader *r, dsmoe_moe_config *c) {
    static const char *const keys[] = {"hidden_size",       "moe_intermediate_size",
                                       "n_routed_experts",  "num_experts_per_tok",
                                       "n_shared_experts",  "weight_dtype",
                                       "capacity_factor",   "router"};
    const unsigned nkeys = sizeof keys / sizeof keys[0];
    unsigned seen = 0;
    int32_t E = 0, K = 0;
    if (!cr_eat(r, '{')) return cr_fail(r, "expected an object");
    for (;;) {
        char key[32];
        dsmoe_status s = cr_string(r, key, sizeof key);
        if (s != DSMOE_OK) return s;
        if (!cr_eat(r, ':')) return cr_fail(r, "expected ':'");
        unsigned k = 0;
        while (k < nkeys && strcmp(key, keys[k]) != 0) k++;
        if (k == nkeys) return cr_fail(r, "unknown key");
        if (seen & (1u << k)) return cr_fail(r, "repeated key");
        seen |= 1u << k;
        int ch = 0;
        switch (k) {
        case 0: s = cr_int(r, &c->hidden_size); break;
        case 1: s = cr_int(r, &c->expert_size); break;
        case 2: s = cr_int(r, &E); break;
        case 3: s = cr_int(r, &K); break;
        case 4: s = cr_int(r, &c->n_shared); break;
        case 5:
            s = cr_choice(r, "F32", "BF16", &ch);
            c->weight_dtype = ch ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
            break;
        case 6: s = cr_float(r, &c->capacity_factor); break;
        default: s = cr_router(r, &c->router); break;
        }
        if (s != DSMOE_OK) return s;
        if (cr_eat(r, '}')) break;
        if (!cr_eat(r, ',')) return cr_fail(r, "expected ',' or '}'");
    }
    cr_ws(r);
    if (r->s[r->pos]) return cr_fail(r, "text after the object");
    if (seen != (1u << nkeys) - 1) return cr_fail(r, "a key is missing");
    if (E != c->router.n_experts || K != c->router.top_k)
        return cr_fail(r, "n_routed_experts / num_experts_per_tok disagree with the router's");
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_saved_config(const dsmoe_safetensors *st, const char *prefix,
                                    dsmoe_moe_config *out) {
    if (!st || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_saved_config: NULL argument");
    char key[600];
    if (!dsmoe__moe_config_key(key, sizeof key, prefix))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "tensor prefix too long");
    const char *json = dsmoe_safetensors_metadata(st, key);
    if (!json && prefix && prefix[0]) {
        /* files of dsmoe_moe_save before per-prefix keys: one layer, the plain key */
        json = dsmoe_safetensors_metadata(st, "dsmoe.moe_config");
        if (json) snprintf(key, sizeof key, "dsmoe.moe_config");
    }
    if (!json)
        return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                            "no saved layer config (__metadata__ '%s') in the file", key);
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    cfg_reader r = {json, 0, key};
    dsmoe_status s = cr_config(&r, &c);
    if (s != DSMOE_OK) return s;
    if (dsmoe_moe_config_validate(&c) != DSMOE_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
        return dsmoe__error(DSMOE_STATUS_FORMAT, "__metadata__ %s: %s", key, msg);
    }
    *out = c;
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- shapes -- */

static int moe_name(char *buf, size_t size, const char *prefix, const char *name) {
    int n = snprintf(buf, size, "%s%s", prefix ? prefix : "", name);
    return n >= 0 && (size_t)n < size;
}

static dsmoe_status moe_check_version(const dsmoe_safetensors *st) {
    const char *ver = dsmoe_safetensors_metadata(st, "dsmoe.format_version");
    if (!ver) return DSMOE_OK;
    char *end = NULL;
    long v = strtol(ver, &end, 10);
    if (end == ver || *end != '\0' || v < 1)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "__metadata__ dsmoe.format_version '%s' is not a positive integer", ver);
    if (v > DSMOE_MOE_FORMAT_VERSION)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "file written in dsmoe format version %ld, this library reads up to "
                            "%d: upgrade dsmoe (%s)",
                            v, DSMOE_MOE_FORMAT_VERSION, dsmoe_version());
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_config_from_safetensors(dsmoe_moe_config *cfg,
                                               const dsmoe_safetensors *st,
                                               const char *prefix) {
    if (!cfg || !st)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_config_from_safetensors: NULL argument");
    char name[512];
    dsmoe_status s = moe_check_version(st);
    if (s != DSMOE_OK) return s;
    dsmoe_moe_config saved;
    dsmoe_moe_config_default(&saved);
    s = dsmoe_moe_saved_config(st, prefix, &saved);
    const int have_saved = s == DSMOE_OK;
    if (s != DSMOE_OK && s != DSMOE_STATUS_NOT_FOUND) return s;
    dsmoe_tensor_view g, e0, sg;
    if (!moe_name(name, sizeof name, prefix, "gate.weight"))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "tensor prefix too long");
    s = dsmoe_safetensors_get(st, name, &g);
    if (s != DSMOE_OK)
        return dsmoe__error(s, "gate weight '%s' not found in the file", name);
    if (g.ndim != 2 || g.shape[0] < 1 || g.shape[1] < 1 || g.shape[0] > DSMOE_MAX_EXPERTS ||
        g.shape[1] > (1 << 20))
        return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                            "tensor '%s': expected shape (E, D), got %d dims (%lld, %lld)", name,
                            (int)g.ndim, (long long)g.shape[0],
                            (long long)(g.ndim > 1 ? g.shape[1] : 0));
    int64_t E = g.shape[0], D = g.shape[1];
    moe_name(name, sizeof name, prefix, "experts.0.gate_proj.weight");
    s = dsmoe_safetensors_get(st, name, &e0);
    if (s != DSMOE_OK)
        return dsmoe__error(s, "expert weight '%s' not found in the file", name);
    if (e0.ndim != 2 || e0.shape[1] != D || e0.shape[0] < 1 || e0.shape[0] > (1 << 20))
        return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                            "tensor '%s': expected shape (F, %lld), got %d dims (%lld, %lld)",
                            name, (long long)D, (int)e0.ndim, (long long)e0.shape[0],
                            (long long)(e0.ndim > 1 ? e0.shape[1] : 0));
    int64_t F = e0.shape[0];
    int32_t ns = cfg->n_shared;
    moe_name(name, sizeof name, prefix, "shared_experts.gate_proj.weight");
    s = dsmoe_safetensors_get(st, name, &sg);
    if (s == DSMOE_OK) {
        if (sg.ndim != 2 || sg.shape[1] != D || sg.shape[0] % F != 0 || sg.shape[0] < F)
            return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                                "tensor '%s': expected shape (N_s·%lld, %lld), got %d dims "
                                "(%lld, %lld)",
                                name, (long long)F, (long long)D, (int)sg.ndim,
                                (long long)sg.shape[0], (long long)(sg.ndim > 1 ? sg.shape[1] : 0));
        int64_t inferred = sg.shape[0] / F;
        if (ns < 0)
            ns = (int32_t)(inferred > 64 ? 65 : inferred);
        else if (ns != inferred)
            return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                                "tensor '%s' has %lld rows = %lld shared experts of size %lld, "
                                "but %d shared experts were requested",
                                name, (long long)sg.shape[0], (long long)inferred, (long long)F,
                                (int)ns);
    } else {
        if (ns < 0) ns = 0;
        if (ns > 0)
            return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                                "%d shared experts requested but tensor '%s' is not in the file",
                                (int)ns, name);
    }
    if (have_saved && (saved.hidden_size != D || saved.expert_size != F ||
                       saved.router.n_experts != E || saved.n_shared != ns))
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "the saved config of layer '%s' (D %d, F %d, E %d, N_s %d) disagrees "
                            "with its tensors (D %lld, F %lld, E %lld, N_s %d)",
                            prefix ? prefix : "", (int)saved.hidden_size, (int)saved.expert_size,
                            (int)saved.router.n_experts, (int)saved.n_shared, (long long)D,
                            (long long)F, (long long)E, (int)ns);
    dsmoe_clear_error();
    cfg->hidden_size = (int32_t)D;
    cfg->expert_size = (int32_t)F;
    cfg->router.n_experts = (int32_t)E;
    cfg->n_shared = ns;
    if (have_saved) {
        cfg->router = saved.router;
        cfg->capacity_factor = saved.capacity_factor;
    }
    return DSMOE_OK;
}

/* Tensor i of a layer of config c, in checkpoint order (as dsmoe_moe_tensor_at):
 * name, ndim, shape, trainable. */
static void moe_tensor_spec(const dsmoe_moe_config *c, int64_t i, dsmoe_moe_tensor *t) {
    memset(t, 0, sizeof *t);
    const int64_t D = c->hidden_size, F = c->expert_size, Fs = (int64_t)c->n_shared * F;
    t->ndim = 2;
    t->trainable = 1;
    t->dtype = c->weight_dtype;
    if (i == 0) {
        snprintf(t->name, sizeof t->name, "gate.weight");
        t->shape[0] = c->router.n_experts;
        t->shape[1] = D;
        return;
    }
    if (i == 1 && c->router.use_bias) {
        snprintf(t->name, sizeof t->name, "gate.e_score_correction_bias");
        t->dtype = DSMOE_DTYPE_F32;
        t->ndim = 1;
        t->shape[0] = c->router.n_experts;
        t->trainable = 0;
        return;
    }
    const int64_t j = i - 1 - (c->router.use_bias ? 1 : 0), e = j / 3, part = j % 3;
    static const char *const parts[3] = {"gate_proj", "up_proj", "down_proj"};
    int64_t f = F;
    if (e < c->router.n_experts) {
        snprintf(t->name, sizeof t->name, "experts.%lld.%s.weight", (long long)e, parts[part]);
    } else {
        snprintf(t->name, sizeof t->name, "shared_experts.%s.weight", parts[part]);
        f = Fs;
    }
    t->shape[0] = part == 2 ? D : f;
    t->shape[1] = part == 2 ? f : D;
}

/* First element of view v that is NaN or ±Inf, or -1. Reads the bits (unaligned). */
static int64_t moe_first_nonfinite(const dsmoe_tensor_view *v, int64_t n) {
    const unsigned char *p = (const unsigned char *)v->data;
    if (v->dtype == DSMOE_DTYPE_F32) {
        for (int64_t j = 0; j < n; j++) {
            uint32_t b;
            memcpy(&b, p + (size_t)j * 4, 4);
            if ((b & 0x7f800000u) == 0x7f800000u) return j;
        }
    } else {
        const uint16_t mask = v->dtype == DSMOE_DTYPE_BF16 ? 0x7f80u : 0x7c00u;
        for (int64_t j = 0; j < n; j++) {
            uint16_t b;
            memcpy(&b, p + (size_t)j * 2, 2);
            if ((b & mask) == mask) return j;
        }
    }
    return -1;
}

dsmoe_status dsmoe_moe_check_safetensors(const dsmoe_moe_config *cfg,
                                         const dsmoe_safetensors *st, const char *prefix) {
    if (!cfg || !st)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_check_safetensors: NULL argument");
    dsmoe_status s = dsmoe_moe_config_validate(cfg);
    if (s != DSMOE_OK) return s;
    const int64_t n = 1 + (cfg->router.use_bias ? 1 : 0) + 3 * (int64_t)cfg->router.n_experts +
                      (cfg->n_shared ? 3 : 0);
    char name[512];
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        moe_tensor_spec(cfg, i, &t);
        if (!moe_name(name, sizeof name, prefix, t.name))
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "tensor prefix too long");
        dsmoe_tensor_view v;
        s = dsmoe_safetensors_get(st, name, &v);
        if (s != DSMOE_OK)
            return dsmoe__error(DSMOE_STATUS_NOT_FOUND, "tensor '%s' is missing from the file",
                                name);
        if (v.dtype != DSMOE_DTYPE_F32 && v.dtype != DSMOE_DTYPE_BF16 &&
            v.dtype != DSMOE_DTYPE_F16)
            return dsmoe__error(DSMOE_STATUS_FORMAT,
                                "tensor '%s' has dtype %s; expected F32, BF16 or F16", name,
                                dsmoe_dtype_name(v.dtype));
        int ok = v.ndim == t.ndim;
        for (int32_t d = 0; ok && d < t.ndim; d++) ok = v.shape[d] == t.shape[d];
        if (!ok) {
            char got[128] = "", want[64];
            size_t used = 0;
            for (int32_t d = 0; d < v.ndim && used < sizeof got; d++)
                used += (size_t)snprintf(got + used, sizeof got - used, "%s%lld", d ? ", " : "",
                                         (long long)v.shape[d]);
            if (t.ndim == 1)
                snprintf(want, sizeof want, "%lld", (long long)t.shape[0]);
            else
                snprintf(want, sizeof want, "%lld, %lld", (long long)t.shape[0],
                         (long long)t.shape[1]);
            return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                                "tensor '%s' has shape (%s); the layer expects (%s)", name, got,
                                want);
        }
    }
    /* values: only after every shape is known good (a short file fails fast) */
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        moe_tensor_spec(cfg, i, &t);
        moe_name(name, sizeof name, prefix, t.name);
        dsmoe_tensor_view v;
        dsmoe_safetensors_get(st, name, &v);
        const int64_t cols = t.ndim == 2 ? t.shape[1] : 1;
        const int64_t j = moe_first_nonfinite(&v, t.shape[0] * cols);
        if (j >= 0) {
            float bad;
            dsmoe_tensor_view one = v;
            const size_t es = dsmoe_dtype_size(v.dtype);
            one.ndim = 1;
            one.shape[0] = 1;
            one.shape[1] = 0;
            one.data = (const char *)v.data + (size_t)j * es;
            one.nbytes = es;
            dsmoe_tensor_to_f32(&one, &bad);
            if (t.ndim == 1)
                return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                    "tensor '%s': element %lld is %g (the bias must be finite)",
                                    name, (long long)j, (double)bad);
            return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                "tensor '%s': element (%lld, %lld) is %g (weights must be finite)",
                                name, (long long)(j / cols), (long long)(j % cols), (double)bad);
        }
    }
    dsmoe_clear_error();
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- discovery -- */

/* Calls visit(prefix) for each P with P"gate.weight" (P empty or ending in '.') and
 * P"experts.0.gate_proj.weight", in header order; stops when visit returns non-zero. */
static int64_t moe_scan_layers(const dsmoe_safetensors *st, int64_t want, char *buf, size_t size,
                               char *second, size_t second_size) {
    const int64_t n = dsmoe_safetensors_count(st);
    const size_t sl = strlen("gate.weight");
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_tensor_view v;
        if (dsmoe_safetensors_at(st, i, &v) != DSMOE_OK) continue;
        size_t len = strlen(v.name);
        if (len < sl || strcmp(v.name + len - sl, "gate.weight") != 0) continue;
        size_t pl = len - sl;
        if (pl > 0 && v.name[pl - 1] != '.') continue; /* e.g. "...mlp.gate.weight" */
        if (pl >= 480) continue;
        char cand[480], probe[512];
        memcpy(cand, v.name, pl);
        cand[pl] = '\0';
        snprintf(probe, sizeof probe, "%sexperts.0.gate_proj.weight", cand);
        dsmoe_tensor_view e0;
        if (dsmoe_safetensors_get(st, probe, &e0) != DSMOE_OK) continue;
        if (found == want && buf) snprintf(buf, size, "%s", cand);
        if (found == want + 1 && second) snprintf(second, second_size, "%s", cand);
        found++;
    }
    dsmoe_clear_error();
    return found;
}

int64_t dsmoe_moe_layer_count(const dsmoe_safetensors *st) {
    return st ? moe_scan_layers(st, -1, NULL, 0, NULL, 0) : 0;
}

dsmoe_status dsmoe_moe_layer_prefix(const dsmoe_safetensors *st, int64_t i, char *buf,
                                    size_t size) {
    if (!st || !buf || size == 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_layer_prefix: NULL argument");
    char tmp[480] = "";
    int64_t n = moe_scan_layers(st, i, tmp, sizeof tmp, NULL, 0);
    if (i < 0 || i >= n)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_layer_prefix: layer %lld out of range (the file holds %lld)",
                            (long long)i, (long long)n);
    if (strlen(tmp) >= size)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_layer_prefix: buffer of %zu bytes is too small", size);
    snprintf(buf, size, "%s", tmp);
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_find_prefix(const dsmoe_safetensors *st, char *buf, size_t size,
                                   int64_t *n_found) {
    if (n_found) *n_found = 0;
    if (!st || !buf || size == 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_find_prefix: NULL argument");
    char first[480] = "", second[480] = "";
    int64_t n = moe_scan_layers(st, 0, first, sizeof first, second, sizeof second);
    if (n_found) *n_found = n;
    if (n == 0)
        return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                            "no MoE layer in the file: no tensor pair <prefix>gate.weight and "
                            "<prefix>experts.0.gate_proj.weight");
    if (n > 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "the file holds %lld MoE layers ('%s', '%s', ...): choose one prefix",
                            (long long)n, first, second);
    if (strlen(first) >= size)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_find_prefix: buffer of %zu bytes is too small", size);
    snprintf(buf, size, "%s", first);
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- one-call load -- */

dsmoe_status dsmoe_moe_load_from(const dsmoe_safetensors *st, const char *prefix,
                                 const dsmoe_moe_config *opts, dsmoe_moe **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_load: NULL out");
    *out = NULL;
    if (!st) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_load: NULL file");
    char found[480] = "";
    if (!prefix) {
        dsmoe_status s = dsmoe_moe_find_prefix(st, found, sizeof found, NULL);
        if (s != DSMOE_OK) return s;
        prefix = found;
    }
    dsmoe_moe_config cfg;
    if (opts) {
        cfg = *opts;
    } else {
        dsmoe_moe_config_default(&cfg);
        cfg.n_shared = -1;
    }
    dsmoe_status s = dsmoe_moe_config_from_safetensors(&cfg, st, prefix);
    if (s != DSMOE_OK) return s;
    s = dsmoe_moe_check_safetensors(&cfg, st, prefix); /* before anything is allocated */
    if (s != DSMOE_OK) return s;
    dsmoe_moe *m = NULL;
    s = dsmoe_moe_create(&cfg, &m);
    if (s != DSMOE_OK) return s;
    s = dsmoe__moe_load(m, st, prefix, 1);
    if (s != DSMOE_OK) {
        dsmoe_moe_free(m);
        return s;
    }
    *out = m;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_load(const char *path, const char *prefix, const dsmoe_moe_config *opts,
                            dsmoe_moe **out) {
    if (out) *out = NULL;
    if (!path || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_load: NULL argument");
    dsmoe_safetensors *st = NULL;
    dsmoe_status s = dsmoe_safetensors_open(path, &st);
    if (s != DSMOE_OK) return s;
    s = dsmoe_moe_load_from(st, prefix, opts, out);
    dsmoe_safetensors_close(st);
    if (s != DSMOE_OK) return dsmoe__error_prefix(s, path);
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- long inputs -- */

dsmoe_status dsmoe_moe_forward_chunked(dsmoe_moe *moe, float *y, const float *x, int64_t T,
                                       int n_threads, dsmoe_moe_routing_out *r) {
    if (!moe)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_forward_chunked: NULL layer");
    if (T < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_forward_chunked: T = %lld < 0",
                            (long long)T);
    const dsmoe_moe_config *c = dsmoe_moe_get_config(moe);
    const int64_t chunk = c->max_tokens, D = c->hidden_size, E = c->router.n_experts;
    const int64_t K = c->router.top_k;
    if (r) {
        r->n_dropped = 0;
        if (r->counts) memset(r->counts, 0, (size_t)E * sizeof(int64_t));
    }
    if (T == 0) return dsmoe_moe_forward(moe, y, x, 0, n_threads);
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        const int64_t n = T - t0 < chunk ? T - t0 : chunk;
        dsmoe_status s = dsmoe_moe_forward(moe, y + (size_t)(t0 * D), x + (size_t)(t0 * D), n,
                                           n_threads);
        if (s != DSMOE_OK) {
            if (t0 == 0) return s;
            char pre[96];
            snprintf(pre, sizeof pre, "chunk of tokens %lld..%lld (numbers below within it)",
                     (long long)t0, (long long)(t0 + n - 1));
            return dsmoe__error_prefix(s, pre);
        }
        if (!r) continue;
        const dsmoe_moe_routing *ro = dsmoe_moe_last_routing(moe);
        if (r->indices)
            memcpy(r->indices + t0 * K, ro->indices, (size_t)(n * K) * sizeof(int32_t));
        if (r->weights) memcpy(r->weights + t0 * K, ro->weights, (size_t)(n * K) * sizeof(float));
        if (r->scores) memcpy(r->scores + t0 * E, ro->scores, (size_t)(n * E) * sizeof(float));
        if (r->logits) memcpy(r->logits + t0 * E, ro->logits, (size_t)(n * E) * sizeof(float));
        if (r->counts)
            for (int64_t e = 0; e < E; e++) r->counts[e] += ro->counts[e];
        r->n_dropped += ro->n_dropped;
    }
    return DSMOE_OK;
}
