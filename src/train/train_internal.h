/*
 * train_internal.h — declarations shared by the train layer's files; not installed.
 */
#ifndef DSMOE_TRAIN_INTERNAL_H
#define DSMOE_TRAIN_INTERNAL_H

#include "core/internal.h"
#include "dsmoe/train.h"

#include <stdint.h>

/* Offset of the first byte of s[0..n) that does not begin a valid UTF-8 sequence
 * (overlong forms, surrogates and code points above U+10FFFF are invalid), or -1. */
int64_t dsmoe__utf8_invalid_at(const uint8_t *s, int64_t n);

/* The main model's cross-entropy at each of the B·T positions of the last successful
 * dsmoe_train_model_loss (0 where the target is the pad id) into ce (B·T), for
 * evaluations by domain. INVALID_ARGUMENT when no loss precedes it. */
dsmoe_status dsmoe__train_model_position_ce(dsmoe_train_model *tm, double *ce);

/* One tensor of dsmoe__adamw_update_all: n parameters p, moments m, v and gradients g;
 * decay != 0 if the tensor takes weight decay. */
typedef struct dsmoe__adamw_segment {
    float *p, *m, *v;
    const float *g;
    int64_t n;
    int decay;
} dsmoe__adamw_segment;

/* dsmoe_adamw_update on each of the n_seg tensors (weight decay cfg->weight_decay where
 * decay is set, else 0), in one parallel region: the same bits as one call per tensor,
 * for any n_threads. */
void dsmoe__adamw_update_all(const dsmoe_adamw_config *cfg, const dsmoe__adamw_segment *seg,
                             int64_t n_seg, int64_t t, double lr, float grad_scale, int n_threads);

/* out[j] = dsmoe_sum_squares(seg[j].g, seg[j].n) for each segment, the segments shared by
 * the threads (each sum on one thread: the same bits as any thread count gives). For a
 * model of many small tensors, whose sums one at a time ran on one thread. */
void dsmoe__sum_squares_each(const dsmoe__adamw_segment *seg, int64_t n_seg, double *out,
                             int n_threads);

/* Data-parallel runs (run.c): every rank passes its status and gets the lowest failing
 * rank's, with that rank's message ("rank r: ..."); collective. One process (c NULL or
 * one rank): st as it is. */
dsmoe_status dsmoe__run_agree(const dsmoe_run_collective *c, dsmoe_status st);

#endif /* DSMOE_TRAIN_INTERNAL_H */
