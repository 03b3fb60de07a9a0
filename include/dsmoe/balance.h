/*
 * dsmoe/balance.h — load balancing without an auxiliary loss, balance losses and
 * load statistics.
 *
 * 1. Bias controller (dsmoe_balancer): the auxiliary-loss-free strategy of Wang et al.
 *    2024 (arXiv 2408.15664) as used by DeepSeek-V3 (report §2.1.2). A per-expert bias b
 *    (E), added to the affinities for selection only (c_i = s_i + b_i, see router.h), is
 *    nudged once per training step from the tokens each expert received over the
 *    global batch, c_i, with mean c̄ = Σ c_i / E:
 *      sign rule (V3 default):  b_i += γ · sign(c̄ − c_i)        (sign(0) = 0)
 *      proportional rule:       b_i += γ · (c̄ − c_i) / c̄
 *    Optionally each update is re-centred to zero mean. γ follows a two-part schedule:
 *    γ until a number of tokens, then γ_after (V3: 0.001 for the first 14.3T tokens,
 *    then 0).
 * 2. Balance losses, each with its gradient with respect to the router logits:
 *    the complementary sequence-wise loss of DeepSeek-V3 (eqs. 17–20), DeepSeek-V2's
 *    expert-level, device-level and communication balance losses (V2 report §2.2.2),
 *    the Switch / GShard auxiliary loss and the router z-loss (ST-MoE).
 * 3. Load statistics from per-expert counts (dsmoe_router_output.counts) and the
 *    routed indices — no second pass over the logits: MaxVio (loss-free balancing
 *    paper), coefficient of variation, normalised entropy, dead experts, per-group
 *    load and the mean number of groups (nodes) each token reaches.
 * 4. Simulation: a synthetic router-traffic generator (dsmoe_traffic) and a loop that
 *    drives several strategies side by side on the same traffic (dsmoe_sim), with
 *    per-step records, summaries and an atomic JSON-lines trace.
 *
 * Example (one training step of two micro-batches on one process):
 *   dsmoe_balancer_config bc;
 *   dsmoe_balancer_config_default(256, &bc);               // sign rule, γ = 0.001
 *   dsmoe_balancer *bal;
 *   dsmoe_balancer_create(&bc, &bal);
 *   for (int mb = 0; mb < 2; mb++) {
 *       out.counts = counts;                                // (E) int64
 *       dsmoe_router_forward(&rcfg, &out, logits[mb], dsmoe_balancer_bias(bal), T, ws, n, 1);
 *       dsmoe_balancer_accumulate_counts(bal, counts, T);
 *   }
 *   dsmoe_balancer_step(bal);                               // all-reduce, update, reset
 *   dsmoe_balancer_free(bal);
 *
 * Threading: a dsmoe_balancer is not thread-safe (one per MoE layer, used by one
 * thread at a time); the other functions are reentrant. Results never depend on
 * the thread count.
 */
#ifndef DSMOE_BALANCE_H
#define DSMOE_BALANCE_H

#include "io.h"
#include "router.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================ bias controller == */

typedef enum dsmoe_balance_rule {
    DSMOE_BALANCE_RULE_SIGN = 0,         /* b_i += γ·sign(c̄ − c_i) (DeepSeek-V3) */
    DSMOE_BALANCE_RULE_PROPORTIONAL = 1  /* b_i += γ·(c̄ − c_i)/c̄ */
} dsmoe_balance_rule;

/* Plain configuration; fill with dsmoe_balancer_config_default(). */
typedef struct dsmoe_balancer_config {
    int32_t n_experts;          /* E, 1..65536 */
    dsmoe_balance_rule rule;
    float gamma;                /* update rate γ, finite and >= 0 (0.001) */
    int64_t gamma_until_tokens; /* > 0: use gamma while fewer tokens than this have been
                                   applied by earlier steps, then gamma_after; 0: always gamma */
    float gamma_after;          /* rate after gamma_until_tokens, finite and >= 0 (0) */
    int32_t recenter;           /* 1: subtract the mean of each update (updates sum to 0) */
} dsmoe_balancer_config;

/* Defaults: E experts, sign rule, γ = 0.001, no schedule, no re-centring. */
DSMOE_API void dsmoe_balancer_config_default(int32_t n_experts, dsmoe_balancer_config *cfg);
/* INVALID_CONFIG naming the bad field. */
DSMOE_API dsmoe_status dsmoe_balancer_config_validate(const dsmoe_balancer_config *cfg);

