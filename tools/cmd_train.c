/* cmd_train.c — `dsmoe train`: trains a small DeepSeek-V3-style model from scratch (or
 * resumes one) with dsmoe_run, shows progress, and ends with the validation loss,
 * MaxVio over the validation set and a sample generated from the checkpoint (through
 * `dsmoe generate`). Public API only. */
#include "cli.h"
#include "cli_mpi.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------- flags -- */

typedef enum { K_I32, K_I64, K_U64, K_F32, K_F64, K_BOOL } flag_kind;

/* A flag that sets one numeric field of the run config; key: the field's name in the
 * library's messages (config.json key or run config field), for cli-friendly errors. */
typedef struct train_flag {
    const char *flag, *key;
    flag_kind kind;
    size_t off;
    double lo, hi;
    const char *help;
} train_flag;

#define RC(member) offsetof(dsmoe_run_config, member)
static const train_flag flags[] = {
    /* model */
    {"--hidden-size", "hidden_size", K_I32, RC(model.hidden_size), 1, 65536, "D, the model width"},
    {"--intermediate-size", "intermediate_size", K_I32, RC(model.intermediate_size), 1, 1 << 20,
     "inner size of the dense FFN layers"},
    {"--moe-intermediate-size", "moe_intermediate_size", K_I32, RC(model.moe_intermediate_size), 1,
     1 << 20, "F, inner size of each routed and shared expert"},
    {"--layers", "num_hidden_layers", K_I32, RC(model.num_hidden_layers), 1, 1024, "L, transformer layers"},
    {"--dense-layers", "first_k_dense_replace", K_I32, RC(model.first_k_dense_replace), 0, 1024,
     "the first layers with a dense FFN instead of MoE"},
    {"--moe-layer-freq", "moe_layer_freq", K_I32, RC(model.moe_layer_freq), 1, 1024,
     "a later layer l is MoE when l % this is 0"},
    {"--heads", "num_attention_heads", K_I32, RC(model.num_attention_heads), 1, 4096, "H, attention heads"},
    {"--q-lora-rank", "q_lora_rank", K_I32, RC(model.q_lora_rank), 0, 1 << 20,
     "rank of the compressed query (0: a plain q_proj)"},
    {"--kv-lora-rank", "kv_lora_rank", K_I32, RC(model.kv_lora_rank), 1, 1 << 20,
     "c, rank of MLA's compressed key-value latent"},
    {"--qk-nope-dim", "qk_nope_head_dim", K_I32, RC(model.qk_nope_head_dim), 1, 4096,
     "per-head query/key size without rotary embedding"},
    {"--qk-rope-dim", "qk_rope_head_dim", K_I32, RC(model.qk_rope_head_dim), 2, 4096,
     "per-head rotary query/key size (even)"},
    {"--v-head-dim", "v_head_dim", K_I32, RC(model.v_head_dim), 1, 4096, "per-head value size"},
    {"--experts", "n_routed_experts", K_I32, RC(model.n_routed_experts), 1, 65536, "E, routed experts"},
    {"--shared-experts", "n_shared_experts", K_I32, RC(model.n_shared_experts), 0, 64,
     "shared experts (always active)"},
    {"--top-k", "num_experts_per_tok", K_I32, RC(model.num_experts_per_tok), 1, 65536,
     "K, routed experts per token"},
    {"--groups", "n_group", K_I32, RC(model.n_group), 1, 65536, "expert groups of the router"},
    {"--topk-groups", "topk_group", K_I32, RC(model.topk_group), 1, 65536,
     "groups a token may use"},
    {"--normalize", "norm_topk_prob", K_BOOL, RC(model.norm_topk_prob), 0, 1,
     "1: normalise the selected weights to sum 1"},
    {"--scale", "routed_scaling_factor", K_F32, RC(model.routed_scaling_factor), 0, 1e6,
     "routed_scaling_factor, multiplies the routed weights"},
    {"--mtp-depths", "num_nextn_predict_layers", K_I32, RC(model.num_nextn_predict_layers), 0, 16,
     "multi-token-prediction depths (trained and saved)"},
    {"--max-positions", "max_position_embeddings", K_I64, RC(model.max_position_embeddings), 1,
     1 << 24, "max_position_embeddings"},
    {"--tie-embeddings", "tie_word_embeddings", K_BOOL, RC(model.tie_word_embeddings), 0, 1,
     "1: the head is the embedding"},
    {"--rope-theta", "rope_theta", K_F64, RC(model.rope_theta), 1, 1e12, "rotary base"},
    {"--rms-eps", "rms_norm_eps", K_F32, RC(model.rms_norm_eps), 1e-12, 1, "RMSNorm epsilon"},
    /* training */
    {"--batch", "batch", K_I32, RC(train.batch), 1, 1 << 20, "B, sequences per step"},
    {"--seq-len", "seq_len", K_I32, RC(train.seq_len), 1, 1 << 20, "T, positions per sequence"},
    {"--init-seed", "init_seed", K_U64, RC(train.seed), 0, 9e18, "seed of the initial weights"},
    {"--init-std", "init_std", K_F32, RC(train.init_std), 1e-9, 10, "std of the initial matrices"},
    {"--alpha", "alpha", K_F32, RC(train.balance_alpha), 0, 1e6,
     "α of the balance loss (0: none)"},
    {"--mtp-lambda", "mtp_lambda", K_F32, RC(train.mtp_lambda), 0, 1e6, "λ, weight of the MTP loss"},
    /* optimizer */
    {"--lr", "lr", K_F32, RC(adamw.lr), 1e-12, 1e6, "peak learning rate"},
    {"--warmup", "warmup_steps", K_I64, RC(adamw.warmup_steps), 0, 1e15, "linear warm-up steps"},
    {"--min-lr-ratio", "min_lr_ratio", K_F32, RC(adamw.min_lr_ratio), 0, 1,
     "the cosine ends at lr times this"},
    {"--weight-decay", "weight_decay", K_F32, RC(adamw.weight_decay), 0, 1e6,
     "AdamW's decoupled weight decay (matrices)"},
    {"--clip", "clip_norm", K_F32, RC(adamw.clip_norm), 0, 1e9,
     "clip the global gradient norm to this (0: no clipping)"},
    {"--beta1", "beta1", K_F32, RC(adamw.beta1), 0, 1, "AdamW β1"},
    {"--beta2", "beta2", K_F32, RC(adamw.beta2), 0, 1, "AdamW β2"},
    {"--eps", "eps", K_F32, RC(adamw.eps), 1e-30, 1, "AdamW ε"},
    /* balancer */
    {"--gamma", "gamma", K_F32, RC(balancer.gamma), 0, 1e6,
     "γ, bias update rate of the bias controller (0: none)"},
    {"--gamma-after", "gamma_after", K_F32, RC(balancer.gamma_after), 0, 1e6,
     "γ after --gamma-until tokens"},
    {"--gamma-until", "gamma_until_tokens", K_I64, RC(balancer.gamma_until_tokens), 0, 9e18,
     "tokens trained with γ before --gamma-after (0: always γ)"},
    {"--recenter", "recenter", K_BOOL, RC(balancer.recenter), 0, 1,
     "1: subtract the mean of each bias update"},
    /* data */
    {"--corpus-tokens", "tokens", K_I64, RC(corpus.tokens), 1024, 2147483648.0,
     "size of the built-in corpus in tokens"},
    {"--corpus-seed", "corpus_seed", K_U64, RC(corpus.seed), 0, 9e18, "seed of the built-in corpus"},
    {"--valid-fraction", "valid_fraction", K_F64, RC(corpus.valid_fraction), 0, 0.5,
     "share of documents held out for validation"},
    /* schedule */
    {"--steps", "steps", K_I64, RC(steps), 1, 1e15, "optimizer steps in all"},
    {"--seed", "seed", K_U64, RC(seed), 0, 9e18, "seed of the data order"},
    {"--eval-every", "eval_every", K_I64, RC(eval_every), 0, 1e15,
     "evaluate every N steps and after the last (0: only after the last)"},
    {"--eval-tokens", "eval_tokens", K_I64, RC(eval_tokens), 0, 1e15,
     "validation tokens per evaluation (0: the whole split)"},
    {"--save-every", "save_every", K_I64, RC(save_every), 0, 1e15,
     "checkpoint every N steps and after the last (0: only after the last)"},
    {"--log-every", "log_every", K_I64, RC(log_every), 1, 1e15, "a metrics line every N steps"},
};
#undef RC
enum { N_FLAGS = (int)(sizeof flags / sizeof flags[0]) };

