/*
 * cli.h — shared pieces of the dsmoe command-line tool: the command table,
 * argument helpers, router flags common to route / simulate / layer, and .npy
 * loading with shape checks. Exit codes: 0 success, 1 runtime error, 2 bad usage.
 */
#ifndef DSMOE_CLI_H
#define DSMOE_CLI_H

#include "dsmoe.h"

#include <stdint.h>
#include <stdio.h>

#define CLI_OK 0
#define CLI_RUNTIME 1
#define CLI_USAGE 2

/* Every subcommand: int cmd_NAME(int argc, char **argv) with argv[0] = NAME. */
int cmd_route(int argc, char **argv);
int cmd_simulate(int argc, char **argv);
int cmd_layer(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_study(int argc, char **argv);
int cmd_report(int argc, char **argv);

/* Prints "dsmoe <cmd>: <message>" to stderr and returns `code`. */
int cli_fail(int code, const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* Reports a failed library call: "dsmoe <cmd>: <what>: <last error>", returns 1. */
int cli_fail_status(const char *cmd, const char *what, dsmoe_status st);

/* Reports a failed library call on the file `path`: "dsmoe <cmd>: <path>: <last error>",
 * without repeating the path when the library's message already starts with it;
 * returns `code`. */
int cli_fail_file(int code, const char *cmd, const char *path);

/* Rewrites a library message in the user's terms: the config fields it names
 * (`top_k = 200`, `n_groups`, `seq_len`, `gamma_after`, ...) become the flags that set
 * them (`--top-k 200`, `--groups`, ...). Always NUL-terminates `out` (cap >= 1). */
void cli_flag_message(const char *msg, char *out, size_t cap);
/* cli_fail for a library validator's message, through cli_flag_message: use it where
 * the config came from flags (not from a file). */
int cli_fail_config(int code, const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* True if argv[*i] is `name`; then *value = argv[*i+1] and *i advances.
 * A missing value sets *missing = 1. */
int cli_opt(int argc, char **argv, int *i, const char *name, const char **value, int *missing);
int cli_parse_int(const char *s, long long lo, long long hi, long long *out);
int cli_parse_float(const char *s, double *out);

/* Router flags. cli_router_begin() sets defaults (preset deepseek-v3 unless a
 * --preset is seen first in argv); cli_router_flag() consumes one flag at argv[*i]
 * if it is a router flag: returns 1 if consumed, 0 if not a router flag, -1 on a
 * bad value (message printed). The help text lists them. */
typedef struct cli_router_flags {
    dsmoe_router_config cfg;
    int bias_set;   /* --bias given */
    const char *bias_path;
} cli_router_flags;
int cli_router_begin(const char *cmd, int argc, char **argv, cli_router_flags *f);
int cli_router_flag(const char *cmd, int argc, char **argv, int *i, cli_router_flags *f);
/* Validates the router config; on failure prints the validator's message in flag terms
 * (exit code 2 is the caller's) and returns -1. */
int cli_router_validate(const char *cmd, const cli_router_flags *f);
extern const char *const cli_router_help;

/* `dsmoe train`'s run-config flags (model, training, optimizer, bias controller, data,
 * routing and losses, schedule), shared by `dsmoe study`. cli_train_flag() consumes the
 * flag at argv[*i] into *rc (after the preset and the strategy): 1 consumed, 0 not such
 * a flag, -1 a bad or missing value (message printed as "dsmoe <cmd>: ..."). *warmup_given
 * (may be NULL) is set when --warmup is seen. --data files are kept in storage that
 * outlives the parse (the config points to it; replaying the flags onto a fresh config
 * rewrites the same entries), up to 4096. cli_train_finish() applies the rules that
 * follow from the flags together: a warm-up of at most steps / 10 unless --warmup was
 * given, the cosine over steps, the bias controller's experts, the MTP depths. */
int cli_train_flag(const char *cmd, int argc, char **argv, int *i, dsmoe_run_config *rc,
                   int *warmup_given);
void cli_train_finish(dsmoe_run_config *rc, int warmup_given);
/* A library message in those flags' terms (num_experts_per_tok -> --top-k, lr = 0 ->
 * --lr 0, ...); always NUL-terminates out when cap >= 1. */
void cli_train_flag_message(const char *msg, char *out, size_t cap);
/* The help text of those flags (sections data:, routing and losses:, model:, ...). */
void cli_train_flags_help(FILE *out);

/* Loads a .npy file and checks dtype and rank; dims with -1 are free. Prints an
 * error naming the file and returns 1 on failure. */
int cli_load_npy(const char *cmd, const char *path, dsmoe_dtype dtype, int ndim,
                 const int64_t *want_shape, dsmoe_array *out);
/* Writes a .npy, printing an error on failure (returns 1). */
int cli_save_npy(const char *cmd, const char *path, dsmoe_dtype dtype, int ndim,
                 const int64_t *shape, const void *data);

/* True if stderr is a terminal (progress lines are shown only then). */
int cli_stderr_is_tty(void);

#endif /* DSMOE_CLI_H */
