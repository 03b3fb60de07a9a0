/* cli_mpi.c — MPI start-up and error agreement for the CLI (cli_mpi.h). */
#include "cli_mpi.h"

#include "cli.h"

#include <stdlib.h>
#include <string.h>

#ifdef DSMOE_HAVE_MPI
#include <mpi.h>
#endif

static int mpi_on, mpi_rank, mpi_size = 1;

#ifdef DSMOE_HAVE_MPI
static int launched_by_mpi(void) {
    const char *v[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (getenv(v[i])) return 1;
    return 0;
}
#endif

int cli_mpi_init(int *argc, char ***argv) {
#ifdef DSMOE_HAVE_MPI
    if (!launched_by_mpi()) return 0;
    if (MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "dsmoe: MPI_Init failed\n");
        return CLI_RUNTIME;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);
    mpi_on = 1;
    return 0;
#else
    (void)argc;
    (void)argv;
    const char *n = getenv("OMPI_COMM_WORLD_SIZE");
    if (!n) n = getenv("PMI_SIZE");
    if (n && atoi(n) > 1) {
        fprintf(stderr, "dsmoe: launched as %s processes, but this dsmoe was built without MPI "
                        "(install libopenmpi-dev and rebuild)\n", n);
        return CLI_USAGE;
    }
    return 0;
#endif
}

void cli_mpi_finalize(void) {
#ifdef DSMOE_HAVE_MPI
    if (mpi_on) MPI_Finalize();
#endif
    mpi_on = 0;
}

int cli_mpi_active(void) { return mpi_on; }
int cli_mpi_rank(void) { return mpi_rank; }
int cli_mpi_size(void) { return mpi_size; }

int cli_mpi_agree(int rc, const char *cmd) {
#ifdef DSMOE_HAVE_MPI
    if (!mpi_on) return rc;
    int mine = rc != CLI_OK ? mpi_rank : mpi_size, first = mpi_size;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == mpi_size) return CLI_OK;
    char msg[512];
    int code = rc;
    memset(msg, 0, sizeof msg);
    if (mpi_rank == first) snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
    MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD);
    MPI_Bcast(msg, (int)sizeof msg, MPI_CHAR, first, MPI_COMM_WORLD);
    msg[sizeof msg - 1] = '\0';
    if (rc == CLI_OK)
        fprintf(stderr, "dsmoe %s: rank %d failed%s%s\n", cmd, first, msg[0] ? ": " : "", msg);
    return code;
#else
    (void)cmd;
    return rc;
#endif
}
