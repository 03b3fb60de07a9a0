/* cli_mpi.c — MPI start-up and error agreement for the CLI (cli_mpi.h). */
#include "cli_mpi.h"

#include "cli.h"

#include <stdlib.h>
#include <string.h>

#ifdef DSMOE_HAVE_MPI
#include <mpi.h>

#include "dsmoe/ep.h"
#endif

static int mpi_on, mpi_rank, mpi_size = 1;
#ifdef DSMOE_HAVE_MPI
static void *scratch; /* the collectives' buffer (below) */
static size_t scratch_cap;
#endif

#ifdef DSMOE_HAVE_MPI
static int launched_by_mpi(void) {
    const char *v[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (getenv(v[i])) return 1;
    return 0;
}
#endif

int cli_mpi_init(int *argc, char ***argv) {
#ifdef DSMOE_HAVE_MPI
    if (!launched_by_mpi()) return 0;
    if (MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "dsmoe: MPI_Init failed\n");
        return CLI_RUNTIME;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);
    mpi_on = 1;
    return 0;
#else
    (void)argc;
    (void)argv;
    const char *n = getenv("OMPI_COMM_WORLD_SIZE");
    if (!n) n = getenv("PMI_SIZE");
    if (n && atoi(n) > 1) {
        fprintf(stderr, "dsmoe: launched as %s processes, but this dsmoe was built without MPI "
                        "(install libopenmpi-dev and rebuild)\n", n);
        return CLI_USAGE;
    }
    return 0;
#endif
}

void cli_mpi_finalize(void) {
#ifdef DSMOE_HAVE_MPI
    if (mpi_on) MPI_Finalize();
    free(scratch);
    scratch = NULL;
    scratch_cap = 0;
#endif
    mpi_on = 0;
}

int cli_mpi_active(void) { return mpi_on; }
int cli_mpi_rank(void) { return mpi_rank; }
int cli_mpi_size(void) { return mpi_size; }

int cli_mpi_agree(int rc, const char *cmd) {
#ifdef DSMOE_HAVE_MPI
    if (!mpi_on) return rc;
    int mine = rc != CLI_OK ? mpi_rank : mpi_size, first = mpi_size;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == mpi_size) return CLI_OK;
    char msg[512];
    int code = rc;
    memset(msg, 0, sizeof msg);
    if (mpi_rank == first) snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
    MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD);
    MPI_Bcast(msg, (int)sizeof msg, MPI_CHAR, first, MPI_COMM_WORLD);
    msg[sizeof msg - 1] = '\0';
    if (rc == CLI_OK)
        fprintf(stderr, "dsmoe %s: rank %d failed%s%s\n", cmd, first, msg[0] ? ": " : "", msg);
    return code;
#else
    (void)cmd;
    return rc;
#endif
}

/* ------------------------------------------------- data-parallel collectives -- */

#ifdef DSMOE_HAVE_MPI
/* Grow-only scratch, so that a run's steps allocate nothing after the first. NULL on
 * every rank when it failed on any (no rank left waiting in an exchange). */
static void *scratch_get(size_t bytes) {
    int ok = 1, all = 0;
    if (bytes > scratch_cap) {
        void *p = realloc(scratch, bytes);
        if (p) scratch = p, scratch_cap = bytes;
        else ok = 0;
    }
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all ? scratch : NULL;
}

enum { CHUNK_PER_RANK = 1 << 16 };

/* A reduce-scatter by hand (MPI's own reductions leave the order open): in chunks, rank
 * s receives every rank's copy of slice s, sums them in rank order in double, then the
 * sums are gathered on every rank. */
static int coll_sum_f32(void *ctx, float *x, int64_t n, double scale) {
    (void)ctx;
    const int R = mpi_size, me = mpi_rank;
    int cnt[1024], dsp[1024], rcnt[1024], rdsp[1024];
    if (R > 1024) return 1;
    float *buf = (float *)scratch_get((size_t)(CHUNK_PER_RANK + 1) * (size_t)R * sizeof(float));
    if (!buf) return 1;
    for (int64_t s0 = 0; s0 < n;) {
        int64_t len = n - s0;
        if (len > (int64_t)CHUNK_PER_RANK * R) len = (int64_t)CHUNK_PER_RANK * R;
        for (int r = 0, at = 0; r < R; r++) {
            cnt[r] = (int)(len / R + (r < len % R));
            dsp[r] = at;
            at += cnt[r];
        }
        for (int r = 0; r < R; r++) rcnt[r] = cnt[me], rdsp[r] = r * cnt[me];
        float *xs = x + s0;
        if (MPI_Alltoallv(xs, cnt, dsp, MPI_FLOAT, buf, rcnt, rdsp, MPI_FLOAT, MPI_COMM_WORLD) !=
            MPI_SUCCESS)
            return 1;
        float *mine = xs + dsp[me];
        for (int i = 0; i < cnt[me]; i++) {
            double a = 0;
            for (int r = 0; r < R; r++) a += (double)buf[(size_t)r * (size_t)cnt[me] + (size_t)i];
            mine[i] = (float)(a * scale);
        }
        if (MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, xs, cnt, dsp, MPI_FLOAT,
                           MPI_COMM_WORLD) != MPI_SUCCESS)
            return 1;
        s0 += len;
    }
    return 0;
}

