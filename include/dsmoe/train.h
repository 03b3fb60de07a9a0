/*
 * dsmoe/train.h — training small DeepSeek-V3-style models: the data, the optimizer
 * (AdamW, learning-rate schedule, gradient clipping), the training model and runs.
 *
 * Byte-level vocabulary. Token ids 0 .. 255 are the bytes of UTF-8 text; 256 begins a
 * document, 257 ends one, 258 pads; the vocabulary has DSMOE_BYTE_VOCAB_SIZE ids (one
 * spare, so the size is a multiple of 4). A model directory says it uses this
 * vocabulary with "dsmoe_vocab": "bytes" in config.json (dsmoe_model_config.byte_vocab).
 *
 * Corpus. A corpus is a stream of documents, each BOS, its bytes, EOS, split into a
 * training and a held-out validation part by whole documents; every token carries the
 * domain of its document, so that routing can be studied per domain. The built-in
 * corpus is generated deterministically from a seed (the same bytes on every platform)
 * with one generator per domain:
 *   arithmetic  lines "a+b=c", "a-b=c", "a*b=c", "(a+b)*c=d" with correct answers
 *   records     bracketed JSON-like records, nested up to three deep
 *   markov      an upper-case language of its own: an order-2 Markov chain over 12
 *               letters with sparse, seed-drawn transitions; words and sentences
 *   copy-sort   "copy xyz|xyz", "rev xyz|zyx", "sort dbca|abcd" tasks
 *   english     entries of the fortune(6) files, when a fortunes folder exists
 * A document's domain is drawn uniformly among the enabled ones; each document goes to
 * the validation part with probability valid_fraction (its own random stream, so the
 * split does not move when the size changes). User text files are read as UTF-8 (a file
 * that is not, names the byte offset), cut into documents at blank lines (at most
 * 4 KiB each, cut at a line end where one exists), tagged DSMOE_DOMAIN_TEXT.
 *
 * Example:
 *   dsmoe_corpus_config cc;
 *   dsmoe_corpus_config_default(&cc);
 *   cc.seed = 7;
 *   dsmoe_corpus *corpus;
 *   if (dsmoe_corpus_builtin(&cc, &corpus) != DSMOE_OK) fprintf(stderr, "%s\n", dsmoe_last_error());
 *   int32_t tok[4 * 65];
 *   uint8_t dom[4 * 65];
 *   dsmoe_rng rng;
 *   dsmoe_rng_seed(&rng, 1);
 *   dsmoe_corpus_sample(corpus, DSMOE_SPLIT_TRAIN, &rng, 4, 64, tok, dom);
 *   dsmoe_corpus_free(corpus);
 */
#ifndef DSMOE_TRAIN_H
#define DSMOE_TRAIN_H

#include "core.h"
#include "balance.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSMOE_BYTE_VOCAB_BOS 256
#define DSMOE_BYTE_VOCAB_EOS 257
#define DSMOE_BYTE_VOCAB_PAD 258
#define DSMOE_BYTE_VOCAB_SIZE 260

typedef enum dsmoe_domain {
    DSMOE_DOMAIN_ARITHMETIC = 0,
    DSMOE_DOMAIN_RECORDS = 1,
    DSMOE_DOMAIN_MARKOV = 2,
    DSMOE_DOMAIN_COPY_SORT = 3,
    DSMOE_DOMAIN_ENGLISH = 4,
    DSMOE_DOMAIN_TEXT = 5, /* user text files */
    DSMOE_DOMAIN_COUNT = 6
} dsmoe_domain;

/* "arithmetic", "records", "markov", "copy-sort", "english", "text"; NULL otherwise. */
DSMOE_API const char *dsmoe_domain_name(int domain);
/* The domain of a name above, or -1. */
DSMOE_API int dsmoe_domain_from_name(const char *name);

typedef enum dsmoe_split { DSMOE_SPLIT_TRAIN = 0, DSMOE_SPLIT_VALID = 1 } dsmoe_split;

typedef struct dsmoe_corpus_config {
    uint64_t seed;
    int64_t tokens;        /* about this many tokens in all (the last document completes) */
    double valid_fraction; /* share of documents held out, in [0, 0.5] */
    uint32_t domains;      /* bit (1 << d) enables built-in domain d; 0: all available */
    const char *fortunes_dir; /* folder of fortune(6) files; NULL: the system's
                                 (/usr/share/games/fortunes), if present */
} dsmoe_corpus_config;

/* seed 1, tokens 2,000,000, valid_fraction 0.05, domains 0 (all), fortunes_dir NULL. */
DSMOE_API void dsmoe_corpus_config_default(dsmoe_corpus_config *cfg);