static int set_flag(const train_flag *f, dsmoe_run_config *rc, const char *v) {
    char *p = (char *)rc + f->off;
    if (f->kind == K_F32 || f->kind == K_F64) {
        double x;
        if (!cli_parse_float(v, &x) || x < f->lo || x > f->hi) return 0;
        if (f->kind == K_F32) {
            float y = (float)x;
            memcpy(p, &y, sizeof y);
        } else {
            memcpy(p, &x, sizeof x);
        }
        return 1;
    }
    long long x;
    if (!cli_parse_int(v, (long long)f->lo, (long long)f->hi, &x)) return 0;
    if (f->kind == K_I32 || f->kind == K_BOOL) {
        int32_t y = (int32_t)x;
        memcpy(p, &y, sizeof y);
    } else if (f->kind == K_I64) {
        int64_t y = (int64_t)x;
        memcpy(p, &y, sizeof y);
    } else {
        uint64_t y = (uint64_t)x;
        memcpy(p, &y, sizeof y);
    }
    return 1;
}

/* Rewrites a library message's field names (hidden_size, lr = 0, ...) as the flags that
 * set them. */
static void flag_terms(const char *msg, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; msg[i] && o + 1 < cap;) {
        int done = 0;
        if ((i == 0 || !(msg[i - 1] == '_' || (msg[i - 1] >= 'a' && msg[i - 1] <= 'z'))) &&
            msg[i] >= 'a' && msg[i] <= 'z') {
            size_t n = 0;
            while (msg[i + n] == '_' || (msg[i + n] >= 'a' && msg[i + n] <= 'z') ||
                   (msg[i + n] >= '0' && msg[i + n] <= '9'))
                n++;
            for (int f = 0; f < N_FLAGS; f++)
                if (strlen(flags[f].key) == n && strncmp(msg + i, flags[f].key, n) == 0 &&
                    (strchr(flags[f].key, '_') || strncmp(msg + i + n, " = ", 3) == 0)) {
                    o += (size_t)snprintf(out + o, cap - o, "%s", flags[f].flag);
                    if (o >= cap) o = cap - 1;
                    i += n;
                    done = 1;
                    break;
                }
            if (!done) {
                for (size_t k = 0; k < n && o + 1 < cap; k++) out[o++] = msg[i + k];
                i += n;
                continue;
            }
        }
        if (!done) out[o++] = msg[i++];
    }
    out[o] = '\0';
}

