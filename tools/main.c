/* main.c — `dsmoe <command> [options]`: dispatch to the subcommands. */
#include "cli.h"
#include "cli_mpi.h"

#include <string.h>

typedef struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} cli_command;

static const cli_command commands[] = {
    {"train", cmd_train, "train a small DeepSeek-V3-style model from scratch (or resume a run)"},
    {"route", cmd_route, "route tokens: logits or hidden states -> expert indices and weights"},
    {"simulate", cmd_simulate, "drive the router and a load balancer with synthetic or recorded traffic"},
    {"layer", cmd_layer, "run one MoE layer from a safetensors file on .npy hidden states"},
    {"info", cmd_info, "describe a model directory: config, parameter counts, cache size, files"},
    {"eval", cmd_eval, "logits of token ids, or loss and perplexity of a text file, from a model"},
    {"generate", cmd_generate, "generate text or token ids from a model directory"},
    {"study", cmd_study, "train routing strategies x seeds side by side: runs, summary, report"},
    {"report", cmd_report, "a run or study folder as one HTML page with SVG charts and a summary"},
    {"bench", cmd_bench, "benchmarks (bench route)"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: dsmoe <command> [options]\n\n"
               "DeepSeek-V3 Mixture-of-Experts routing, load balancing, MoE layers and whole models.\n\n"
               "commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n`dsmoe <command> --help` explains each option. `dsmoe --version` prints the version.\n"
               "Exit codes: 0 success, 1 runtime error, 2 bad usage.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return CLI_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return CLI_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("dsmoe %s (kernels: %s)\n", dsmoe_version(), dsmoe_isa());
        return CLI_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) {
            int rc = cli_mpi_init(&argc, &argv); /* under mpirun only (cli_mpi.h) */
            if (rc == 0) rc = commands[i].fn(argc - 1, argv + 1);
            cli_mpi_finalize();
            return rc;
        }
    fprintf(stderr, "dsmoe: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return CLI_USAGE;
}
