/* cmd_layer.c — `dsmoe layer` (being written). */
#include "cli.h"

int cmd_layer(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_fail(CLI_RUNTIME, "layer", "not available in this build yet");
}
