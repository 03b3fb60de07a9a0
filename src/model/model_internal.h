/*
 * model_internal.h — declarations shared by the model layer's files; not installed.
 */
#ifndef DSMOE_MODEL_INTERNAL_H
#define DSMOE_MODEL_INTERNAL_H

#include "core/internal.h"
#include "io/json.h"
#include "dsmoe/model.h"

#include <stddef.h>
#include <stdint.h>

/* Largest num_nextn_predict_layers accepted. */
#define DSMOE__MODEL_MAX_MTP 16

/* Dequantises an F8_E4M3 matrix w (rows, cols) bytes with block scales
 * scale_inv (ceil(rows / br), ceil(cols / bc)) into dst (rows, cols):
 * dst[i][j] = fp8(w[i][j]) · scale_inv[i / br][j / bc]. scale_inv may be unaligned
 * (read through memcpy). Returns the index of the first non-finite result, or -1. */
int64_t dsmoe__fp8_dequant(float *dst, const uint8_t *w, int64_t rows, int64_t cols,
                           const void *scale_inv, int32_t br, int32_t bc);

/* Skips one well-formed JSON value of any kind (numbers by the full RFC 8259 grammar,
 * which io/json.h's reader does not read). `key` names it in messages. */
dsmoe_status dsmoe__model_json_skip(dsmoe__json *j, const char *key);

#endif /* DSMOE_MODEL_INTERNAL_H */