typedef struct dsmoe_corpus dsmoe_corpus;

/* The built-in corpus. The english domain is enabled only where its folder holds
 * fortune files (silently skipped when domains is 0, an error when asked for by bit).
 * Errors: INVALID_CONFIG naming the field (tokens < 1024 or > 2^31, valid_fraction,
 * domains with unknown bits or none left), IO, OUT_OF_MEMORY. *out NULL on error. */
DSMOE_API dsmoe_status dsmoe_corpus_builtin(const dsmoe_corpus_config *cfg, dsmoe_corpus **out);
/* A corpus of n UTF-8 text files (cfg: seed and valid_fraction used; tokens is a cap,
 * 0 for none). Errors: IO naming the path, FORMAT naming the path and the byte offset
 * of the first invalid UTF-8 sequence (or "empty"), INVALID_CONFIG, OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_corpus_from_files(const char *const *paths, int n,
                                               const dsmoe_corpus_config *cfg,
                                               dsmoe_corpus **out);
DSMOE_API void dsmoe_corpus_free(dsmoe_corpus *c);

/* Tokens of a split. */
DSMOE_API int64_t dsmoe_corpus_length(const dsmoe_corpus *c, dsmoe_split s);
/* The split's tokens (ids < DSMOE_BYTE_VOCAB_SIZE) and their domains; owned by c. */
DSMOE_API const uint16_t *dsmoe_corpus_tokens(const dsmoe_corpus *c, dsmoe_split s);
DSMOE_API const uint8_t *dsmoe_corpus_domains(const dsmoe_corpus *c, dsmoe_split s);
/* Documents of a split, and tokens per domain (counts[DSMOE_DOMAIN_COUNT]). */
DSMOE_API int64_t dsmoe_corpus_documents(const dsmoe_corpus *c, dsmoe_split s);
DSMOE_API void dsmoe_corpus_domain_counts(const dsmoe_corpus *c, dsmoe_split s, int64_t *counts);

/* B windows of T + 1 consecutive tokens (inputs and next-token targets) of split s,
 * starts drawn uniformly from [0, length − T − 1] with B draws of rng, into
 * tokens (B, T + 1) and, if not NULL, domains (B, T + 1). INVALID_ARGUMENT when the
 * split is shorter than T + 1 tokens or B, T < 1 (nothing written, rng unchanged). */
DSMOE_API dsmoe_status dsmoe_corpus_sample(const dsmoe_corpus *c, dsmoe_split s, dsmoe_rng *rng,
                                           int32_t B, int32_t T, int32_t *tokens,
                                           uint8_t *domains);
/* Number of consecutive windows of T + 1 tokens (overlapping by one) covering split s:
 * window i holds tokens [i·T, i·T + T], the last one possibly shorter. */
DSMOE_API int64_t dsmoe_corpus_window_count(const dsmoe_corpus *c, dsmoe_split s, int32_t T);
/* Window i (see above) into tokens / domains (T + 1 each; a short last window is
 * padded with DSMOE_BYTE_VOCAB_PAD and domain 255). Returns the tokens written, or -1
 * (INVALID_ARGUMENT) when i is out of range. */
DSMOE_API int64_t dsmoe_corpus_window(const dsmoe_corpus *c, dsmoe_split s, int32_t T, int64_t i,
                                      int32_t *tokens, uint8_t *domains);

/* ------------------------------------------------------------ optimizer -- */
/* AdamW with decoupled weight decay, as torch.optim.AdamW computes it (fp32 state):
 *   p ← p · (1 − lr·wd)
 *   m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
 *   p ← p − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
 * with g the gradient times the clipping factor min(1, clip / (‖g‖ + 1e-6)) of the
 * global norm over all parameters (torch.nn.utils.clip_grad_norm_), and the learning
 * rate of step t (1-based) from a linear warm-up and a cosine decay:
 *   lr(t) = lr · t / warmup                                      t <= warmup
 *         = lr_min + (lr − lr_min) · (1 + cos(π · (t − warmup) / (total − warmup))) / 2
 *                                                                warmup < t <= total
 *         = lr_min                                               t > total
 * lr_min = lr · min_lr_ratio. Weight decay applies to the tensors the caller says
 * (matrices, by the usual rule: not norms, biases or the router's bias). Tests check it
 * against torch.optim.AdamW. */
typedef struct dsmoe_adamw_config {
    float lr;            /* peak learning rate */
    float beta1, beta2;
    float eps;
    float weight_decay;
    float clip_norm;     /* clip the global gradient norm to this; 0: no clipping */
    int64_t warmup_steps;
    int64_t total_steps; /* the cosine reaches lr_min here */
    float min_lr_ratio;  /* lr_min / lr, in [0, 1] */
} dsmoe_adamw_config;

