/*
 * fuzz_safetensors.c — libFuzzer target for dsmoe_safetensors_open_memory: any
 * input must either open into a consistent file object — every tensor inside the
 * input, sized by its shape, found again by name, every byte read, floating-point
 * tensors converted to fp32, every metadata entry found by key — or fail with
 * FORMAT, a message and a NULL object.
 */
#include "dsmoe.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Where the bytes read go, so the reads are not optimized away. */
volatile unsigned fuzz_sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dsmoe_safetensors *st = (dsmoe_safetensors *)(uintptr_t)1;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_safetensors_open_memory(data, size, &st);
    if (s != DSMOE_OK) {
        if (s != DSMOE_STATUS_FORMAT || !dsmoe_last_error()[0] || st != NULL) abort();
        return 0;
    }
    unsigned sum = 0;
    for (int64_t i = 0; i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view v, w;
        if (dsmoe_safetensors_at(st, i, &v) != DSMOE_OK) abort();
        const uint8_t *p = (const uint8_t *)v.data;
        if (p < data || p > data + size || v.nbytes > (size_t)(data + size - p)) abort();
        int64_t numel = 1;
        for (int32_t d = 0; d < v.ndim; d++) numel *= v.shape[d];
        if ((size_t)numel * dsmoe_dtype_size(v.dtype) != v.nbytes) abort();
        for (size_t k = 0; k < v.nbytes; k++) sum += p[k];
        if (dsmoe_safetensors_get(st, v.name, &w) != DSMOE_OK || w.data != v.data) abort();
        if (v.dtype == DSMOE_DTYPE_F32 || v.dtype == DSMOE_DTYPE_BF16 || v.dtype == DSMOE_DTYPE_F16) {
            float *f = (float *)malloc((size_t)numel * sizeof(float) + 1);
            if (!f || dsmoe_tensor_to_f32(&v, f) != DSMOE_OK) abort();
            for (int64_t k = 0; k < numel; k++) sum += (unsigned)(f[k] == f[k]);
            free(f);
        }
    }
    for (int64_t i = 0; i < dsmoe_safetensors_metadata_count(st); i++) {
        const char *k, *v;
        if (dsmoe_safetensors_metadata_at(st, i, &k, &v) != DSMOE_OK) abort();
        if (strcmp(dsmoe_safetensors_metadata(st, k), v) != 0) abort();
    }
    fuzz_sink = sum;
    dsmoe_safetensors_close(st);
    return 0;
}
