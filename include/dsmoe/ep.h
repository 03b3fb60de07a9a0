/*
 * dsmoe/ep.h — expert parallelism over MPI: one DeepSeekMoE layer whose routed experts
 * are sharded over the ranks of a communicator (DeepSeek-V3 report §3.2; SPEC-routing,
 * node-limited routing). Built only when MPI is found (libdsmoe_ep, CMake option
 * DSMOE_MPI); nothing else in dsmoe includes mpi.h, and libdsmoe does not need MPI.
 *
 * Layout. Rank r owns the routed experts [first_r, last_r] (contiguous blocks, in rank
 * order; a rank may own none). The default split gives rank r the experts
 * floor(r·E/R) .. floor((r+1)·E/R) - 1; any split can be given (dsmoe_ep_create's
 * bounds). The gate and the shared experts are replicated: every rank routes its own
 * tokens with the full router and runs the shared experts on them. Deployed as
 * intended a router group is a rank (or a block of ranks), so topk_groups limits the
 * ranks a token reaches; a group may also span ranks, or a rank several groups.
 *
 * Each rank holds a whole dsmoe_moe layer object (loading it is the caller's, e.g.
 * dsmoe_moe_load): only its own experts' weights are read and only their gradients are
 * written, so the other experts' parts of its arrays may be left unresident, holding
 * anything (create with DSMOE_EP_SHARDED: expert-parallel training keeps only each
 * rank's experts in memory, dsmoe_train_model_create_sharded).
 *
 * Tokens. Rank r passes its own T_r tokens; the layer's "global batch" is the ranks'
 * tokens concatenated in rank order (rank 0's first). Every call is collective: all
 * ranks call it, in the same order, with their own T_r (which may be 0).
 *
 * Forward step (dsmoe_ep_forward):
 *   1. route the local tokens (gate projection, dsmoe_router_forward_hidden);
 *   2. per-destination counts with MPI_Alltoall: for each destination rank, the tokens
 *      that have at least one expert there (each such token is sent once per rank, as
 *      DeepSeek-V3 does per node) and the assignments (token, k) it gets;
 *   3. MPI_Alltoallv of the token rows (D floats) and of the assignments (row, expert,
 *      routing weight);
 *   4. each rank runs its experts on the rows it received, grouped by expert in the
 *      global (token, k) order: exactly the rows, blocks and products of the single
 *      process layer;
 *   5. combine: the expert outputs go back (MPI_Alltoallv, one row per assignment) and
 *      the owning rank adds w_k·y_k in k order, then its shared experts' output.
 * The backward runs through the same exchange the other way: the output gradient
 * goes out as the dispatch went (once per token and rank; the expert rank scales it by
 * the weights it received) and the input gradients of the experts come back as the
 * combine did.
 *
 * Bits. Given the same routing, each expert computes exactly what it computes in
 * dsmoe_moe_forward / dsmoe_moe_backward of one process on the global batch (same
 * layer, same bias): the same rows, row blocks and products, whatever R and the split,
 * and the combine adds in the same order. The per-token dense products (the gate
 * projection, the shared experts, the gate's input gradient) are computed by the
 * token's rank, on its part of each of the single process's token blocks. With BLIS's
 * skx kernels (AVX-512) a row's result does not depend on the call's row count, so the
 * forward output, the routing, dx and the routed experts' weight gradients (on their
 * owner ranks) are bit-identical to one process for any split.
 * With other BLIS kernel sets (haswell, zen) it can: splits in which every rank starts
 * at a multiple of 512 tokens of the global batch (the router's projection block) make
 * every such call the single process's, and everything bit-identical; other splits
 * agree to rounding (tests/test_ep_mpi.c checks both ways).
 *
 * Gradients of the replicated parameters (gate weight, shared experts) are per rank:
 * rank r's are its tokens' contribution. Sum them over ranks (dsmoe_ep_allreduce_grads,
 * as data-parallel training does) to get the gradient of the global batch; the sum is
 * the single process's to rounding (bit-identical for R = 1).
 *
 * Errors never hang: a failure on one rank (bad argument, non-finite input, out of
 * memory) is agreed on by every rank before any exchange, and each rank returns the
 * same status with a message naming the first failing rank. dsmoe_ep_create compares
 * the layer's config and a hash of its weights and bias across ranks.
 *
 * Limits: F32 weights in the checkpoint layout, no capacity factor (UNSUPPORTED
 * otherwise). Message sizes are MPI ints: a step's rows · D must stay below 2^31 per
 * rank pair. The layer's buffers grow when a step needs more (never shrink); a step of
 * the same sizes as an earlier one allocates nothing.
 *
 * Example (each rank its own tokens x (T, D)):
 *   MPI_Init(&argc, &argv);
 *   dsmoe_moe *moe;  dsmoe_moe_load("layer.safetensors", NULL, NULL, &moe);  // every rank
 *   dsmoe_ep *ep;
 *   if (dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep) != DSMOE_OK)   // fails on all ranks
 *       fprintf(stderr, "%s\n", dsmoe_last_error());
 *   dsmoe_ep_forward(ep, y, x, T, 0);                                  // collective
 *   dsmoe_ep_stats st;  dsmoe_ep_get_stats(ep, &st);                   // bytes, tokens per rank
 *   dsmoe_ep_free(ep);  dsmoe_moe_free(moe);  MPI_Finalize();
 */
