/* cmd_simulate.c — `dsmoe simulate` (being written). */
#include "cli.h"

int cmd_simulate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_fail(CLI_RUNTIME, "simulate", "not available in this build yet");
}
