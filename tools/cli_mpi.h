/* cli_mpi.h — the CLI under mpirun: MPI is initialised only when the process was
 * launched by an MPI launcher (Open MPI's OMPI_COMM_WORLD_SIZE, or PMI_SIZE /
 * PMIX_RANK), so that `dsmoe ...` alone runs exactly as before. Without MPI in the
 * build, a launch by mpirun with more than one process is refused (each process would
 * write the same files). */
#ifndef DSMOE_CLI_MPI_H
#define DSMOE_CLI_MPI_H

#include "dsmoe.h"

#include <stddef.h>
#include <stdint.h>

/* Returns 0, or CLI_USAGE after printing why (a multi-process launch of a build
 * without MPI). */
int cli_mpi_init(int *argc, char ***argv);
void cli_mpi_finalize(void);
/* 1 when MPI was initialised (under mpirun, even with one process). */
int cli_mpi_active(void);
int cli_mpi_rank(void);
int cli_mpi_size(void);
/* Collective (when active): every rank passes its exit code so far; returns CLI_OK if
 * all are, else the lowest failing rank's code on every rank. The ranks that did not
 * fail print "dsmoe CMD: rank r failed: <its last library error>". Inactive: rc. */
int cli_mpi_agree(int rc, const char *cmd);
/* The collective operations of a data-parallel run (dsmoe_run_options.collective) over
 * MPI_COMM_WORLD, or NULL when MPI is not active. expert_parallel: the MoE layers also
 * shard their routed experts over the ranks (dsmoe_ep). */
const dsmoe_run_collective *cli_mpi_run_collective(int expert_parallel);
/* Collective (when active): x (n) summed over the ranks in rank order, on every rank.
 * Returns 0, nonzero on a failed communication. Inactive: 0, x unchanged. */
int cli_mpi_sum_f64(double *x, int64_t n);
/* Collective (when active): rows (n rows of len floats) where row i was computed by rank
 * i % R; afterwards rank 0 holds every row (the others' are left as they were). Returns
 * 0, nonzero on a failed communication. Inactive: 0. */
int cli_mpi_gather_rows_f32(float *rows, int64_t n, int64_t len);

#endif