#ifndef DSMOE_EP_H
#define DSMOE_EP_H

#include <mpi.h>

#include "balance.h"
#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsmoe_ep dsmoe_ep;

/* Collective over comm. moe: this rank's copy of the whole layer (the same config,
 * weights and bias on every rank; train = 1 for the backward), borrowed: it must
 * outlive the ep object, and its bias may be changed between steps (dsmoe_moe_set_bias,
 * the same on every rank). bounds: R + 1 nondecreasing values from 0 to E (rank r owns
 * experts bounds[r] .. bounds[r+1] - 1), the same on every rank, or NULL for the
 * default split. Errors, the same on every rank: INVALID_ARGUMENT (bounds, NULL),
 * UNSUPPORTED (BF16, packed layout, capacity), INVALID_CONFIG (configs or bounds that
 * differ across ranks, naming a rank), INVALID_ARGUMENT (weights or bias that differ,
 * naming a rank), OUT_OF_MEMORY. *out is NULL on error. */
DSMOE_API dsmoe_status dsmoe_ep_create(MPI_Comm comm, dsmoe_moe *moe, const int32_t *bounds,
                                       dsmoe_ep **out);
/* dsmoe_ep_create with flags: DSMOE_EP_SHARDED says each rank's layer holds valid
 * weights only for its own experts (the others' memory released): the check of the
 * weights across ranks then covers the replicated ones (gate, bias, shared experts).
 * INVALID_ARGUMENT for unknown flags. */
#define DSMOE_EP_SHARDED 1u
DSMOE_API dsmoe_status dsmoe_ep_create_flags(MPI_Comm comm, dsmoe_moe *moe,
                                             const int32_t *bounds, unsigned flags,
                                             dsmoe_ep **out);
/* Not collective. NULL is a no-op. The layer is not freed. */
DSMOE_API void dsmoe_ep_free(dsmoe_ep *ep);
/* This rank, the rank count, and the experts rank r owns (*first .. *last inclusive;
 * *last = *first - 1 when it owns none). */
DSMOE_API int dsmoe_ep_rank(const dsmoe_ep *ep);
DSMOE_API int dsmoe_ep_size(const dsmoe_ep *ep);
DSMOE_API void dsmoe_ep_experts(const dsmoe_ep *ep, int r, int32_t *first, int32_t *last);

/* Collective. y (T, D) = layer(x (T, D)) for this rank's T tokens (T >= 0, any value
 * per rank). Errors (the same on every rank, naming the failing rank): as
 * dsmoe_moe_forward (NON_FINITE names the rank and its token), OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_ep_forward(dsmoe_ep *ep, float *y, const float *x, int64_t T,
                                        int n_threads);
/* Collective. Backward of the last forward (train = 1, the same x and T): dx (T, D) +=,
 * routed expert gradients of this rank's experts +=, gate and shared gradients += this
 * rank's tokens' part (see above). dlogits_extra (T, E) or NULL as in
 * dsmoe_moe_backward. Errors the same on every rank. */
DSMOE_API dsmoe_status dsmoe_ep_backward(dsmoe_ep *ep, float *dx, const float *dy,
                                         const float *x, const float *dlogits_extra,
                                         int64_t T, int n_threads);
