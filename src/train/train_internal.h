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

#endif /* DSMOE_TRAIN_INTERNAL_H */
