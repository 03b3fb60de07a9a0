/*
 * run_internal.h — declarations shared by the runs' files (run_config.c, checkpoint.c,
 * run.c); not installed.
 */
#ifndef DSMOE_RUN_INTERNAL_H
#define DSMOE_RUN_INTERNAL_H

#include "train/train_internal.h"

#include <stdint.h>

/* ------------------------------------------------------------ run config -- */
/* The run config's numeric fields (the model config aside, which config.json holds):
 * integers (enums and uint64 bit-cast) and floating-point values (floats widened
 * exactly), each under a stable name, for the checkpoint and for comparisons. */
#define DSMOE__RUN_INT_FIELDS 21
#define DSMOE__RUN_FLOAT_FIELDS 13
/* The name of integer field i (is_float 0) or floating-point field i (1); NULL past the end. */
const char *dsmoe__run_field_name(int is_float, int i);
void dsmoe__run_config_pack(const dsmoe_run_config *rc, int64_t *ints, double *flts);
void dsmoe__run_config_unpack(dsmoe_run_config *rc, const int64_t *ints, const double *flts);
/* OK when a and b describe the same run (model config, numbers, strategy, preset, corpus
 * folder, data files); INVALID_CONFIG naming the first field that differs otherwise. */
dsmoe_status dsmoe__run_config_compare(const dsmoe_run_config *a, const dsmoe_run_config *b);

/* A run config with its strings (strategy and preset are arrays) in one block the
 * caller frees with free(): fortunes_dir and data_files point into it. */
typedef struct dsmoe__run_config_store {
    dsmoe_run_config rc;
    char *block;
} dsmoe__run_config_store;
/* Copies rc's strings into s->block. OUT_OF_MEMORY. */
dsmoe_status dsmoe__run_config_own(dsmoe__run_config_store *s, const dsmoe_run_config *rc);

/* ------------------------------------------------------------ checkpoint -- */
/* What a checkpoint holds besides the files' own checks. */
typedef struct dsmoe__ckpt_state {
    const dsmoe_run_config *rc;
    dsmoe_train_model *tm;
    float *m, *v;                /* AdamW moments, the parameter array's layout */
    dsmoe_balancer **bal;        /* one per MoE layer, or NULL (no bias controller) */
    int64_t step, tokens;        /* steps done, tokens trained */
    dsmoe_rng rng;               /* the data order's stream after step */
    uint64_t corpus_hash;        /* of the corpus's tokens and domains, both splits */
    const int64_t *data_bytes;   /* (rc->n_data_files): each data file's size and hash */
    const int64_t *data_hash;
    double last_train_loss, last_val_loss, last_val_maxvio;
    double elapsed_s;            /* wall seconds of the run's sessions up to step */
    int64_t last_eval_step;      /* 0: none yet */
    /* Optional: called by dsmoe__ckpt_save between the model file and the training
     * state (an expert-sharded run's rank 0 gives the other ranks' parameters back and
     * receives their moments there); its error fails the save. */
    dsmoe_status (*before_state)(void *ctx);
    void *hook_ctx;
} dsmoe__ckpt_state;

#define DSMOE__CKPT_MODEL "model.safetensors"
#define DSMOE__CKPT_STATE "training_state.safetensors"

/* Writes the checkpoint folder dir atomically (dsmoe__dir_begin / _commit): config.json,
 * model.safetensors, training_state.safetensors. IO naming the path; dir as it was on
 * error. */
dsmoe_status dsmoe__ckpt_save(const char *dir, const dsmoe__ckpt_state *s);
/* Reads checkpoint dir into s (s->rc the run's config, s->tm, m, v, bal already made
 * for it): verifies every file (hashes, names, shapes, finite values, the config) and
 * changes s only when all is well. FORMAT naming the file otherwise. */
dsmoe_status dsmoe__ckpt_load(const char *dir, dsmoe__ckpt_state *s);
/* Reads the run config saved in checkpoint dir (its strings in out->block). */
dsmoe_status dsmoe__ckpt_read_config(const char *dir, dsmoe__run_config_store *out);

/* A 64-bit hash of n bytes (not cryptographic: it detects damage, not attacks),
 * continuing from h (start with DSMOE__HASH_INIT). */
#define DSMOE__HASH_INIT 0x6a09e667f3bcc909ull
uint64_t dsmoe__hash_bytes(uint64_t h, const void *p, size_t n);
/* The hash and size of a whole file. IO naming the path. */
dsmoe_status dsmoe__hash_file(const char *path, uint64_t *hash, int64_t *bytes);

#endif /* DSMOE_RUN_INTERNAL_H */