static const char *const train_usage_head =
    "usage: dsmoe train [--preset NAME] [--strategy NAME] [--steps N] [--seed S] --out DIR\n"
    "                   [--data FILE...] [--save-every N] [--eval-every N] [--eval-tokens N]\n"
    "                   [--resume] [--stop-at STEP] [--threads N] [model/optimizer flags]\n"
    "\n"
    "Trains a small DeepSeek-V3-style language model from scratch on the built-in\n"
    "multi-domain corpus (or UTF-8 text files), byte-level, with multi-token prediction and\n"
    "the routing strategy chosen. DIR receives metrics.jsonl (one JSON object per line:\n"
    "docs/train.md) and the latest checkpoint in DIR/checkpoint, a Hugging Face model\n"
    "directory that `dsmoe eval` and `dsmoe generate` read. Checkpoints are written\n"
    "atomically; --resume continues bit for bit as if never interrupted. At the end: the\n"
    "validation loss, MaxVio over the validation set, and a sample of generated text.\n"
    "Under `mpirun -np R`: data-parallel, each rank on B/R rows of the same global batch\n"
    "(B % R == 0), gradients averaged, rank 0 prints and writes; any R resumes any run\n"
    "(docs/train.md, \"Data-parallel runs\").\n"
    "\n"
    "run:\n"
    "  --preset NAME        tiny | small | default (model size, batch, steps; default: default)\n"
    "  --strategy NAME      routing and balancing (default v3):\n"
    "                         v3               sigmoid, normalised, bias controller γ 1e-3,\n"
    "                                          sequence-wise loss α 1e-4\n"
    "                         v3-no-balance    v3 with γ 0 and α 0\n"
    "                         v3-proportional  v3 with the proportional bias rule\n"
    "                         v3-no-norm       v3 without normalising the selected weights\n"
    "                         aux-loss         no bias; expert-level loss over the batch α 1e-3\n"
    "                         v2               softmax, group max, not normalised; expert-level\n"
    "                                          loss α 3e-3\n"
    "                         softmax-norm     v2 with normalised weights\n"
    "  --out DIR            the run folder (created)\n"
    "  --resume             continue the run in --out from its checkpoint to its steps (other\n"
    "                       flags, if given, must equal the run's)\n"
    "  --stop-at STEP       end after STEP's checkpoint, as an interruption would\n"
    "  --threads N          threads (default: all; the results are the same bits for any N)\n"
    "  --progress-every N   without a terminal, a progress line every N steps (default: about\n"
    "                       20 lines per run)\n"
    "  --sample-tokens N    bytes of each of the three final samples (default 200; 0: none)\n"
    "  --sample-prompt TEXT their prompt (default: the beginning of a document)\n"
    "  --quiet              no progress lines\n"
    "  --expert-parallel    under mpirun: also shard each MoE layer's routed experts over\n"
    "                       the ranks (dsmoe_ep; each rank computes its experts' products)\n";