/* Sums `n` int64 values element-wise across all processes, in place (e.g. an
 * MPI_Allreduce with MPI_SUM, or NCCL). Returns 0 on success; any other value makes
 * dsmoe_balancer_step fail with IO and change nothing. */
typedef int (*dsmoe_allreduce_fn)(int64_t *values, int64_t n, void *user);

typedef struct dsmoe_balancer dsmoe_balancer;

/* Creates a balancer with a zero bias. Errors: INVALID_ARGUMENT, INVALID_CONFIG,
 * OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_balancer_create(const dsmoe_balancer_config *cfg,
                                             dsmoe_balancer **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_balancer_free(dsmoe_balancer *b);
/* The configuration the balancer was made (or loaded) with. */
DSMOE_API const dsmoe_balancer_config *dsmoe_balancer_get_config(const dsmoe_balancer *b);

/* The bias (E), owned by the balancer, valid until it is freed; pass it to
 * dsmoe_router_forward. It changes only in step, set_bias and center_bias. */
DSMOE_API const float *dsmoe_balancer_bias(const dsmoe_balancer *b);
/* Replaces the bias (E) (e.g. from a checkpoint's e_score_correction_bias). Every
 * value must be finite (NON_FINITE names the expert; nothing changes). */
DSMOE_API dsmoe_status dsmoe_balancer_set_bias(dsmoe_balancer *b, const float *bias /* (E) */);
/* Subtracts the mean from the bias (the selection is unchanged by a common shift,
 * except under the Hugging Face 0.0 group mask). */
DSMOE_API void dsmoe_balancer_center_bias(dsmoe_balancer *b);

/* Adds one micro-batch's tokens per expert (E) (e.g. dsmoe_router_output.counts) to
 * the pending counts. n_tokens: the tokens of that micro-batch (for the rate
 * schedule and the token counter). Counts must be >= 0. */
DSMOE_API dsmoe_status dsmoe_balancer_accumulate_counts(dsmoe_balancer *b,
                                                        const int64_t *counts, /* (E) */
                                                        int64_t n_tokens);
/* Same from the routed indices (T, K); tokens with mask[t] == 0 (padding) are
 * skipped; mask may be NULL (all tokens count). An index outside 0..E-1 is
 * INVALID_ARGUMENT naming the token, and nothing is added. */
DSMOE_API dsmoe_status dsmoe_balancer_accumulate(dsmoe_balancer *b,
                                                 const int32_t *indices, /* (T, K) */
                                                 const uint8_t *mask,    /* (T) or NULL */
                                                 int64_t T, int32_t K);

/* Installs (or removes, fn = NULL) the all-reduce used by dsmoe_balancer_step. */
DSMOE_API void dsmoe_balancer_set_allreduce(dsmoe_balancer *b, dsmoe_allreduce_fn fn,
                                            void *user);

/* Ends a training step: sums the pending counts and tokens across processes with the
 * all-reduce callback (one call of E + 1 values: counts, then tokens), applies the
 * update rule once with the rate of the schedule, adds the counts to the run totals
 * and clears the pending ones. A step with no tokens (every count 0) leaves the bias
 * unchanged but still counts as a step. Allocates nothing. */
DSMOE_API dsmoe_status dsmoe_balancer_step(dsmoe_balancer *b);

/* Counters and count vectors. */
typedef struct dsmoe_balancer_info {
    int32_t n_experts;
    int64_t steps;          /* steps applied */
    int64_t tokens;         /* tokens over all applied steps (after all-reduce) */
    int64_t pending_tokens; /* tokens accumulated since the last step (this process) */
    float last_gamma;       /* rate used by the last step (0 before the first) */
} dsmoe_balancer_info;
DSMOE_API void dsmoe_balancer_get_info(const dsmoe_balancer *b, dsmoe_balancer_info *info);
/* Count vectors (E), owned by the balancer: pending (this process, since the last
 * step), last (the global counts the last step applied), total (sum of all applied). */
DSMOE_API const int64_t *dsmoe_balancer_counts_pending(const dsmoe_balancer *b);
DSMOE_API const int64_t *dsmoe_balancer_counts_last(const dsmoe_balancer *b);
DSMOE_API const int64_t *dsmoe_balancer_counts_total(const dsmoe_balancer *b);