/* lr 3e-3, betas 0.9 / 0.95, eps 1e-8, weight_decay 0.1, clip_norm 1, warm-up 100 of
 * 1000 steps, min_lr_ratio 0.1. */
DSMOE_API void dsmoe_adamw_config_default(dsmoe_adamw_config *cfg);
/* INVALID_CONFIG naming the field (lr > 0 and finite, betas in [0, 1), eps > 0,
 * weight_decay >= 0, clip_norm >= 0, 0 <= warmup_steps <= total_steps, total_steps >= 1,
 * min_lr_ratio in [0, 1]). */
DSMOE_API dsmoe_status dsmoe_adamw_config_validate(const dsmoe_adamw_config *cfg);
/* The learning rate of step t >= 1 (above). */
DSMOE_API double dsmoe_adamw_lr(const dsmoe_adamw_config *cfg, int64_t t);
/* Σ g[i]² over n values in double, in a fixed order (blocks of 4096 summed in index
 * order, whatever n_threads). Add these over the tensors and take the square root for
 * the global norm. */
DSMOE_API double dsmoe_sum_squares(const float *g, int64_t n, int n_threads);
/* The clipping factor for a global norm: min(1, clip_norm / (norm + 1e-6)), 1 when
 * clip_norm is 0. */
DSMOE_API float dsmoe_adamw_clip_factor(const dsmoe_adamw_config *cfg, double norm);
/* One AdamW update of n parameters p with gradients g (scaled by grad_scale first, in
 * fp32), moments m and v, at step t >= 1 with learning rate lr and weight decay wd
 * (0 for tensors that take none). Element-wise: the same bits for any n_threads. */
DSMOE_API void dsmoe_adamw_update(const dsmoe_adamw_config *cfg, float *p, float *m, float *v,
                                  const float *g, int64_t n, int64_t t, double lr, double wd,
                                  float grad_scale, int n_threads);

/* ------------------------------------------------------- training model -- */
/* A dsmoe_model_config's model for training, with its multi-token-prediction depths:
 * one fp32 parameter array and one gradient array of the same layout, the loss of a
 * batch of B sequences of T + 1 tokens (inputs tokens[:, :T], targets tokens[:, 1:]),
 * and its backward.
 *
 * Layout. The tensors of dsmoe_model_tensor_at (with the trained MTP depths), in that order, each
 * starting on a 64-byte boundary of the parameter array; a MoE layer's tensors are one
 * block of dsmoe_moe_param_count floats (the layer's own layout: each expert's
 * gate_proj and up_proj rows back to back, then down_proj, padding kept at 0) placed at
 * its mlp.gate.weight, on which the layer is created with dsmoe_moe_create_with (F32,
 * checkpoint layout, train). The gradient array has the same offsets. The correction
 * bias (mlp.gate.e_score_correction_bias) is not in either array: it is the layer's
 * buffer, set by a balancer (dsmoe_train_model_set_bias), with no gradient. So AdamW
 * runs over dsmoe_train_model_tensor's trainable tensors (or over the whole arrays:
 * padding has zero gradients and stays 0), and a checkpoint writes each tensor under its
 * name. A tied head (tie_word_embeddings) is the embedding: its gradient sums both uses.
 * An MTP depth's embed_tokens and shared_head.head are the main model's embedding and
 * head (DeepSeek-V3 shares them): they are not in the arrays either; the accessor
 * points them at the main tensors (not trainable, so an optimizer updates them once)
 * and a checkpoint writes the copies under their names.
 *
 * Composition (SPEC-model; src/model/model_grad.h's blocks):
 *   h = embed(tokens);  per layer l: h += MLA(rmsnorm(h));  h += FFN_l(rmsnorm(h))
 *   (FFN_l the dense SwiGLU or the MoE layer);  ce = CE(head(rmsnorm(h)), targets)
 * MTP depth k = 1 .. Dm (block at layer L + k − 1; DeepSeek-V3 §2.2 with the
 * concatenation order of the released weights' serving code, embedding first):
 *   h'_i = eh_proj [enorm(embed(t_{i+k})); hnorm(h^{k−1}_i)],  h^k = block(h'),
 *   ce_k = CE(head(shared_head.norm(h^k_i)), t_{i+k+1}) over the positions with i + k + 1 <= T
 * with h^0 the main model's final-norm output (the state a server hands the MTP
 * module); mtp = mean_k ce_k;  loss = ce + mtp_lambda · mtp + balance.
 * CE is the mean over the positions whose target is not the pad id (byte vocabulary:
 * DSMOE_BYTE_VOCAB_PAD; otherwise none). With balance_alpha > 0 the loss adds, for every
 * MoE layer, the balance loss of balance_kind (dsmoe_balance_loss; by default DeepSeek-V3's
 * complementary sequence-wise loss, DSMOE_BALANCE_LOSS_SEQ, one sequence = the T
 * positions of a batch row; EXPERT, SWITCH and ZLOSS over the whole batch — for EXPERT
 * and SWITCH that of every process with dsmoe_train_model_set_counts_sum) with that α,
 * its gradient entering the router logits.
 *
 * Threads: the blocks' fixed work split; the loss and every gradient are the same bits
 * for any n_threads. Every buffer is allocated at create: loss and backward allocate
 * nothing. One loss / backward at a time per object. */
