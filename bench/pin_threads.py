"""pin_threads.py — import first, before numpy or torch: pins every thread pool of the
PyTorch / NumPy references to the --threads N of the command line (default 1), the count
dsmoe runs with in the same comparison, whatever the caller's environment says. Debian's
torch calls the system OpenBLAS, whose own threads torch.set_num_threads does not
control, and OpenMP reads its count at start-up, so the variables are set before the
import; torch's own pool is set by the script with torch.set_num_threads(THREADS).
"""
import os
import sys


def early_threads(argv, default=1):
    """--threads N from the command line, read before numpy / torch are imported."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = early_threads(sys.argv[1:])
VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _var in VARIABLES:
    os.environ[_var] = str(THREADS)