/* Saves the whole state (config, bias, counters, pending/last/total counts) as a
 * safetensors file, atomically; loading it gives a balancer that continues exactly
 * (the all-reduce callback is not saved). Tensors, for prefix P:
 *   P"e_score_correction_bias"  F32 (E)     — the Hugging Face DeepseekV3 name
 *   P"balancer.counts"          I64 (3, E)  — pending, last, total
 *   P"balancer.state"           I64 (8)     — format 1, E, rule, recenter,
 *                                             gamma_until_tokens, steps, tokens,
 *                                             pending_tokens
 *   P"balancer.rates"           F32 (3)     — gamma, gamma_after, last_gamma
 * dsmoe_balancer_save uses P = "" and also writes the metadata key
 * "format" = "dsmoe.balancer". */
DSMOE_API dsmoe_status dsmoe_balancer_save(const dsmoe_balancer *b, const char *path);
/* Creates a balancer from a file written by dsmoe_balancer_save. FORMAT (naming the
 * tensor) on missing or inconsistent tensors; IO on a missing file. */
DSMOE_API dsmoe_status dsmoe_balancer_load(const char *path, dsmoe_balancer **out);
/* Adds the tensors above under `prefix` (e.g. "model.layers.3.mlp.gate.") to a
 * writer, for checkpoints holding several layers. The tensors are borrowed: do not
 * change or free the balancer before dsmoe_safetensors_writer_save. */
DSMOE_API dsmoe_status dsmoe_balancer_write(const dsmoe_balancer *b,
                                            dsmoe_safetensors_writer *w, const char *prefix);
/* Creates a balancer from the tensors under `prefix` of an open file. */
DSMOE_API dsmoe_status dsmoe_balancer_read(const dsmoe_safetensors *st, const char *prefix,
                                           dsmoe_balancer **out);

/* ---------------------------------------------------------- bias storage -- */
/* What storing a bias in bf16 would do (serving engines that keep the correction
 * bias in bf16 have lost routing decisions this way). */
typedef struct dsmoe_bias_bf16_report {
    int32_t distinct_f32;   /* distinct fp32 values */
    int32_t distinct_bf16;  /* distinct values after rounding to bf16 */
    int32_t collapsed;      /* experts whose bf16 value equals that of another expert
                               whose fp32 value differed by more than gamma/2 (by
                               anything when gamma = 0) */
    int32_t step_lost;      /* experts for which a ±gamma update would round back to the
                               same bf16 value (0 when gamma <= 0) */
    float max_abs_error;    /* max |bf16(b_i) − b_i| */
    float mean;             /* mean of the bias */
} dsmoe_bias_bf16_report;
/* Fills the report for bias (E). gamma: the update step (0: none); it also sets the
 * resolution of "collapsed", so that fp32 noise far below a step does not count.
 * Allocates a temporary sorted copy (OUT_OF_MEMORY possible). */
DSMOE_API dsmoe_status dsmoe_bias_bf16_check(const float *bias /* (E) */, int32_t E,
                                             float gamma, dsmoe_bias_bf16_report *report);
/* Subtracts the mean from bias (E) in place (double accumulation), to keep values
 * small (finer bf16/fp16 spacing) before storage. */
DSMOE_API void dsmoe_bias_center(float *bias /* (E) */, int32_t E);

/* ============================================================ balance losses == */

typedef enum dsmoe_balance_loss_kind {
    /* DeepSeek-V3 complementary sequence-wise loss (eqs. 17–20), per sequence of T_s
     * tokens: L = α Σ_i f_i P_i, f_i = E/(K T_s)·#{t: i chosen for t},
     * P_i = (1/T_s) Σ_t s'_{i,t}, s' = s / Σ_j s_j. Perfect balance gives α. */
    DSMOE_BALANCE_LOSS_SEQ = 0,
    /* DeepSeek-V2 expert-level loss: the same formula (V2 uses softmax scores). */
    DSMOE_BALANCE_LOSS_EXPERT = 1,
    /* DeepSeek-V2 device-level loss over D devices of E/D contiguous experts:
     * L = α Σ_d f'_d P'_d, f'_d = mean of f_i over the device, P'_d = Σ_{i∈d} P_i.
     * Perfect balance gives α. */
    DSMOE_BALANCE_LOSS_DEVICE = 2,
    /* DeepSeek-V2 communication loss: L = α Σ_d f''_d P'_d,
     * f''_d = D/(M T_s)·#{t: some expert of t lives on device d}, M = devices per
     * token. Perfect balance (every token on M devices, evenly) gives α. */
    DSMOE_BALANCE_LOSS_COMM = 3,
    /* Switch / GShard auxiliary loss: L = α E Σ_i (n_i / (K T_s)) P_i with n_i the
     * token-expert assignments of expert i. Equals EXPERT in value; the Hugging Face
     * Mixtral version is K times this. Perfect balance gives α. */
    DSMOE_BALANCE_LOSS_SWITCH = 4,
    /* Router z-loss (ST-MoE): L = α (1/T) Σ_t (log Σ_j exp(u_{t,j}))², from the logits
     * u; sequences play no part. */
    DSMOE_BALANCE_LOSS_ZLOSS = 5
} dsmoe_balance_loss_kind;