static int coll_sum_f64(void *ctx, double *x, int64_t n) {
    (void)ctx;
    const int R = mpi_size;
    for (int64_t s0 = 0; s0 < n;) {
        int64_t len = n - s0;
        if (len > CHUNK_PER_RANK) len = CHUNK_PER_RANK;
        double *buf = (double *)scratch_get((size_t)len * (size_t)R * sizeof(double));
        if (!buf) return 1;
        if (MPI_Allgather(x + s0, (int)len, MPI_DOUBLE, buf, (int)len, MPI_DOUBLE, MPI_COMM_WORLD) !=
            MPI_SUCCESS)
            return 1;
        for (int64_t i = 0; i < len; i++) {
            double a = 0;
            for (int r = 0; r < R; r++) a += buf[(size_t)r * (size_t)len + (size_t)i];
            x[s0 + i] = a;
        }
        s0 += len;
    }
    return 0;
}

static int coll_sum_i64(void *ctx, int64_t *x, int64_t n) {
    (void)ctx;
    for (int64_t s0 = 0; s0 < n;) {
        int64_t len = n - s0;
        if (len > (1 << 24)) len = 1 << 24;
        if (MPI_Allreduce(MPI_IN_PLACE, x + s0, (int)len, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD) !=
            MPI_SUCCESS)
            return 1;
        s0 += len;
    }
    return 0;
}

static int32_t coll_agree(void *ctx, int32_t status, char *msg, size_t cap, int32_t *first_rank) {
    (void)ctx;
    int mine = status != 0 ? mpi_rank : mpi_size, first = mpi_size;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == mpi_size) return 0;
    int code = status;
    MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD);
    if (cap > 0) {
        int n = cap > 4096 ? 4096 : (int)cap;
        MPI_Bcast(msg, n, MPI_CHAR, first, MPI_COMM_WORLD);
        msg[n - 1] = '\0';
    }
    if (first_rank) *first_rank = first;
    return code;
}

/* Expert parallelism in training: each MoE layer of the training model through a
 * dsmoe_ep over MPI_COMM_WORLD (experts in contiguous blocks; the gate and shared
 * experts replicated). */
static dsmoe_ep **ep_layers;
static int32_t ep_count;

static dsmoe_status ep_fwd(void *ctx, int32_t k, float *y, const float *x, int64_t N, int nt) {
    (void)ctx;
    return dsmoe_ep_forward(ep_layers[k], y, x, N, nt);
}

static dsmoe_status ep_bwd(void *ctx, int32_t k, float *dx, const float *dy, const float *x,
                           const float *dl, int64_t N, int nt) {
    (void)ctx;
    return dsmoe_ep_backward(ep_layers[k], dx, dy, x, dl, N, nt);
}

static const dsmoe_moe_routing *ep_routing(void *ctx, int32_t k) {
    (void)ctx;
    return dsmoe_ep_last_routing(ep_layers[k]);
}

static void coll_detach(void *ctx) {
    (void)ctx;
    for (int32_t k = 0; ep_layers && k < ep_count; k++) dsmoe_ep_free(ep_layers[k]);
    free((void *)ep_layers);
    ep_layers = NULL;
    ep_count = 0;
}

/* The default split of dsmoe_ep: rank r holds experts floor(r·E/R) .. floor((r+1)·E/R) − 1;
 * the training model is created holding only those (expert sharding in memory). */
static int coll_expert_shard(void *ctx, int32_t E, int32_t *first, int32_t *last) {
    (void)ctx;
    *first = (int32_t)((int64_t)mpi_rank * E / mpi_size);
    *last = (int32_t)((int64_t)(mpi_rank + 1) * E / mpi_size) - 1;
    return 0;
}

