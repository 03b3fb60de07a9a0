/*
 * cmd_report.c — `dsmoe report DIR`: a run folder or a study folder as one
 * self-contained HTML page with its charts as .svg files beside it, and the summary
 * files (library: dsmoe/study.h, dsmoe_report_write).
 */
#include "cli.h"

#include "dsmoe/study.h"

#include <stdio.h>
#include <string.h>

static const char *const report_usage =
    "usage: dsmoe report DIR [--html FILE] [--svg-dir D] [--layer L]\n"
    "\n"
    "Writes the report of DIR, a run folder (holding metrics.jsonl) or a study folder (holding\n"
    "runs/<name>/metrics.jsonl): one self-contained HTML page (inline SVG, no script, no\n"
    "network) with the loss curves, the batch MaxVio of every run, the per-expert load over\n"
    "time and the domain x expert matrix of one layer, the distribution of the largest routing\n"
    "weight and the summary table; each chart also as an .svg file; and DIR/summary.json,\n"
    "DIR/summary.csv. Prints the HTML file's path.\n"
    "\n"
    "  --html FILE     the page (default DIR/report.html)\n"
    "  --svg-dir D     where the .svg files go (default: the page's folder)\n"
    "  --layer L       model layer of the load heat map and the domain x expert matrix\n"
    "                  (default: the first MoE layer)\n"
    "  --help          this text\n"
    "\n"
    "Definitions of every measure: docs/study.md.\n";

int cmd_report(int argc, char **argv) {
    const char *dir = NULL;
    dsmoe_report_options o;
    dsmoe_report_options_default(&o);
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(report_usage, stdout);
            return CLI_OK;
        } else if (cli_opt(argc, argv, &i, "--html", &v, &missing)) {
            if (missing) return cli_fail(CLI_USAGE, "report", "--html needs a file name");
            o.html_path = v;
        } else if (cli_opt(argc, argv, &i, "--svg-dir", &v, &missing)) {
            if (missing) return cli_fail(CLI_USAGE, "report", "--svg-dir needs a folder");
            o.svg_dir = v;
        } else if (cli_opt(argc, argv, &i, "--layer", &v, &missing)) {
            long long L;
            if (missing || !cli_parse_int(v, 0, 1 << 20, &L))
                return cli_fail(CLI_USAGE, "report", "--layer needs a layer number >= 0");
            o.layer = (int32_t)L;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            return cli_fail(CLI_USAGE, "report", "unknown option '%s' (see dsmoe report --help)", argv[i]);
        } else if (dir) {
            return cli_fail(CLI_USAGE, "report", "one folder only ('%s' and '%s')", dir, argv[i]);
        } else {
            dir = argv[i];
        }
    }
    if (!dir) return cli_fail(CLI_USAGE, "report", "which folder? (dsmoe report DIR; see --help)");
    char path[4096];
    dsmoe_status st = dsmoe_report_write(dir, &o, path, sizeof path);
    if (st == DSMOE_STATUS_INVALID_ARGUMENT) return cli_fail(CLI_USAGE, "report", "%s", dsmoe_last_error());
    if (st) return cli_fail(CLI_RUNTIME, "report", "%s", dsmoe_last_error());
    printf("%s\n", path);
    return CLI_OK;
}