typedef enum dsmoe_balance_count {
    DSMOE_BALANCE_COUNT_ROUTED = 0, /* f from the routed (biased, group-limited) selection */
    DSMOE_BALANCE_COUNT_TOPK = 1    /* f from the plain top-K of the raw scores s (the
                                       paper's TopK(s) indicator; ties: lower id) */
} dsmoe_balance_count;

typedef struct dsmoe_balance_loss_config {
    dsmoe_balance_loss_kind kind;
    float alpha;                    /* coefficient, finite and >= 0 */
    int64_t seq_len;                /* tokens per sequence; T % seq_len == 0; 0: the whole
                                       batch is one sequence */
    dsmoe_balance_count count_from; /* ROUTED (default) or TOPK */
    int32_t normalize_scores;       /* 1 (default): P from s / Σ_j s_j (the paper); 0: from
                                       s as given (the released remote code's seq_aux) */
    int32_t n_devices;              /* D for DEVICE and COMM; 0: the router's n_groups */
    int32_t device_topm;            /* M for COMM; 0: the router's topk_groups */
} dsmoe_balance_loss_config;

/* Defaults for a kind: α = 1e-4 (SEQ), 3e-3 (EXPERT), 5e-2 (DEVICE), 2e-2 (COMM),
 * 1e-2 (SWITCH), 1e-3 (ZLOSS); seq_len 0, ROUTED, normalize 1, devices from the
 * router. */
DSMOE_API void dsmoe_balance_loss_config_default(dsmoe_balance_loss_kind kind,
                                                 dsmoe_balance_loss_config *cfg);
/* Parses "seq", "expert", "device", "comm", "switch", "zloss"; NOT_FOUND otherwise. */
DSMOE_API dsmoe_status dsmoe_balance_loss_kind_parse(const char *name,
                                                     dsmoe_balance_loss_kind *kind);
DSMOE_API const char *dsmoe_balance_loss_kind_name(dsmoe_balance_loss_kind kind);

/* Workspace bytes for dsmoe_balance_loss over T tokens (0 if lc or rc is invalid). */
DSMOE_API size_t dsmoe_balance_loss_workspace_size(const dsmoe_balance_loss_config *lc,
                                                   const dsmoe_router_config *rc, int64_t T);

/* Computes the loss (the mean over the T / seq_len sequences; the mean over tokens
 * for ZLOSS) into *loss and, if dlogits is not NULL, ACCUMULATES (+=) its gradient
 * with respect to the router logits, through the normalisation s' = s / Σ s and the
 * router's score function (sigmoid: ds/du = s(1 − s); softmax: its Jacobian). The
 * counts f are constants (not differentiable), as in every framework.
 * Uses from rc: n_experts (E), top_k (K), score_func, and n_groups / topk_groups for
 * the device defaults. scores: the router's affinities (dsmoe_router_output.scores);
 * indices: its choice (needed for ROUTED counts, DEVICE, COMM; may be NULL for
 * TOPK counts); logits: needed by ZLOSS only (may be NULL otherwise).
 * Errors: INVALID_CONFIG (naming the field), INVALID_ARGUMENT (NULL pointers, an
 * index out of range naming the token, T % seq_len != 0), WORKSPACE_TOO_SMALL.
 * Sequences run in parallel; results are bit-identical for any thread count. */
DSMOE_API dsmoe_status dsmoe_balance_loss(const dsmoe_balance_loss_config *lc,
                                          const dsmoe_router_config *rc, double *loss,
                                          float *dlogits,         /* (T, E) += or NULL */
                                          const float *scores,    /* (T, E) */
                                          const int32_t *indices, /* (T, K) or NULL */
                                          const float *logits,    /* (T, E) or NULL */
                                          int64_t T, void *workspace, size_t workspace_size,
                                          int n_threads);