typedef struct dsmoe_train_model dsmoe_train_model;

typedef struct dsmoe_train_model_options {
    int32_t n_threads;   /* <= 0: dsmoe_default_threads() */
    int32_t batch;       /* B sequences per step (>= 1) */
    int32_t seq_len;     /* T positions per sequence (1 .. max_position_embeddings) */
    uint64_t seed;       /* initialisation */
    float init_std;      /* std of the normal init of every matrix (default 0.02); the
                            norms start at 1 and the correction bias at 0 */
    float balance_alpha; /* α of the sequence-wise balance loss; 0: none */
    int32_t mtp_depths;  /* MTP depths trained, <= num_nextn_predict_layers; -1: all */
    float mtp_lambda;    /* λ, the weight of the MTP loss (>= 0) */
    int32_t balance_kind; /* dsmoe_balance_loss_kind of the balance loss: SEQ (default,
                             one sequence = a batch row's T positions), EXPERT or SWITCH
                             (over the whole batch: DeepSeek-V2's expert-level loss, the
                             loss-free balancing paper's auxiliary-loss baseline) or ZLOSS */
} dsmoe_train_model_options;

/* n_threads 0, batch 8, seq_len 64, seed 1, init_std 0.02, balance_alpha 0,
 * mtp_depths -1, mtp_lambda 0.3 (DeepSeek-V3's first phase), balance_kind SEQ. */
DSMOE_API void dsmoe_train_model_options_default(dsmoe_train_model_options *opts);
/* Creates the model with initialised parameters (deterministic from seed: tensor i's
 * values come from a stream seeded by (seed, i), whatever the other tensors).
 * Errors: INVALID_CONFIG (the config's validator, or the options' field named),
 * INVALID_ARGUMENT, OUT_OF_MEMORY. *out NULL on error. */
DSMOE_API dsmoe_status dsmoe_train_model_create(const dsmoe_model_config *cfg,
                                                const dsmoe_train_model_options *opts,
                                                dsmoe_train_model **out);
DSMOE_API void dsmoe_train_model_free(dsmoe_train_model *tm);
DSMOE_API const dsmoe_model_config *dsmoe_train_model_config(const dsmoe_train_model *tm);

/* The flat arrays (n floats each). */
DSMOE_API float *dsmoe_train_model_params(dsmoe_train_model *tm, size_t *n);
DSMOE_API float *dsmoe_train_model_grads(dsmoe_train_model *tm, size_t *n);

typedef struct dsmoe_train_tensor {
    dsmoe_model_tensor_spec spec; /* HF name and shape */
    float *data;                  /* into the parameter array (the bias: the layer's; an MTP
                                     depth's embedding / head: the main model's) */
    float *grad;                  /* into the gradient array; NULL when not trainable */
    int64_t offset;               /* of data in the parameter array; -1 when not trainable */
    int64_t n;                    /* elements */
    int32_t trainable;            /* 0 for the correction bias and the shared MTP tensors */
    int32_t decay;                /* 1 for matrices (weight decay applies), 0 otherwise */
} dsmoe_train_tensor;

/* dsmoe_model_tensor_count(cfg, mtp depths) tensors. INVALID_ARGUMENT out of range. */
DSMOE_API int64_t dsmoe_train_model_tensor_count(const dsmoe_train_model *tm);
DSMOE_API dsmoe_status dsmoe_train_model_tensor(dsmoe_train_model *tm, int64_t i,
                                                dsmoe_train_tensor *out);

/* The parts of a loss. */
typedef struct dsmoe_train_loss {
    double total;   /* ce + mtp_lambda · mtp + balance: what the backward differentiates */
    double ce;      /* the main model's mean cross-entropy */
    double mtp;     /* the mean over the MTP depths of their cross-entropies (0 without) */
    double balance; /* the balance losses of every MoE layer, α included (0 without) */
} dsmoe_train_loss;

