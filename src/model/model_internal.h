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

/* Skips one well-formed JSON value of any kind (numbers by the full RFC 8259 grammar,
 * which io/json.h's reader does not read). `key` names it in messages. */
dsmoe_status dsmoe__model_json_skip(dsmoe__json *j, const char *key);

#endif /* DSMOE_MODEL_INTERNAL_H */