/* dsmoe_balance_loss with f taken from given counts instead of this call's tokens, for
 * a batch split over R processes (data parallelism) whose f is over the whole batch:
 * counts (E) are the assignments per expert over all the batch's counts_T tokens (e.g.
 * each process's counts — dsmoe_load_counts of its indices for ROUTED, its plain top-K
 * for TOPK — summed over the processes), so f_i = E/(K·counts_T)·counts_i, while P and
 * the gradient come from this call's T tokens (P_i its mean of s'_{i,t}, dL/ds' = w_i/T).
 * With T = counts_T/R tokens on each process, the mean over the processes of their
 * losses and gradients is the one-process loss and gradient of the whole batch.
 * Kinds SEQ, EXPERT, SWITCH and DEVICE, over one sequence (seq_len 0 or T); indices may
 * be NULL (not read). counts NULL: dsmoe_balance_loss. Errors as dsmoe_balance_loss,
 * and INVALID_ARGUMENT for COMM or ZLOSS with counts, several sequences, counts_T < 1
 * or a negative count (naming the expert). */
DSMOE_API dsmoe_status dsmoe_balance_loss_ex(const dsmoe_balance_loss_config *lc,
                                             const dsmoe_router_config *rc, double *loss,
                                             float *dlogits,         /* (T, E) += or NULL */
                                             const float *scores,    /* (T, E) */
                                             const int32_t *indices, /* (T, K) or NULL */
                                             const float *logits,    /* (T, E) or NULL */
                                             int64_t T,
                                             const int64_t *counts,  /* (E) or NULL */
                                             int64_t counts_T, void *workspace,
                                             size_t workspace_size, int n_threads);

/* ============================================================ load statistics == */

/* Statistics of per-expert loads. MaxVio = (max_i c_i − c̄)/c̄ (Wang et al. 2024);
 * over one batch it is MaxVio_batch, over counts summed over a run MaxVio_global. */
typedef struct dsmoe_load_stats {
    int32_t n_experts;     /* E */
    int64_t total;         /* Σ c_i (token-expert assignments) */
    double mean;           /* c̄ = total / E */
    int64_t max, min;
    int32_t argmax;        /* lowest expert id with the maximum */
    double maxvio;         /* (max − c̄)/c̄; 0 when total == 0 */
    double cv;             /* population standard deviation / c̄; 0 when total == 0 */
    double entropy;        /* −Σ p_i ln p_i / ln E with p = c / total: 1 = even, 0 = one
                              expert takes all (1 for E == 1; 0 when total == 0) */
    int32_t dead;          /* experts with c_i == 0 */
    int32_t n_groups;      /* G used for the group figures (1: none) */
    double group_maxvio;   /* MaxVio of the G group (node) loads */
    double group_cv;       /* CV of the group loads */
} dsmoe_load_stats;

/* Statistics of counts (E); G groups of E/G contiguous experts (G = 1 for none;
 * E % G == 0). Errors: INVALID_ARGUMENT (NULL, E < 1, negative count naming the
 * expert), INVALID_CONFIG (bad G). */
DSMOE_API dsmoe_status dsmoe_load_stats_compute(const int64_t *counts /* (E) */, int32_t E,
                                                int32_t G, dsmoe_load_stats *out);
/* counts (E) = tokens per expert in indices (T, K), tokens with mask[t] == 0
 * skipped (mask may be NULL). Index out of range: INVALID_ARGUMENT naming the token;
 * counts is then unchanged. */
DSMOE_API dsmoe_status dsmoe_load_counts(int64_t *counts /* (E) */,
                                         const int32_t *indices /* (T, K) */,
                                         const uint8_t *mask /* (T) or NULL */, int64_t T,
                                         int32_t K, int32_t E);
/* group_counts (G) = sums of counts (E) over G groups of E/G contiguous experts. */
DSMOE_API dsmoe_status dsmoe_load_group_counts(int64_t *group_counts /* (G) */,
                                               const int64_t *counts /* (E) */, int32_t E,
                                               int32_t G);
/* *mean = average over the unmasked tokens of the number of distinct groups of
 * E/G experts among each token's K experts (0 when no token counts). */
DSMOE_API dsmoe_status dsmoe_load_groups_per_token(double *mean,
                                                   const int32_t *indices /* (T, K) */,
                                                   const uint8_t *mask /* (T) or NULL */,
                                                   int64_t T, int32_t K, int32_t E, int32_t G);