/* dsmoe_train_model_loss flag: the balance loss from this process's rows alone, without
 * the counts sum of dsmoe_train_model_set_counts_sum (which is then not called): for
 * losses whose balance part is not used and that not every process runs, such as
 * evaluations. */
#define DSMOE_TRAIN_LOSS_LOCAL_COUNTS 1u

/* Loss of tokens (B, T + 1) (ids in 0 .. V − 1) into *out. Keeps what the backward needs
 * and each MoE layer's routing. flags: 0 or DSMOE_TRAIN_LOSS_LOCAL_COUNTS.
 * INVALID_ARGUMENT naming the first bad token (sequence, position, value): nothing
 * changes then (the previous forward stays differentiable); NON_FINITE from a router fed
 * NaN/Inf; IO when a counts sum (dsmoe_train_model_set_counts_sum) fails or reports that
 * another process failed. */
DSMOE_API dsmoe_status dsmoe_train_model_loss(dsmoe_train_model *tm, const int32_t *tokens,
                                              dsmoe_train_loss *out, unsigned flags);
/* Zeroes the gradient array, then fills it with the gradient of the last loss.
 * INVALID_ARGUMENT when no successful loss precedes it. */
DSMOE_API dsmoe_status dsmoe_train_model_backward(dsmoe_train_model *tm);

/* MoE layers (the MTP depths' included): their count, and for the k-th (in layer order) its layer index, the
 * routing of the last loss (over the B·T positions, or NULL), and its bias. */
DSMOE_API int32_t dsmoe_train_model_moe_count(const dsmoe_train_model *tm);
DSMOE_API int32_t dsmoe_train_model_moe_layer(const dsmoe_train_model *tm, int32_t k);
DSMOE_API const dsmoe_moe_routing *dsmoe_train_model_routing(const dsmoe_train_model *tm,
                                                             int32_t k);
DSMOE_API const float *dsmoe_train_model_bias(const dsmoe_train_model *tm, int32_t k);
/* Copies bias (E) into the k-th MoE layer (dsmoe_moe_set_bias: finite, else NON_FINITE
 * and nothing changes). */
DSMOE_API dsmoe_status dsmoe_train_model_set_bias(dsmoe_train_model *tm, int32_t k,
                                                  const float *bias);

/* The k-th MoE layer's object (its weights are views of the parameter array, its weight
 * gradients of the gradient array), or NULL out of range. */
DSMOE_API dsmoe_moe *dsmoe_train_model_moe(dsmoe_train_model *tm, int32_t k);
/* MoE layers run by the caller instead of dsmoe_moe_forward / _backward on the layer
 * object (e.g. expert parallelism: dsmoe_ep, whose MPI the library never sees). forward
 * and backward get the k-th MoE layer's call with the same arguments and contract as
 * dsmoe_moe_forward (y, x, N) and dsmoe_moe_backward (dx, dy, x, dlogits_extra, N);
 * routing returns the routing of the last forward of layer k (over its N positions). */
typedef struct dsmoe_train_moe_exec {
    void *ctx;
    dsmoe_status (*forward)(void *ctx, int32_t k, float *y, const float *x, int64_t N, int nt);
    dsmoe_status (*backward)(void *ctx, int32_t k, float *dx, const float *dy, const float *x,
                             const float *dlogits_extra, int64_t N, int nt);
    const dsmoe_moe_routing *(*routing)(void *ctx, int32_t k);
} dsmoe_train_moe_exec;
/* ex copied; NULL: back to the local layers. INVALID_ARGUMENT when a function is NULL. */
DSMOE_API dsmoe_status dsmoe_train_model_set_moe_exec(dsmoe_train_model *tm,
                                                      const dsmoe_train_moe_exec *ex);
