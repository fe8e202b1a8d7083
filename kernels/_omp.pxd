# The only place that touches the OpenMP runtime (STYLE §3). Header-only: inline functions,
# so modules that cimport it need no runtime provider.
# Without OpenMP (RTRAINER_NO_OPENMP=1) every call degrades to the single-thread answer.

IF RTRAINER_OPENMP:
    cimport openmp

cdef inline int omp_thread_id() noexcept nogil:
    IF RTRAINER_OPENMP:
        return openmp.omp_get_thread_num()
    ELSE:
        return 0

cdef inline int omp_max_threads() noexcept nogil:
    IF RTRAINER_OPENMP:
        return openmp.omp_get_max_threads()
    ELSE:
        return 1

cdef inline bint omp_enabled() noexcept nogil:
    IF RTRAINER_OPENMP:
        return True
    ELSE:
        return False