static const char *const train_flags_head =
    "data:\n"
    "  --data FILE          train on UTF-8 text files instead of the built-in corpus (repeat)\n"
    "  --domains LIST       built-in domains, comma-separated (arithmetic,records,markov,\n"
    "                       copy-sort,english; default: all available)\n"
    "  --fortunes DIR       folder of fortune(6) files for the english domain\n"
    "\n"
    "routing and losses (after the strategy):\n"
    "  --score NAME         sigmoid | softmax\n"
    "  --topk-method NAME   noaux_tc (bias, top-2-sum groups) | group_limited_greedy |\n"
    "                       greedy\n"
    "  --bias-rule NAME     sign | proportional (the bias controller's update)\n"
    "  --balance-loss KIND  seq | expert | switch | zloss\n";

void cli_train_flags_help(FILE *out) {
    fputs(train_flags_head, out);
    const char *sections[] = {"--hidden-size", "model (after the preset):",
                              "--batch", "training:",
                              "--lr", "optimizer (AdamW, warm-up and cosine decay):",
                              "--gamma", "bias controller:",
                              "--corpus-tokens", "built-in corpus:",
                              "--steps", "schedule:"};
    for (int f = 0; f < N_FLAGS; f++) {
        for (size_t s = 0; s < sizeof sections / sizeof sections[0]; s += 2)
            if (strcmp(flags[f].flag, sections[s]) == 0) fprintf(out, "\n%s\n", sections[s + 1]);
        char left[64];
        snprintf(left, sizeof left, "%s %s", flags[f].flag,
                 flags[f].kind == K_BOOL ? "0|1" : flags[f].kind >= K_F32 ? "X" : "N");
        fprintf(out, "  %-26s %s\n", left, flags[f].help);
    }
}

static void print_usage(void) {
    fputs(train_usage_head, stdout);
    fputs("\n", stdout);
    cli_train_flags_help(stdout);
    printf("\n  --help                     this text\n"
           "\nExamples:\n"
           "  dsmoe train --out runs/default                        # about five minutes\n"
           "  dsmoe train --preset tiny --strategy aux-loss --steps 300 --out runs/aux\n"
           "  dsmoe generate --model runs/default/checkpoint --prompt '12+34='\n");
}

