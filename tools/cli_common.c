/* cli_common.c — helpers shared by the dsmoe subcommands: errors, option parsing,
 * the router flags common to route / simulate / layer, and .npy loading. */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cli_fail(int code, const char *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "dsmoe %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return code;
}

int cli_fail_status(const char *cmd, const char *what, dsmoe_status st) {
    return cli_fail(CLI_RUNTIME, cmd, "%s: %s: %s", what, dsmoe_strerror(st), dsmoe_last_error());
}

int cli_fail_file(int code, const char *cmd, const char *path) {
    const char *msg = dsmoe_last_error();
    size_t n = strlen(path);
    if (strncmp(msg, path, n) == 0 && msg[n] == ':') return cli_fail(code, cmd, "%s", msg);
    return cli_fail(code, cmd, "%s: %s", path, msg);
}

/* Library config fields and the flags that set them. Names with an underscore are
 * replaced wherever they stand as a word; plain words ("gamma", "scale") only in the
 * validators' "name = value" form, so that prose is left alone. "name = value"
 * becomes "--flag value". */
static const struct {
    const char *field, *flag;
} cli_field_flags[] = {
    /* router (dsmoe_router_config) */
    {"n_experts", "--experts"},
    {"n_groups", "--groups"},
    {"topk_groups", "--topk-groups"},
    {"top_k", "--top-k"},
    {"group_topm", "N of --group-score topNsum"},
    {"score_func", "--score"},
    {"group_score", "--group-score"},
    {"group_mask", "--mask"},
    {"normalize", "--normalize"},
    {"norm_eps", "--norm-eps"},
    {"scale", "--scale"},
    {"use_bias", "--bias"},
    {"precision", "--precision"},
    {"nonfinite", "--nonfinite"},
    /* balancer (dsmoe_balancer_config) */
    {"rule", "--rule"},
    {"gamma", "--gamma"},
    {"gamma_after", "--gamma-after"},
    {"gamma_until_tokens", "--gamma-until"},
    {"recenter", "--recenter"},
    /* traffic and simulation (dsmoe_traffic_config, dsmoe_sim_config) */
    {"steps", "--steps"},
    {"tokens", "--tokens"},
    {"seq_len", "--seq-len"},
    {"n_domains", "--domains"},
    {"skew", "--skew"},
    {"noise", "--noise"},
    {"drift", "--drift"},
    {"seed", "--seed"},
    {"alpha", "--alpha"},
    {"threshold", "--threshold"},
    {"last_fraction", "--last"},
    {"seq_count", "--seq-count"},
    {"n_threads", "--threads"},
    {"n_strategies", "--compare"},
    /* MoE layer (dsmoe_moe_config) */
    {"n_shared", "--shared-experts"},
    {"capacity_factor", "--capacity-factor"},
    {"weight_dtype", "--dtype"},
    {"weight_layout", "--layout"},
};

static int is_word_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

void cli_flag_message(const char *msg, char *out, size_t cap) {
    size_t o = 0;
    if (cap == 0) return;
    for (size_t i = 0; msg[i] && o + 1 < cap;) {
        int done = 0;
        if (is_word_char(msg[i]) && (i == 0 || !is_word_char(msg[i - 1]))) {
            size_t n = 0;
            while (is_word_char(msg[i + n])) n++;
            for (size_t f = 0; f < sizeof cli_field_flags / sizeof cli_field_flags[0]; f++) {
                const char *name = cli_field_flags[f].field;
                if (strlen(name) != n || strncmp(msg + i, name, n) != 0) continue;
                int assign = strncmp(msg + i + n, " = ", 3) == 0;
                if (!assign && !strchr(name, '_')) break;
                const char *flag = cli_field_flags[f].flag;
                /* "N of --group-score topNsum = 5" keeps its "="; a flag takes the value */
                int keep_eq = strchr(flag, ' ') != NULL;
                o += (size_t)snprintf(out + o, cap - o, "%s%s", flag, assign && !keep_eq ? " " : "");
                if (o >= cap) o = cap - 1;
                i += n + (assign && !keep_eq ? 3 : 0);
                done = 1;
                break;
            }
            if (!done) { /* copy the whole word */
                for (size_t k = 0; k < n && o + 1 < cap; k++) out[o++] = msg[i + k];
                i += n;
                continue;
            }
        }
        if (!done) out[o++] = msg[i++];
    }
    out[o] = '\0';
}