/* Data parallelism with the balance losses whose f is over the whole batch (EXPERT and
 * SWITCH, e.g. the aux-loss and v2 strategies): fn sums n int64 values over the
 * processes, in place (collective: every process calls it in the same order; 0 on
 * success; e.g. dsmoe_run_collective.sum_i64 — dsmoe_run installs it when R > 1). Each
 * loss then makes one call of E + 2 values per MoE layer, after the layer's routing:
 * its counts per expert, its rows, and an error flag (a process that fails earlier in
 * the loss makes that call with the flag set instead, so every process fails with IO
 * instead of waiting). f comes from the summed counts and rows, P and the gradient from
 * this process's rows (dsmoe_balance_loss_ex), and the backward reuses the sums: with
 * equal row counts the mean over the processes of their losses and gradients is the
 * one-process loss and gradient of the whole batch. NULL (the default): this process's
 * counts. Other kinds, and losses with DSMOE_TRAIN_LOSS_LOCAL_COUNTS, never call it.
 * The next backward needs a new loss. Errors: INVALID_ARGUMENT, OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_train_model_set_counts_sum(dsmoe_train_model *tm,
                                                        int (*fn)(void *ctx, int64_t *x,
                                                                  int64_t n),
                                                        void *ctx);

/* Expert sharding (one rank of an expert-parallel run). dsmoe_train_model_create_sharded
 * is dsmoe_train_model_create for a model that holds only the routed experts first ..
 * last (inclusive; last = first − 1: none) of every MoE layer. The parameter and
 * gradient arrays keep their layout (the offsets above), but they are page allocations
 * whose pages become resident when first written, and the other experts' ranges are
 * never written: initialisation skips them (every tensor has its own stream, so the
 * experts held get one process's values), the backward zeroes and fills only what is
 * held, and the pages a MoE layer's create makes resident are given back at once. They read as
 * zeros; the caller must not write them either (optimizer, checkpoint load: see
 * dsmoe_train_model_tensor_expert). Every loss needs an exec (dsmoe_train_model_set_moe_exec)
 * that runs the experts elsewhere, such as dsmoe_ep with this rank's block:
 * INVALID_ARGUMENT otherwise. first = 0, last = E − 1 is dsmoe_train_model_create.
 * Errors as create's, and INVALID_ARGUMENT for a range outside 0 .. E − 1. */
DSMOE_API dsmoe_status dsmoe_train_model_create_sharded(const dsmoe_model_config *cfg,
                                                        const dsmoe_train_model_options *opts,
                                                        int32_t first, int32_t last,
                                                        dsmoe_train_model **out);
/* The routed experts held (*first .. *last); returns 1 when that is not all of them. */
DSMOE_API int dsmoe_train_model_expert_shard(const dsmoe_train_model *tm, int32_t *first,
                                             int32_t *last);
/* Routed expert e of the k-th MoE layer occupies floats [*offset, *offset + *n) of the
 * parameter and gradient arrays (its gate_proj and up_proj, down_proj, padding); experts
 * e, e + 1, .. follow each other, so a block of experts is one range. INVALID_ARGUMENT
 * out of range. */
DSMOE_API dsmoe_status dsmoe_train_model_expert_range(const dsmoe_train_model *tm, int32_t k,
                                                      int32_t e, int64_t *offset, int64_t *n);
/* The routed expert whose weight tensor i is (*k: its MoE layer), or -1 for the other
 * tensors (replicated in an expert-parallel run). */
DSMOE_API int32_t dsmoe_train_model_tensor_expert(const dsmoe_train_model *tm, int64_t i,
                                                  int32_t *k);


/* ------------------------------------------------------------------ runs -- */
/* A training run: a model, its routing strategy, data, optimizer and schedule, trained
 * step by step with evaluations, metrics and checkpoints in a run folder. `dsmoe train`
 * and `dsmoe study` are thin layers over this.
 *
 * Strategies (dsmoe_run_strategy_apply) set the routing fields of the model config and
 * the run's balancing, on the same model and data:
 *   v3               sigmoid scores, noaux_tc, selected weights normalized; bias
 *                    controller γ = 1e-3 (sign rule); sequence-wise loss α = 1e-4
 *   v3-no-balance    v3 with γ = 0 and α = 0
 *   v3-proportional  v3 with the proportional bias rule
 *   v3-no-norm       v3 without normalization of the selected weights
 *   aux-loss         sigmoid, normalized, no bias controller; the loss-free balancing
 *                    paper's auxiliary-loss baseline: expert-level loss over the batch,
 *                    α = 1e-3 (a flag)
 *   v2               softmax, group_limited_greedy (group max), not normalized;
 *                    DeepSeek-V2's expert-level loss α = 3e-3
 *   softmax-norm     v2 with the selected weights normalized
 * Every part stays settable afterwards (the CLI's flags apply after the strategy).
 *
 * Run folder (out_dir):
 *   metrics.jsonl       one JSON object per line; schema in docs/train.md ("run",
 *                       "train" and "eval" records)
 *   checkpoint/         the latest checkpoint: a Hugging Face model directory that
 *                       dsmoe_model_open, `dsmoe eval` and `dsmoe generate` read
 *                       (config.json, model.safetensors under the HF names with the MTP
 *                       depths and the correction biases), plus the training state
 *                       beside it (optimizer moments, balancers, data order, RNG, step,
 *                       the run config); written with dsmoe__dir_begin/_commit, so a
 *                       kill at any moment leaves the previous checkpoint whole.
 * A resumed run continues bit for bit as the uninterrupted run would (same parameters,
 * biases, losses and metrics lines, apart from times and speeds). */