/* ================================================================ simulation == */
/* Studying balancing without training a model (what `dsmoe simulate` runs): a
 * synthetic traffic generator of router logits, and a simulation that routes each
 * step's logits once per strategy with that strategy's bias, feeds the counts to the
 * strategy's balancer, measures the load and the sequence-wise loss, and optionally
 * writes one JSON line per step and strategy to a trace file (atomically).
 *
 * Example (the default of `dsmoe simulate`):
 *   dsmoe_router_config rc;   dsmoe_router_preset("deepseek-v3", &rc);
 *   dsmoe_traffic_config tc;  dsmoe_traffic_config_default(rc.n_experts, &tc);
 *   dsmoe_sim_config sc;      dsmoe_sim_config_default(&rc, &sc);  // none, sign, prop.
 *   dsmoe_traffic *tr;  dsmoe_sim *sim;
 *   dsmoe_traffic_create(&tc, &tr);  dsmoe_sim_create(&sc, &sim);
 *   float *logits = malloc(sizeof(float) * tc.tokens * tc.n_experts);
 *   for (int64_t s = 0; s < sc.steps; s++) {
 *       dsmoe_traffic_next(tr, logits, NULL);
 *       dsmoe_sim_step(sim, logits);
 *   }
 *   dsmoe_sim_summary sum;  dsmoe_sim_get_summary(sim, 1, &sum);  // sum.last.maxvio
 *   dsmoe_sim_free(sim);  dsmoe_traffic_free(tr);  free(logits);
 *
 * Threading: a dsmoe_traffic or dsmoe_sim is used by one thread at a time; the
 * routing inside a step uses sc.n_threads threads and its results never depend on
 * that number. */

/* ------------------------------------------------------- synthetic traffic -- */
/* Expert i of domain d has a mean logit mu_{d,i} = profile[rank_{d}(i)] where
 * profile[r] = −skew·ln(1 + r), centred to zero mean, and rank_d is a random
 * permutation of the experts (Fisher–Yates). With drift R > 0 each domain has R + 1
 * rankings and the means move linearly from one to the next, R times over `steps`
 * steps (after `steps` steps they stay at the last ranking). A step is T tokens in
 * sequences of seq_len tokens; each sequence draws one domain uniformly (no draw
 * when n_domains == 1) and each token's logits are mu_{d,i} + noise·z with z
 * approximately standard normal (the sum of four 16-bit uniforms, centred, scaled
 * to unit variance; |z| < 3.47). Everything is a function of the seed: one splitmix64
 * stream (state = seed·0x2545F4914F6CDD1D + 0x5EAD) draws the permutations at
 * creation, then per step each sequence's domain and its tokens' noise, in order. */
typedef struct dsmoe_traffic_config {
    int32_t n_experts; /* E, 1..DSMOE_MAX_EXPERTS */
    int64_t steps;     /* length of the run the drift is spread over, >= 1 (400) */
    int64_t tokens;    /* T per step, >= 1 (2048) */
    int64_t seq_len;   /* tokens per sequence, divides T; 0: 512 if that divides T, else T */
    int32_t n_domains; /* 1..1024 (1) */
    double skew;       /* 0..100 (0.3; 0: every expert equally popular) */
    double noise;      /* standard deviation of the per-token noise, 0..1000 (1) */
    double drift;      /* number of ranking changes over the run, 0..1000 (0) */
    uint64_t seed;     /* any value (1) */
} dsmoe_traffic_config;

/* The defaults above for E experts. */
DSMOE_API void dsmoe_traffic_config_default(int32_t n_experts, dsmoe_traffic_config *cfg);
/* INVALID_CONFIG naming the field ("traffic seq_len = 30 does not divide the 100
 * tokens of a step"). */
DSMOE_API dsmoe_status dsmoe_traffic_config_validate(const dsmoe_traffic_config *cfg);

typedef struct dsmoe_traffic dsmoe_traffic;
/* Allocates everything the generator needs and draws the rankings. Errors:
 * INVALID_ARGUMENT (NULL), INVALID_CONFIG, OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_traffic_create(const dsmoe_traffic_config *cfg,
                                            dsmoe_traffic **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_traffic_free(dsmoe_traffic *tr);
/* The (validated, seq_len resolved) configuration. */
DSMOE_API const dsmoe_traffic_config *dsmoe_traffic_get_config(const dsmoe_traffic *tr);
/* Writes the next step's logits (T, E) and, if domains is not NULL, each token's
 * domain (T) in 0..n_domains-1. Both are caller-owned. Allocates nothing. Errors:
 * INVALID_ARGUMENT (NULL tr or logits). */
DSMOE_API dsmoe_status dsmoe_traffic_next(dsmoe_traffic *tr, float *logits /* (T, E) */,
                                          int32_t *domains /* (T) or NULL */);
/* Steps produced so far. */
DSMOE_API int64_t dsmoe_traffic_step_index(const dsmoe_traffic *tr);
/* The mean logits mu (E) of `domain` used by the last step produced (before the first:
 * those of step 0), owned by the generator, valid until the next call of next or
 * free; NULL for a domain out of range. The expert with the largest value is the most
 * popular. */
