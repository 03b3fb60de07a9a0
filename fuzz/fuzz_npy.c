/*
 * fuzz_npy.c — libFuzzer target for dsmoe_npy_parse: any input must either parse
 * into a consistent array (every byte of which is read here) or fail with FORMAT,
 * a message and a zeroed output. Sanitizers catch the rest.
 */
#include "dsmoe.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Where the bytes read go, so the reads are not optimized away. */
volatile unsigned fuzz_sink;

static int all_zero(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dsmoe_array a;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_npy_parse(data, size, &a);
    if (s != DSMOE_OK) {
        if (s != DSMOE_STATUS_FORMAT || !dsmoe_last_error()[0] || !all_zero(&a, sizeof a)) abort();
        return 0;
    }
    size_t es = dsmoe_dtype_size(a.dtype);
    if (!es || a.ndim < 0 || a.ndim > DSMOE_MAX_DIMS || !a.data || a.nbytes > size ||
        (size_t)dsmoe_array_numel(&a) * es != a.nbytes)
        abort();
    /* The data is the tail of the input, copied. */
    if (a.nbytes && memcmp(a.data, data + size - a.nbytes, a.nbytes) != 0) abort();
    unsigned sum = 0;
    const unsigned char *p = (const unsigned char *)a.data;
    for (size_t i = 0; i < a.nbytes; i++) sum += p[i];
    fuzz_sink = sum;
    dsmoe_array_free(&a);
    return 0;
}