typedef struct dsmoe_run_config {
    dsmoe_model_config model;        /* architecture and routing */
    dsmoe_train_model_options train; /* batch, seq_len, init, balance loss (alpha, kind),
                                        MTP depths and λ; n_threads is ignored here */
    dsmoe_adamw_config adamw;        /* total_steps is set to steps by the run */
    dsmoe_balancer_config balancer;  /* the bias controller; gamma 0: none (biases stay 0) */
    dsmoe_corpus_config corpus;      /* the built-in corpus, when n_data_files is 0 */
    char strategy[32];               /* the name applied last (recorded; "custom" if none) */
    char preset[32];                 /* the model preset the config came from, or "custom" */
    const char *const *data_files;   /* UTF-8 text files instead of the built-in corpus */
    int32_t n_data_files;
    int64_t steps;                   /* optimizer steps in all (>= 1) */
    uint64_t seed;                   /* data order (batches drawn from a stream of it) */
    int64_t eval_every;              /* evaluate every this many steps and after the last; 0:
                                        only after the last */
    int64_t eval_tokens;             /* validation tokens per evaluation (whole windows);
                                        0: the whole validation split */
    int64_t save_every;              /* checkpoint every this many steps and after the last;
                                        0: only after the last */
    int64_t log_every;               /* a "train" record every this many steps (1 default) */
} dsmoe_run_config;

/* The run config of a model preset ("tiny", "small", "default") with the v3 strategy,
 * batch and sequence length sized for the preset, steps so that the default trains in
 * about five minutes on two cores. INVALID_CONFIG for an unknown preset (named). */
DSMOE_API dsmoe_status dsmoe_run_config_default(const char *preset, dsmoe_run_config *rc);
/* Applies strategy name (above) to rc. INVALID_CONFIG naming an unknown strategy and
 * listing the known ones; rc unchanged then. */
DSMOE_API dsmoe_status dsmoe_run_strategy_apply(const char *name, dsmoe_run_config *rc);
/* The i-th strategy name (0 .. count − 1), NULL past the end. */
DSMOE_API const char *dsmoe_run_strategy_name(int i);
/* INVALID_CONFIG naming the field (the model config's, the training options', the
 * optimizer's, the balancer's, the corpus's, or the run's own). */
DSMOE_API dsmoe_status dsmoe_run_config_validate(const dsmoe_run_config *rc);

/* What a run reports as it goes (to a callback, once per step and once per evaluation). */
typedef struct dsmoe_run_progress {
    int64_t step, steps;     /* the step just done (1-based) of steps */
    int32_t is_eval;         /* 1: an evaluation just finished (val_* are set) */
    double loss;             /* total training loss of the step */
    double ce;               /* its cross-entropy */
    double maxvio_batch;     /* mean over the main model's MoE layers of the batch MaxVio */
    double tokens_per_s;     /* training tokens per second, over this session of the run */
    double eta_s;            /* estimated seconds to the end */
    double val_loss;         /* validation cross-entropy (is_eval) */
    double val_maxvio;       /* MaxVio_global over the validation set (is_eval): the mean
                                over the main model's MoE layers of each layer's MaxVio of
                                the counts summed over the validation set */
} dsmoe_run_progress;

typedef void (*dsmoe_run_progress_fn)(const dsmoe_run_progress *p, void *user);

/* Data-parallel runs: the collective operations of a group of R processes ("ranks", e.g.
 * MPI's; libdsmoe itself never needs MPI: the caller supplies them, as the CLI does over
 * MPI_COMM_WORLD under mpirun). Every rank calls dsmoe_run with the same config, out_dir
 * and options; the batch B (B % R == 0, else INVALID_CONFIG) is the one-process run's
 * global batch: every rank draws it and trains on rows [r·B/R, (r+1)·B/R). Losses and
 * gradients are averaged over the ranks, the balancers' counts summed, so every rank
 * applies the same AdamW and bias updates; the balance losses over the whole batch
 * (EXPERT, SWITCH) take f from each MoE layer's counts summed over the ranks
 * (dsmoe_train_model_set_counts_sum with sum_i64); evaluations split the validation
 * windows the same way. Rank 0 alone writes metrics.jsonl and the checkpoint (which does not record
 * R: a run saved by R ranks resumes with any other count). Any rank's error stops every
 * rank with the same status and the message "rank r: <that rank's message>".
 * Each function is collective (every rank calls it, in the same order) and returns 0, or
 * nonzero when the communication failed. */