DSMOE_API const float *dsmoe_traffic_popularity(const dsmoe_traffic *tr, int32_t domain);

/* ------------------------------------------------------------ strategies -- */
#define DSMOE_SIM_MAX_STRATEGIES 8

/* One balancing strategy of a simulation. */
typedef struct dsmoe_sim_strategy {
    char name[64];                  /* label in traces and summaries: non-empty, printable
                                       ASCII without '"' or '\\' (e.g. "sign:0.01") */
    int32_t balance;                /* 1: run `balancer`; 0: no balancing (the bias stays at
                                       its initial value; rates read 0) */
    dsmoe_balancer_config balancer; /* used when balance == 1; n_experts must be the
                                       router's E */
} dsmoe_sim_strategy;

/* Parses "none", "sign[:GAMMA]" or "proportional[:GAMMA]" ("prop" too) into s, with
 * the balancer defaults for E experts, gamma = `gamma` unless the spec gives one
 * (finite, >= 0), and name = spec. INVALID_ARGUMENT naming the spec on anything else
 * (an unknown rule, a rate after "none", a bad rate, a spec of 64 bytes or more). */
DSMOE_API dsmoe_status dsmoe_sim_strategy_parse(const char *spec, int32_t n_experts,
                                                float gamma, dsmoe_sim_strategy *s);

/* ----------------------------------------------------------- simulation -- */
typedef struct dsmoe_sim_config {
    dsmoe_router_config router;  /* must be valid with use_bias = 1: every strategy routes
                                    with its own bias */
    int64_t tokens;              /* T per step, >= 1 */
    int64_t steps;               /* planned steps, >= 1: sets the "last" window; more or
                                    fewer may be run */
    double last_fraction;        /* (0, 1]: the last ceil(fraction·steps) steps are the
                                    "last" window (0.2) */
    double threshold;            /* >= 0: first_step_below reports the first step whose
                                    MaxVio_batch is below it (0.5) */
    float alpha;                 /* coefficient of the sequence-wise loss seq_aux, finite
                                    and >= 0 (1e-4) */
    int64_t seq_len;             /* tokens per sequence for seq_aux, divides T (T) */
    dsmoe_balance_count seq_count; /* counts of seq_aux: ROUTED (default) or TOPK */
    int n_threads;               /* threads of the routing and the loss; <= 0: default (1) */
    int32_t n_strategies;        /* 1..DSMOE_SIM_MAX_STRATEGIES */
    dsmoe_sim_strategy strategies[DSMOE_SIM_MAX_STRATEGIES];
} dsmoe_sim_config;

/* Defaults for a router config (copied, use_bias set to 1): T = 2048, 400 steps,
 * last 20%, threshold 0.5, α = 1e-4, seq_len 512 (set it again when changing tokens:
 * it must divide T), routed counts, 1 thread, and three strategies: "none", "sign",
 * "proportional" at γ = 0.001 for E = router->n_experts. */
DSMOE_API void dsmoe_sim_config_default(const dsmoe_router_config *router,
                                        dsmoe_sim_config *cfg);
/* INVALID_CONFIG naming the field: "router: <the router's message>", "tokens",
 * "steps", "last_fraction", "threshold", "alpha", "seq_len", "seq_count",
 * "n_strategies", "strategies[i] (name): <field or the balancer's message>". */
DSMOE_API dsmoe_status dsmoe_sim_config_validate(const dsmoe_sim_config *cfg);

/* One strategy's record of the last step (what one trace line holds). Pointers are
 * owned by the simulation and valid until its next step or free. */
typedef struct dsmoe_sim_record {
    int64_t step;            /* from 0 */
    int64_t tokens;          /* T */
    float gamma;             /* rate the balancer applied at this step (0 for none) */
    const int64_t *counts;   /* (E) tokens per expert of this step */
    dsmoe_load_stats stats;  /* of counts with G = router n_groups: stats.maxvio is
                                MaxVio_batch */
    double groups_per_token; /* mean number of groups a token reached */
    double seq_aux;          /* the sequence-wise loss of this step (measured, not trained) */
    const float *bias;       /* (E) after this step's update */
} dsmoe_sim_record;