int cli_fail_config(int code, const char *cmd, const char *fmt, ...) {
    char raw[1024], mapped[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    cli_flag_message(raw, mapped, sizeof mapped);
    return cli_fail(code, cmd, "%s", mapped);
}

int cli_opt(int argc, char **argv, int *i, const char *name, const char **value, int *missing) {
    if (strcmp(argv[*i], name) != 0) return 0;
    if (*i + 1 >= argc) {
        *missing = 1;
        *value = NULL;
        return 1;
    }
    *value = argv[++*i];
    return 1;
}

int cli_parse_int(const char *s, long long lo, long long hi, long long *out) {
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

int cli_parse_float(const char *s, double *out) {
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

int cli_stderr_is_tty(void) { return isatty(2); }

const char *const cli_router_help =
    "router options (defaults from --preset, deepseek-v3 unless given):\n"
    "  --preset NAME          deepseek-v3 | deepseek-v3-hf | deepseek-v2 | moonlight | mixtral | qwen-moe\n"
    "  --experts E            routed experts\n"
    "  --groups G             expert groups (E divisible by G)\n"
    "  --topk-groups TG       groups kept per token\n"
    "  --top-k K              experts per token\n"
    "  --score sigmoid|softmax\n"
    "  --group-score max|top2sum|topNsum   group score rule (topNsum: sum of the N largest)\n"
    "  --mask exclude|zero    dropped groups: excluded (official -inf) or zero-filled (Hugging Face)\n"
    "  --normalize | --no-normalize        divide the K weights by their sum\n"
    "  --norm-eps X           added to that sum (default 0; Hugging Face uses 1e-20)\n"
    "  --scale S              routed scaling factor\n"
    "  --precision fp32|bf16  fp32, or bit-exact emulation of the official bf16 inference path\n"
    "  --bias B.npy           selection bias (E) float32 (default: zeros when the config uses a bias)\n"
    "  --no-bias              route without a bias (group score rule unchanged)\n"
    "  --nonfinite error|sanitize          NaN/Inf logits: error (default) or clamp\n";

int cli_router_begin(const char *cmd, int argc, char **argv, cli_router_flags *f) {
    memset(f, 0, sizeof *f);
    const char *preset = "deepseek-v3";
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--preset") == 0) preset = argv[i + 1];
    dsmoe_status st = dsmoe_router_preset(preset, &f->cfg);
    if (st != DSMOE_OK) {
        cli_fail(CLI_USAGE, cmd, "%s", dsmoe_last_error());
        return -1;
    }
    return 0;
}

int cli_router_validate(const char *cmd, const cli_router_flags *f) {
    if (dsmoe_router_config_validate(&f->cfg) != DSMOE_OK) {
        cli_fail_config(CLI_USAGE, cmd, "%s", dsmoe_last_error());
        return -1;
    }
    return 0;
}

static int flag_int(const char *cmd, const char *name, const char *v, long long lo, long long hi,
                    int32_t *dst) {
    long long x;
    if (!cli_parse_int(v, lo, hi, &x)) {
        cli_fail(CLI_USAGE, cmd, "%s expects an integer in %lld..%lld, got '%s'", name, lo, hi,
                 v ? v : "");
        return -1;
    }
    *dst = (int32_t)x;
    return 1;
}

int cli_router_flag(const char *cmd, int argc, char **argv, int *i, cli_router_flags *f) {
    const char *v = NULL;
    int missing = 0;
    dsmoe_router_config *c = &f->cfg;
    const char *a = argv[*i];
    int r = 0;
#define VAL(name) (cli_opt(argc, argv, i, name, &v, &missing))
    if (VAL("--preset")) {
        r = 1; /* applied by cli_router_begin */
    } else if (VAL("--experts")) {
        r = missing ? 1 : flag_int(cmd, a, v, 1, DSMOE_MAX_EXPERTS, &c->n_experts);
    } else if (VAL("--groups")) {
        r = missing ? 1 : flag_int(cmd, a, v, 1, DSMOE_MAX_EXPERTS, &c->n_groups);
    } else if (VAL("--topk-groups")) {
        r = missing ? 1 : flag_int(cmd, a, v, 1, DSMOE_MAX_EXPERTS, &c->topk_groups);
    } else if (VAL("--top-k")) {
        r = missing ? 1 : flag_int(cmd, a, v, 1, DSMOE_MAX_EXPERTS, &c->top_k);
    } else if (VAL("--score")) {
        r = 1;
        if (missing) {
        } else if (strcmp(v, "sigmoid") == 0) {
            c->score_func = DSMOE_SCORE_FUNC_SIGMOID;
        } else if (strcmp(v, "softmax") == 0) {
            c->score_func = DSMOE_SCORE_FUNC_SOFTMAX;
        } else {
            cli_fail(CLI_USAGE, cmd, "--score expects sigmoid or softmax, got '%s'", v);
            r = -1;
        }
    } else if (VAL("--group-score")) {
        r = 1;
        long long m;
        char num[32];
        size_t len = missing ? 0 : strlen(v);
        if (missing) {
        } else if (strcmp(v, "max") == 0) {
            c->group_score = DSMOE_GROUP_SCORE_MAX;
            c->group_topm = 1;
        } else if (len > 3 && len < 30 && strncmp(v, "top", 3) == 0) {
            size_t n = len - 3;
            if (n > 3 && strcmp(v + len - 3, "sum") == 0) n -= 3;
            memcpy(num, v + 3, n);
            num[n] = '\0';
            if (!cli_parse_int(num, 1, 65536, &m)) {
                cli_fail(CLI_USAGE, cmd, "--group-score expects max, top2sum or topNsum, got '%s'", v);
                r = -1;
            } else {
                c->group_score = DSMOE_GROUP_SCORE_TOPSUM;
                c->group_topm = (int32_t)m;
            }
        } else {
            cli_fail(CLI_USAGE, cmd, "--group-score expects max, top2sum or topNsum, got '%s'", v);
            r = -1;
        }
    } else if (VAL("--mask")) {
        r = 1;
        if (missing) {
        } else if (strcmp(v, "exclude") == 0) {
            c->group_mask = DSMOE_GROUP_MASK_EXCLUDE;
        } else if (strcmp(v, "zero") == 0) {
            c->group_mask = DSMOE_GROUP_MASK_ZERO;
        } else {
            cli_fail(CLI_USAGE, cmd, "--mask expects exclude or zero, got '%s'", v);
            r = -1;
        }
    } else if (strcmp(a, "--normalize") == 0) {
        c->normalize = 1;
        r = 1;
    } else if (strcmp(a, "--no-normalize") == 0) {
        c->normalize = 0;
        r = 1;
    } else if (VAL("--norm-eps") || VAL("--scale")) {
        double x;
        r = 1;
        if (!missing) {
            if (!cli_parse_float(v, &x)) {
                cli_fail(CLI_USAGE, cmd, "%s expects a finite number, got '%s'", a, v);
                r = -1;
            } else if (strcmp(a, "--scale") == 0) {
                c->scale = (float)x;
            } else {
                c->norm_eps = (float)x;
            }
        }
    } else if (VAL("--precision")) {
        r = 1;
        if (missing) {
        } else if (strcmp(v, "fp32") == 0) {
            c->precision = DSMOE_PRECISION_FP32;
        } else if (strcmp(v, "bf16") == 0) {
            c->precision = DSMOE_PRECISION_BF16;
        } else {
            cli_fail(CLI_USAGE, cmd, "--precision expects fp32 or bf16, got '%s'", v);
            r = -1;
        }
    } else if (VAL("--nonfinite")) {
        r = 1;
        if (missing) {
        } else if (strcmp(v, "error") == 0) {
            c->nonfinite = DSMOE_NONFINITE_ERROR;
        } else if (strcmp(v, "sanitize") == 0) {
            c->nonfinite = DSMOE_NONFINITE_SANITIZE;
        } else {
            cli_fail(CLI_USAGE, cmd, "--nonfinite expects error or sanitize, got '%s'", v);
            r = -1;
        }
    } else if (VAL("--bias")) {
        r = 1;
        if (!missing) {
            f->bias_path = v;
            f->bias_set = 1;
            c->use_bias = 1;
        }
    } else if (strcmp(a, "--no-bias") == 0) {
        c->use_bias = 0;
        f->bias_set = 0;
        f->bias_path = NULL;
        r = 1;
    }
#undef VAL
    if (r == 1 && missing) {
        cli_fail(CLI_USAGE, cmd, "%s needs a value", a);
        return -1;
    }
    return r;
}

static const char *shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, n - used, "(");
    for (int i = 0; i < ndim && used < n; i++) {
        if (shape[i] < 0)
            used += (size_t)snprintf(buf + used, n - used, "%s*", i ? ", " : "");
        else
            used += (size_t)snprintf(buf + used, n - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    if (used < n) snprintf(buf + used, n - used, ")");
    return buf;
}

int cli_load_npy(const char *cmd, const char *path, dsmoe_dtype dtype, int ndim,
                 const int64_t *want_shape, dsmoe_array *out) {
    dsmoe_status st = dsmoe_npy_read(path, out);
    if (st != DSMOE_OK) return cli_fail_file(CLI_RUNTIME, cmd, path);
    char a[128], b[128];
    if (out->dtype != dtype) {
        cli_fail(CLI_RUNTIME, cmd, "%s: dtype %s, expected %s%s", path, dsmoe_dtype_name(out->dtype),
                 dsmoe_dtype_name(dtype),
                 dtype == DSMOE_DTYPE_F32 ? " (float32, little-endian)" : "");
        dsmoe_array_free(out);
        return CLI_RUNTIME;
    }
    int bad = out->ndim != ndim;
    for (int i = 0; !bad && i < ndim; i++)
        if (want_shape && want_shape[i] >= 0 && out->shape[i] != want_shape[i]) bad = 1;
    if (bad) {
        cli_fail(CLI_RUNTIME, cmd, "%s: shape %s, expected %s", path,
                 shape_str(out->ndim, out->shape, a, sizeof a),
                 want_shape ? shape_str(ndim, want_shape, b, sizeof b) : "other rank");
        dsmoe_array_free(out);
        return CLI_RUNTIME;
    }
    return CLI_OK;
}

int cli_save_npy(const char *cmd, const char *path, dsmoe_dtype dtype, int ndim,
                 const int64_t *shape, const void *data) {
    dsmoe_status st = dsmoe_npy_write_raw(path, dtype, ndim, shape, data);
    if (st != DSMOE_OK) return cli_fail(CLI_RUNTIME, cmd, "writing %s: %s", path, dsmoe_last_error());
    return CLI_OK;
}