/* -------------------------------------------------------------- progress -- */

typedef struct progress_state {
    int tty, quiet;
    int64_t every;
} progress_state;

static const char *fmt_eta(double s, char *buf, size_t cap) {
    if (!(s >= 0) || !isfinite(s)) snprintf(buf, cap, "?");
    else if (s >= 3600) snprintf(buf, cap, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else if (s >= 60) snprintf(buf, cap, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
    else snprintf(buf, cap, "%.0fs", s);
    return buf;
}

static void on_progress(const dsmoe_run_progress *p, void *user) {
    progress_state *ps = (progress_state *)user;
    if (ps->quiet) return;
    char eta[32];
    if (p->is_eval) {
        fprintf(stderr, "%sstep %lld: validation loss %.4f (%.3f bits/byte), MaxVio_global %.3f\n",
                ps->tty ? "\r\033[K" : "", (long long)p->step, p->val_loss,
                p->val_loss / log(2.0), p->val_maxvio);
        return;
    }
    if (ps->tty) {
        fprintf(stderr, "\r\033[Kstep %lld/%lld  loss %.4f  ce %.4f  %.0f tok/s  MaxVio %.3f  ETA %s",
                (long long)p->step, (long long)p->steps, p->loss, p->ce, p->tokens_per_s,
                p->maxvio_batch, fmt_eta(p->eta_s, eta, sizeof eta));
        if (p->step == p->steps) fputc('\n', stderr);
    } else if (p->step % ps->every == 0 || p->step == p->steps || p->step == 1) {
        fprintf(stderr, "step %lld/%lld  loss %.4f  ce %.4f  %.0f tok/s  MaxVio %.3f  ETA %s\n",
                (long long)p->step, (long long)p->steps, p->loss, p->ce, p->tokens_per_s,
                p->maxvio_batch, fmt_eta(p->eta_s, eta, sizeof eta));
    }
    fflush(stderr);
}

/* ------------------------------------------------------------------ main -- */

static int parse_domains(const char *v, uint32_t *out) {
    uint32_t bits = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", v);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int d = dsmoe_domain_from_name(tok);
        if (d < 0 || d >= DSMOE_DOMAIN_TEXT) return 0;
        bits |= 1u << d;
    }
    *out = bits;
    return bits != 0;
}

/* The --data files of the run being parsed: they must outlive the parse (the run config
 * points here), and a replay onto a fresh config (dsmoe study, one per run) rewrites the
 * same entries. */
enum { MAX_DATA_FILES = 4096 };
static const char *data_files[MAX_DATA_FILES];

int cli_train_flag(const char *cmd, int argc, char **argv, int *i, dsmoe_run_config *rc,
                   int *warmup_given) {
    const char *v = NULL, *a = argv[*i];
    int missing = 0;
    if (cli_opt(argc, argv, i, "--data", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        if (rc->n_data_files >= MAX_DATA_FILES)
            return cli_fail(CLI_USAGE, cmd, "--data: at most %d files", MAX_DATA_FILES), -1;
        if (rc->n_data_files < 0 || (rc->n_data_files > 0 && rc->data_files != data_files))
            rc->n_data_files = 0; /* files that came from elsewhere are replaced */
        data_files[rc->n_data_files++] = v;
        rc->data_files = data_files;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--score", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        if (strcmp(v, "sigmoid") == 0) rc->model.scoring_func = DSMOE_SCORE_FUNC_SIGMOID;
        else if (strcmp(v, "softmax") == 0) rc->model.scoring_func = DSMOE_SCORE_FUNC_SOFTMAX;
        else return cli_fail(CLI_USAGE, cmd, "--score expects sigmoid or softmax, got '%s'", v), -1;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--topk-method", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        if (strcmp(v, "noaux_tc") == 0) rc->model.topk_method = DSMOE_TOPK_METHOD_NOAUX_TC;
        else if (strcmp(v, "group_limited_greedy") == 0)
            rc->model.topk_method = DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY;
        else if (strcmp(v, "greedy") == 0) rc->model.topk_method = DSMOE_TOPK_METHOD_GREEDY;
        else
            return cli_fail(CLI_USAGE, cmd,
                            "--topk-method expects noaux_tc, group_limited_greedy or greedy, got '%s'", v),
                   -1;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--bias-rule", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        if (strcmp(v, "sign") == 0) rc->balancer.rule = DSMOE_BALANCE_RULE_SIGN;
        else if (strcmp(v, "proportional") == 0) rc->balancer.rule = DSMOE_BALANCE_RULE_PROPORTIONAL;
        else return cli_fail(CLI_USAGE, cmd, "--bias-rule expects sign or proportional, got '%s'", v), -1;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--balance-loss", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        dsmoe_balance_loss_kind k;
        if (dsmoe_balance_loss_kind_parse(v, &k) != DSMOE_OK ||
            !(k == DSMOE_BALANCE_LOSS_SEQ || k == DSMOE_BALANCE_LOSS_EXPERT ||
              k == DSMOE_BALANCE_LOSS_SWITCH || k == DSMOE_BALANCE_LOSS_ZLOSS))
            return cli_fail(CLI_USAGE, cmd, "--balance-loss expects seq, expert, switch or zloss, got '%s'", v),
                   -1;
        rc->train.balance_kind = (int32_t)k;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--domains", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        if (!parse_domains(v, &rc->corpus.domains))
            return cli_fail(CLI_USAGE, cmd,
                            "--domains expects names among arithmetic, records, markov, copy-sort, "
                            "english (comma-separated), got '%s'", v),
                   -1;
        return 1;
    }
    if (cli_opt(argc, argv, i, "--fortunes", &v, &missing)) {
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
        rc->corpus.fortunes_dir = v;
        return 1;
    }
    for (int f = 0; f < N_FLAGS; f++)
        if (cli_opt(argc, argv, i, flags[f].flag, &v, &missing)) {
            if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", a), -1;
            if (!set_flag(&flags[f], rc, v))
                return cli_fail(CLI_USAGE, cmd, "%s expects %s in [%g, %g], got '%s'", flags[f].flag,
                                flags[f].kind >= K_F32 ? "a number" : "an integer", flags[f].lo, flags[f].hi, v),
                       -1;
            if (warmup_given && strcmp(flags[f].flag, "--warmup") == 0) *warmup_given = 1;
            return 1;
        }
    return 0;
}

void cli_train_flag_message(const char *msg, char *out, size_t cap) {
    if (cap == 0) return;
    flag_terms(msg, out, cap);
}

void cli_train_finish(dsmoe_run_config *rc, int warmup_given) {
    if (rc->n_data_files == 0) rc->data_files = NULL;
    /* A shorter run than the preset's keeps its warm-up inside the run. */
    if (!warmup_given && rc->adamw.warmup_steps > rc->steps / 10) rc->adamw.warmup_steps = rc->steps / 10;
    rc->adamw.total_steps = rc->steps;
    if (rc->model.n_routed_experts > 0) rc->balancer.n_experts = rc->model.n_routed_experts;
    if (rc->train.mtp_depths > rc->model.num_nextn_predict_layers) rc->train.mtp_depths = -1;
}

int cmd_train(int argc, char **argv) {
    const char *cmd = "train", *preset = "default", *strategy = "v3", *out = NULL;
    const char *sample_prompt = "";
    long long threads = 0, stop_at = 0, sample_tokens = 200, progress_every = 0;
    int resume = 0, quiet = 0, config_flags = 0, warmup_given = 0, expert_parallel = 0;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            print_usage();
            return CLI_OK;
        }
    /* First pass: the preset and the strategy, which the other flags change. */
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (cli_opt(argc, argv, &i, "--preset", &v, &missing)) {
            if (missing) return cli_fail(CLI_USAGE, cmd, "--preset needs a value");
            preset = v;
            config_flags = 1;
        } else if (cli_opt(argc, argv, &i, "--strategy", &v, &missing)) {
            if (missing) return cli_fail(CLI_USAGE, cmd, "--strategy needs a value");
            strategy = v;
            config_flags = 1;
        }
    }
    dsmoe_run_config rc;
    if (dsmoe_run_config_default(preset, &rc) != DSMOE_OK)
        return cli_fail(CLI_USAGE, cmd, "--preset: %s", dsmoe_last_error());
    if (dsmoe_run_strategy_apply(strategy, &rc) != DSMOE_OK)
        return cli_fail(CLI_USAGE, cmd, "--strategy: %s", dsmoe_last_error());
    int rcode = CLI_USAGE, agreed = 0;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0, used = 0;
        const char *a = argv[i];
        if (cli_opt(argc, argv, &i, "--preset", &v, &missing) ||
            cli_opt(argc, argv, &i, "--strategy", &v, &missing)) {
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--out", &v, &missing)) {
            out = v;
            used = 1;
        } else if (strcmp(a, "--resume") == 0) {
            resume = 1;
            used = 1;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = 1;
            used = 1;
        } else if (strcmp(a, "--expert-parallel") == 0) {
            expert_parallel = 1;
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--stop-at", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, INT64_MAX, &stop_at)) {
                cli_fail(CLI_USAGE, cmd, "--stop-at expects a step >= 1, got '%s'", v);
                goto done;
            }
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads)) {
                cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
                goto done;
            }
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--progress-every", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, INT64_MAX, &progress_every)) {
                cli_fail(CLI_USAGE, cmd, "--progress-every expects a number >= 1, got '%s'", v);
                goto done;
            }
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--sample-tokens", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, INT32_MAX, &sample_tokens)) {
                cli_fail(CLI_USAGE, cmd, "--sample-tokens expects a number >= 0, got '%s'", v);
                goto done;
            }
            used = 1;
        } else if (cli_opt(argc, argv, &i, "--sample-prompt", &v, &missing)) {
            sample_prompt = v;
            used = 1;
        } else {
            int t = cli_train_flag(cmd, argc, argv, &i, &rc, &warmup_given);
            if (t < 0) goto done;
            if (t > 0) used = config_flags = 1;
        }
        if (!used) {
            cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe train --help)", a);
            goto done;
        }
        if (missing) {
            cli_fail(CLI_USAGE, cmd, "%s needs a value", a);
            goto done;
        }
    }
    if (!out) {
        cli_fail(CLI_USAGE, cmd, "--out DIR is required (the run folder)");
        goto done;
    }
    cli_train_finish(&rc, warmup_given);
    if (!resume || config_flags) {
        if (dsmoe_run_config_validate(&rc) != DSMOE_OK) {
            char msg[1536];
            flag_terms(dsmoe_last_error(), msg, sizeof msg);
            cli_fail(CLI_USAGE, cmd, "%s", msg);
            goto done;
        }
    }
    /* Under mpirun: a data-parallel run; rank 0 prints (every rank gets the same result). */
    const int lead = cli_mpi_rank() == 0;
    progress_state ps = {cli_stderr_is_tty(), quiet || !lead, progress_every};
    dsmoe_run_options o;
    memset(&o, 0, sizeof o);
    o.n_threads = (int32_t)threads;
    o.resume = resume;
    o.stop_at = stop_at;
    o.progress = on_progress;
    o.user = &ps;
    o.collective = cli_mpi_run_collective(expert_parallel);
    const dsmoe_run_config *shown = &rc;
    dsmoe_run_config saved;
    if (resume && !config_flags) {
        if (dsmoe_run_config_load(out, &saved) != DSMOE_OK) {
            rcode = cli_fail(CLI_RUNTIME, cmd, "--resume: %s", dsmoe_last_error());
            goto done;
        }
        shown = &saved;
    }
    if (ps.every <= 0) ps.every = shown->steps >= 20 ? shown->steps / 20 : 1;
    if (!ps.quiet) {
        dsmoe_model_counts mc;
        char pbuf[64] = "?";
        if (dsmoe_model_count_params(&shown->model, &mc) == DSMOE_OK)
            snprintf(pbuf, sizeof pbuf, "%.2f M", (double)mc.total / 1e6);
        fprintf(stderr,
                "dsmoe train: %s preset %s, strategy %s: %s parameters (main model), %d layers, "
                "%d experts top-%d; batch %d x %d tokens, %lld steps%s%s -> %s\n",
                resume ? "resuming" : "training", shown->preset, shown->strategy, pbuf,
                (int)shown->model.num_hidden_layers, (int)shown->model.n_routed_experts,
                (int)shown->model.num_experts_per_tok, (int)shown->train.batch,
                (int)shown->train.seq_len, (long long)shown->steps,
                stop_at > 0 ? " (stopping early)" : "", cli_mpi_size() > 1 ? ", data-parallel" : "",
                out);
    }
    if (cli_mpi_active()) { /* a rank that failed above meets the others at done: */
        agreed = 1;
        if ((rcode = cli_mpi_agree(CLI_OK, cmd)) != CLI_OK) goto done;
    }
    dsmoe_run_result res;
    dsmoe_status st = dsmoe_run(resume && !config_flags ? NULL : &rc, out, &o, &res);
    if (st != DSMOE_OK) {
        const int code = st == DSMOE_STATUS_INVALID_CONFIG ? CLI_USAGE : CLI_RUNTIME;
        char msg[1536];
        flag_terms(dsmoe_last_error(), msg, sizeof msg);
        rcode = lead ? cli_fail(code, cmd, "%s", msg) : code; /* the same error on every rank */
        goto done;
    }
    if (!lead) { /* rank 0 reports and samples */
        rcode = CLI_OK;
        goto done;
    }
    fprintf(stderr,
            "dsmoe train: step %lld of %lld in %.1f s (%.0f tokens/s): train loss %.4f, validation "
            "loss %.4f (%.3f bits/byte), MaxVio_global %.3f\n",
            (long long)res.step, (long long)shown->steps, res.seconds, res.tokens_per_s,
            res.train_loss, res.val_loss, res.val_loss / log(2.0), res.val_maxvio);
    fprintf(stderr, "dsmoe train: checkpoint %s/checkpoint, metrics %s/metrics.jsonl\n", out, out);
    rcode = CLI_OK;
    if (sample_tokens > 0 && res.step == shown->steps) {
        /* Samples come from `dsmoe generate` on the checkpoint, as a user would run it; a
         * few seeds, since a document often ends (EOS) after a line or two. */
        char model[4096], ntok[32], nth[32], seed[16];
        snprintf(model, sizeof model, "%s/checkpoint", out);
        snprintf(ntok, sizeof ntok, "%lld", sample_tokens);
        snprintf(nth, sizeof nth, "%lld", threads > 0 ? threads : (long long)dsmoe_default_threads());
        fprintf(stderr, "dsmoe train: samples (dsmoe generate --model %s --prompt '%s' "
                        "--max-tokens %s --seed 1, 2, 3):\n", model, sample_prompt, ntok);
        for (int k = 1; k <= 3 && rcode == CLI_OK; k++) {
            snprintf(seed, sizeof seed, "%d", k);
            char *gargv[] = {(char *)"generate", (char *)"--model", model, (char *)"--prompt",
                             (char *)sample_prompt, (char *)"--max-tokens", ntok, (char *)"--seed",
                             seed, (char *)"--temperature", (char *)"0.8", (char *)"--threads",
                             nth};
            fflush(stderr);
            printf("--- sample %d\n%s", k, sample_prompt);
            fflush(stdout);
            rcode = cmd_generate((int)(sizeof gargv / sizeof gargv[0]), gargv);
            printf("\n");
            fflush(stdout);
        }
    }
done:
    if (cli_mpi_active() && !agreed) rcode = cli_mpi_agree(rcode, cmd); /* no rank left waiting */
    return rcode;
}