/* A strategy's figures over the steps run so far. */
typedef struct dsmoe_sim_summary {
    int64_t steps;                 /* steps run */
    int64_t last_steps;            /* of those, steps in the "last" window */
    dsmoe_load_stats run;          /* counts summed over all steps: run.maxvio is
                                      MaxVio_global */
    dsmoe_load_stats last;         /* counts summed over the last window */
    double maxvio_batch_last_mean; /* mean of the per-step MaxVio_batch over the window */
    double seq_aux_last_mean;      /* mean seq_aux over the window */
    double groups_per_token_last_mean;
    int64_t first_step_below;      /* first step with MaxVio_batch < threshold, -1: none */
    double bias_spread;            /* max − min of the current bias */
    const int64_t *run_counts;     /* (E) owned by the simulation, valid until the next step */
    dsmoe_bias_bf16_report bf16;          /* storing the current bias in bf16 (with the
                                             strategy's gamma; 0 for none) */
    dsmoe_bias_bf16_report bf16_centred;  /* the same after subtracting its mean */
} dsmoe_sim_summary;

typedef struct dsmoe_sim dsmoe_sim;
/* Validates the config and allocates every buffer, workspace and balancer the steps
 * need; the bias of every strategy starts at zero. Errors: INVALID_ARGUMENT (NULL),
 * INVALID_CONFIG (as validate), OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_sim_create(const dsmoe_sim_config *cfg, dsmoe_sim **out);
/* NULL is a no-op. An open trace that was not finished is discarded: its path is left
 * as it was. */
DSMOE_API void dsmoe_sim_free(dsmoe_sim *sim);
DSMOE_API const dsmoe_sim_config *dsmoe_sim_get_config(const dsmoe_sim *sim);
/* Sets the initial bias (E) of every strategy; only before the first step
 * (INVALID_ARGUMENT after). NON_FINITE naming the expert; nothing changes on error. */
DSMOE_API dsmoe_status dsmoe_sim_set_bias(dsmoe_sim *sim, const float *bias /* (E) */);
/* Starts writing the trace to `path`: a temporary file next to it, renamed over it by
 * dsmoe_sim_trace_finish (so `path` is never seen half-written). Each step then
 * appends, per strategy in order, one line
 *   {"step":S,"strategy":"NAME","gamma":G,"tokens":T,"counts":[E ints],
 *    "maxvio_batch":X,"cv":X,"entropy":X,"dead":N,"group_maxvio":X,
 *    "groups_per_token":X,"seq_aux":X,"bias":[E floats after the update]}
 * (floats with 9 significant digits, gamma with 6). Only before the first step.
 * Errors: INVALID_ARGUMENT (NULL, a trace already open, steps already run), IO (the
 * folder is missing or not writable: nothing is created). */
DSMOE_API dsmoe_status dsmoe_sim_trace_open(dsmoe_sim *sim, const char *path);
/* Syncs the trace and renames it over its path. IO on failure (the path then keeps its
 * old content, the temporary file is removed). A no-op when no trace is open. */
DSMOE_API dsmoe_status dsmoe_sim_trace_finish(dsmoe_sim *sim);
/* One training step on logits (T, E): for each strategy, routes with its bias,
 * computes the load statistics and seq_aux, accumulates the counts and steps its
 * balancer (update rule, schedule), and appends its trace line. Allocates nothing.
 * Errors: INVALID_ARGUMENT (NULL), NON_FINITE (a NaN/Inf logit under
 * nonfinite = error, naming step, token and expert; found by the first strategy's
 * routing, so nothing changes), IO (writing the trace: the trace is discarded, and
 * the strategies up to the failing line have taken the step). A failed step is not
 * counted in dsmoe_sim_steps. */
DSMOE_API dsmoe_status dsmoe_sim_step(dsmoe_sim *sim, const float *logits /* (T, E) */);
/* Steps run so far. */
DSMOE_API int64_t dsmoe_sim_steps(const dsmoe_sim *sim);
/* The record of strategy s (0..n_strategies-1) for the last step; INVALID_ARGUMENT
 * before the first step or for s out of range. */
DSMOE_API dsmoe_status dsmoe_sim_get_record(const dsmoe_sim *sim, int32_t s,
                                            dsmoe_sim_record *out);
/* The summary of strategy s. Allocates (the bf16 report sorts a copy): not for a hot
 * loop. INVALID_ARGUMENT for s out of range; with no step run, every figure is 0 and
 * first_step_below is -1. */
DSMOE_API dsmoe_status dsmoe_sim_get_summary(const dsmoe_sim *sim, int32_t s,
                                             dsmoe_sim_summary *out);
/* The balancer of strategy s (NULL for s out of range), owned by the simulation: read
 * its bias and counters, or save it; do not free it. Strategies with balance = 0
 * have one too (γ = 0), which keeps their bias. */
DSMOE_API const dsmoe_balancer *dsmoe_sim_balancer(const dsmoe_sim *sim, int32_t s);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_BALANCE_H */
