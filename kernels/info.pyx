"""Build information: was this build compiled with OpenMP, and how many threads it sees."""
from _omp cimport omp_enabled, omp_max_threads


def openmp_enabled():
    """True when the kernels were compiled with -fopenmp (prange really runs in parallel)."""
    return bool(omp_enabled())


def openmp_max_threads():
    """omp_get_max_threads() as the OpenMP runtime sees it (1 without OpenMP)."""
    return omp_max_threads()