typedef struct dsmoe_run_collective {
    int32_t rank, size; /* this rank (0 .. size − 1) and the rank count R >= 1 */
    void *ctx;          /* passed to every function */
    /* x (n) = scale · (the ranks' x summed in rank order 0, 1, .., R − 1 in double),
     * rounded to float: the same bits on every rank and in every repeated run. */
    int (*sum_f32)(void *ctx, float *x, int64_t n, double scale);
    /* x (n) = the ranks' x summed in rank order (double): the same bits everywhere. */
    int (*sum_f64)(void *ctx, double *x, int64_t n);
    /* x (n) = the ranks' x summed (exact). */
    int (*sum_i64)(void *ctx, int64_t *x, int64_t n);
    /* Error agreement: each rank passes its status (0: OK) and, when failing, its message
     * in msg (NUL-terminated, cap bytes). Returns 0 if every rank passed 0, else the
     * status of the lowest failing rank, whose index goes to *first_rank and whose
     * message is copied into msg on every rank. */
    int32_t (*agree)(void *ctx, int32_t status, char *msg, size_t cap, int32_t *first_rank);
    /* Optional (NULL: none). attach is called on every rank once the training model is
     * created (before a resumed run's checkpoint is loaded into it) and may install a
     * dsmoe_train_moe_exec (expert parallelism); its errors are agreed on like any
     * other. detach is called before the model is freed. With an exec installed, every
     * rank runs every loss (evaluations too, on padding when its rows are past the end),
     * as its collective MoE layers need. */
    dsmoe_status (*attach)(void *ctx, dsmoe_train_model *tm);
    void (*detach)(void *ctx);
    /* Optional (NULL: every rank holds every routed expert, as above). Expert sharding
     * in memory: the routed experts this rank holds in every MoE layer of n_experts
     * (*first .. *last; last = first − 1: none), asked for before the training model is
     * created (dsmoe_train_model_create_sharded); the ranks' blocks must cover 0 .. E − 1
     * in rank order, and attach must install an exec that runs each rank's block on it
     * (dsmoe_train_model_expert_shard). Then each rank keeps resident, updates and sums
     * only the replicated parameters and its own experts: the gradient average covers the
     * replicated ranges (an expert's gradient is scaled by 1/R on its owner, the bits of
     * the whole-array average), the norm adds the owners' sums of squares (sum_f64),
     * AdamW and its moments cover what the rank holds, a checkpoint gathers the experts
     * on rank 0 (copy_f32) and a resume reads each rank's own. Returns 0, or nonzero for
     * a failure (every rank fails the run). */
    int (*expert_shard)(void *ctx, int32_t n_experts, int32_t *first, int32_t *last);
    /* Optional; needed with expert_shard. Collective (every rank calls it): x (n) of rank
     * `from` is copied into x of rank `to` (from != to); the other ranks' x is untouched
     * (over MPI they return at once). */
    int (*copy_f32)(void *ctx, float *x, int64_t n, int32_t from, int32_t to);
} dsmoe_run_collective;

typedef struct dsmoe_run_options {
    int32_t n_threads;   /* <= 0: dsmoe_default_threads() */
    int32_t resume;      /* 1: continue the run in out_dir from its checkpoint (config NULL:
                            the run's own; otherwise it must equal the saved one) */
    int64_t stop_at;     /* > 0: end after this step's checkpoint, as an interruption would */
    dsmoe_run_progress_fn progress; /* may be NULL */
    void *user;
    const dsmoe_run_collective *collective; /* NULL (or size 1): one process; else a
                                               data-parallel run (above) */
} dsmoe_run_options;

typedef struct dsmoe_run_result {
    int64_t step;            /* the last step done */
    double train_loss;       /* of the last step */
    double val_loss;         /* of the last evaluation */
    double val_maxvio;       /* MaxVio_global of the last evaluation */
    double tokens_per_s;
    double seconds;          /* wall time of this call */
} dsmoe_run_result;

/* Trains (or with opts->resume continues) the run in out_dir, creating the folder.
 * Errors stop the run with a message naming the cause and leave the last good
 * checkpoint as it was: INVALID_CONFIG, IO (naming the path: missing data, unwritable
 * folder), FORMAT (a corrupt or foreign checkpoint, naming the file), NON_FINITE (a NaN
 * or Inf loss or gradient, naming the step), OUT_OF_MEMORY. res may be NULL. */
DSMOE_API dsmoe_status dsmoe_run(const dsmoe_run_config *rc, const char *out_dir,
                                 const dsmoe_run_options *opts, dsmoe_run_result *res);
/* Reads the run config saved in run folder dir's checkpoint (its data_files point into
 * storage owned by the library until the next call from this thread). */
DSMOE_API dsmoe_status dsmoe_run_config_load(const char *dir, dsmoe_run_config *rc);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_TRAIN_H */