/* Collective: sums the gate and shared-expert gradients over the ranks (MPI_Allreduce,
 * the same result on every rank). The routed experts' gradients stay on their owners. */
DSMOE_API dsmoe_status dsmoe_ep_allreduce_grads(dsmoe_ep *ep);

/* The routing of this rank's tokens in the last forward (indices, weights, scores,
 * logits of its T tokens; counts: its tokens' assignments per expert), or NULL. */
DSMOE_API const dsmoe_moe_routing *dsmoe_ep_last_routing(const dsmoe_ep *ep);
/* Assignments per expert (E) over the global batch of the last forward: the same on
 * every rank (summed with MPI_Allreduce), or NULL before a forward. */
DSMOE_API const int64_t *dsmoe_ep_global_counts(const dsmoe_ep *ep);

/* Makes the balancer sum its counts over the communicator (dsmoe_balancer_set_allreduce
 * with an MPI_Allreduce over ep's communicator), so that every rank applies the same
 * update and holds the same bias. Feed it each rank's own counts
 * (dsmoe_ep_last_routing(ep)->counts); every rank must call dsmoe_balancer_step. */
DSMOE_API void dsmoe_ep_attach_balancer(dsmoe_ep *ep, dsmoe_balancer *b);

/* One rank's figures in the last forward. Bytes are those that cross between
 * different ranks (a rank's rows to itself are not counted): the dispatch (token rows
 * of D floats, plus 12 bytes per assignment: row, expert, weight) and the combine
 * (one row of D floats per assignment). */
typedef struct dsmoe_ep_rank_stats {
    int32_t first_expert, last_expert; /* inclusive; last = first - 1 for none */
    int64_t tokens;          /* this rank's own tokens T_r */
    int64_t tokens_in;       /* token rows its experts received (from every rank, itself too) */
    int64_t assignments_in;  /* (token, expert) assignments its experts ran: its load */
    int64_t bytes_sent;      /* dispatch + combine bytes sent to other ranks */
    int64_t bytes_received;  /* dispatch + combine bytes received from other ranks */
    int64_t dispatch_bytes_sent; /* the dispatch part of bytes_sent */
    int64_t ranks_reached;   /* sum over its tokens of the ranks each reaches */
    int64_t remote_assignments; /* its tokens' assignments to experts of other ranks */
    double expert_cpu_s;     /* CPU time of its experts' forward products (all its threads):
                                its work, unaffected by waiting or by other processes */
} dsmoe_ep_rank_stats;

/* The last forward's figures, the same on every rank. per_rank (R entries) is owned by
 * the ep object and valid until its next forward. */
typedef struct dsmoe_ep_stats {
    int32_t ranks;
    int64_t tokens;                /* global batch */
    double mean_ranks_per_token;   /* ranks a token reaches, averaged over the batch */
    double busiest_load_ratio;     /* max over ranks of assignments_in / their mean */
    double max_expert_cpu_s;       /* max over ranks of expert_cpu_s: the step's critical
                                      path when every rank has cores of its own */
    int64_t bytes_total;           /* sum of bytes_sent over ranks */
    const dsmoe_ep_rank_stats *per_rank;
} dsmoe_ep_stats;
/* INVALID_ARGUMENT before a forward. */
DSMOE_API dsmoe_status dsmoe_ep_get_stats(const dsmoe_ep *ep, dsmoe_ep_stats *out);
/* Writes the stats as JSON (see docs/ep.md): {"ranks": R, "per_rank": [{"rank": r,
 * "experts": [first, last], "tokens_in": n, "bytes_sent": b, "bytes_received": b, ...},
 * ...], ...}. Not collective: call it on one rank. IO names the path. */
DSMOE_API dsmoe_status dsmoe_ep_stats_write_json(const dsmoe_ep_stats *st, const char *path);

/* Collective error agreement, for a caller's own steps that may fail on some ranks
 * (e.g. reading a file): every rank passes its status; each returns OK if all did, else
 * the status of the lowest failing rank, with that rank's dsmoe_last_error() message
 * prefixed by "rank r: " set on every rank. Never hangs as long as every rank calls it. */
DSMOE_API dsmoe_status dsmoe_ep_agree(MPI_Comm comm, dsmoe_status st);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_EP_H */
