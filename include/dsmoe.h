/*
 * dsmoe.h — public API of libdsmoe, DeepSeek-V3-style Mixture-of-Experts routing,
 * load balancing and MoE layers in C11.
 *
 * Sections (one header each, all included here):
 *   dsmoe/core.h     versions, status codes and errors, dtypes, arrays, ISA choice
 *   dsmoe/io.h       NumPy .npy and safetensors reading and writing
 *   dsmoe/router.h   the router: scores, group-limited top-k, weights; backward
 *   dsmoe/balance.h  loss-free bias balancing, balance losses, load statistics
 *   dsmoe/moe.h      the MoE layer: dispatch, SwiGLU experts, combine; backward
 *   dsmoe/model.h    whole models: config.json, tensor table, model directories
 *   dsmoe/train.h    training: the byte vocabulary, the built-in corpus, text files, the
 *                    optimizer, the training model, runs (dsmoe_run)
 *   dsmoe/study.h    routing studies: run measures, summaries across seeds, the report
 *
 * Conventions: arrays are row-major (tokens × features); expert indices are
 * int32_t; compute is fp32. Every fallible call returns dsmoe_status and leaves a
 * detail in dsmoe_last_error(). Objects are made by *_create and freed by *_free
 * (NULL is a no-op). Hot paths allocate nothing.
 */
#ifndef DSMOE_H
#define DSMOE_H

#include "dsmoe/core.h"
#include "dsmoe/io.h"
#include "dsmoe/router.h"
#include "dsmoe/balance.h"
#include "dsmoe/moe.h"
#include "dsmoe/model.h"
#include "dsmoe/train.h"
#include "dsmoe/study.h"

#endif /* DSMOE_H */