/* x of rank `from` into x of rank `to`, in messages below 2^31 floats. */
static int coll_copy_f32(void *ctx, float *x, int64_t n, int32_t from, int32_t to) {
    (void)ctx;
    if (from == to || (mpi_rank != from && mpi_rank != to)) return 0;
    for (int64_t s0 = 0; s0 < n;) {
        const int len = (int)(n - s0 < (1 << 30) ? n - s0 : (1 << 30));
        int rc = mpi_rank == from
                     ? MPI_Send(x + s0, len, MPI_FLOAT, to, 11, MPI_COMM_WORLD)
                     : MPI_Recv(x + s0, len, MPI_FLOAT, from, 11, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return 1;
        s0 += len;
    }
    return 0;
}

static dsmoe_status coll_attach(void *ctx, dsmoe_train_model *tm) {
    const int32_t n = dsmoe_train_model_moe_count(tm);
    ep_layers = (dsmoe_ep **)calloc((size_t)(n > 0 ? n : 1), sizeof(dsmoe_ep *));
    int32_t *bounds = (int32_t *)calloc((size_t)mpi_size + 1, sizeof(int32_t));
    dsmoe_status st = dsmoe_ep_agree(MPI_COMM_WORLD, ep_layers && bounds ? DSMOE_OK
                                                                         : DSMOE_STATUS_OUT_OF_MEMORY);
    if (st != DSMOE_OK || !ep_layers || !bounds) { /* (a failed allocation: st says so) */
        free(bounds);
        coll_detach(ctx);
        return st != DSMOE_OK ? st : DSMOE_STATUS_OUT_OF_MEMORY;
    }
    /* The model's own block on each rank (it holds only those experts' weights). */
    int32_t fl[2] = {0, -1};
    const int sharded = dsmoe_train_model_expert_shard(tm, &fl[0], &fl[1]);
    int any = 0;
    MPI_Allreduce(&sharded, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any && n > 0) { /* the blocks are contiguous in rank order (the run checked) */
        MPI_Allgather(&fl[0], 1, MPI_INT32_T, bounds, 1, MPI_INT32_T, MPI_COMM_WORLD);
        bounds[mpi_size] = dsmoe_moe_get_config(dsmoe_train_model_moe(tm, 0))->router.n_experts;
    }
    for (int32_t k = 0; k < n; k++) {
        /* collective; its errors are the same on every rank */
        if ((st = dsmoe_ep_create_flags(MPI_COMM_WORLD, dsmoe_train_model_moe(tm, k),
                                        any ? bounds : NULL, any ? DSMOE_EP_SHARDED : 0u,
                                        &ep_layers[k])) != DSMOE_OK) {
            free(bounds);
            coll_detach(ctx);
            return st;
        }
        ep_count = k + 1;
    }
    free(bounds);
    const dsmoe_train_moe_exec ex = {NULL, ep_fwd, ep_bwd, ep_routing};
    return dsmoe_train_model_set_moe_exec(tm, &ex);
}

static dsmoe_run_collective run_coll;
#endif

const dsmoe_run_collective *cli_mpi_run_collective(int expert_parallel) {
#ifdef DSMOE_HAVE_MPI
    if (!mpi_on) return NULL;
    run_coll.attach = expert_parallel ? coll_attach : NULL;
    run_coll.detach = expert_parallel ? coll_detach : NULL;
    run_coll.rank = mpi_rank;
    run_coll.size = mpi_size;
    run_coll.ctx = NULL;
    run_coll.sum_f32 = coll_sum_f32;
    run_coll.sum_f64 = coll_sum_f64;
    run_coll.sum_i64 = coll_sum_i64;
    run_coll.agree = coll_agree;
    run_coll.expert_shard = expert_parallel ? coll_expert_shard : NULL;
    run_coll.copy_f32 = coll_copy_f32;
    return &run_coll;
#else
    (void)expert_parallel;
    return NULL;
#endif
}

int cli_mpi_sum_f64(double *x, int64_t n) {
#ifdef DSMOE_HAVE_MPI
    if (!mpi_on) return 0;
    return coll_sum_f64(NULL, x, n);
#else
    (void)x;
    (void)n;
    return 0;
#endif
}

int cli_mpi_gather_rows_f32(float *rows, int64_t n, int64_t len) {
#ifdef DSMOE_HAVE_MPI
    if (!mpi_on || mpi_size == 1) return 0;
    if (len > INT32_MAX) return 1;
    for (int64_t i = 0; i < n; i++) {
        const int owner = (int)(i % mpi_size);
        if (owner == 0) continue;
        float *row = rows + i * len;
        if (mpi_rank == owner) {
            if (MPI_Send(row, (int)len, MPI_FLOAT, 0, 7, MPI_COMM_WORLD) != MPI_SUCCESS) return 1;
        } else if (mpi_rank == 0) {
            if (MPI_Recv(row, (int)len, MPI_FLOAT, owner, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE) !=
                MPI_SUCCESS)
                return 1;
        }
    }
    return 0;
#else
    (void)rows;
    (void)n;
    (void)len;
    return 0;
#endif
}
