/*
 * fuzz_config.c — libFuzzer target for dsmoe_model_config_from_json (config.json):
 * any input either reads into a configuration that validates and that the writer
 * (dsmoe_model_config_to_json) turns into text reading back to the same configuration,
 * or fails with FORMAT / INVALID_CONFIG, a message, and the output untouched.
 * Sanitizers catch the rest.
 */
#include "dsmoe.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dsmoe_model_config c, sentinel;
    memset(&c, 0xA5, sizeof c);
    memcpy(&sentinel, &c, sizeof c);
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_model_config_from_json((const char *)data, size, &c);
    if (s != DSMOE_OK) {
        if ((s != DSMOE_STATUS_FORMAT && s != DSMOE_STATUS_INVALID_CONFIG) || !dsmoe_last_error()[0] ||
            memcmp(&c, &sentinel, sizeof c) != 0)
            abort();
        return 0;
    }
    if (dsmoe_model_config_validate(&c) != DSMOE_OK) abort();
    static char text[1 << 16];
    int64_t n = dsmoe_model_config_to_json(&c, text, sizeof text);
    if (n <= 0 || (size_t)n >= sizeof text) abort();
    dsmoe_model_config back;
    if (dsmoe_model_config_from_json(text, (size_t)n, &back) != DSMOE_OK) abort();
    static char again[1 << 16];
    if (dsmoe_model_config_to_json(&back, again, sizeof again) != n || memcmp(text, again, (size_t)n) != 0)
        abort();
    return 0;
}
