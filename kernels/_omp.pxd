# The only place that touches the OpenMP runtime, so a build without OpenMP needs no other
# change. Header-only: the C below is inlined into every module that cimports this file. The
# compiler defines _OPENMP under -fopenmp; without
# it (RTRAINER_NO_OPENMP=1) every call gives the single-thread answer and prange runs serially.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static inline int rtrainer_omp_thread_id(void) { return omp_get_thread_num(); }
    static inline int rtrainer_omp_max_threads(void) { return omp_get_max_threads(); }
    static inline int rtrainer_omp_enabled(void) { return 1; }
    #else
    static inline int rtrainer_omp_thread_id(void) { return 0; }
    static inline int rtrainer_omp_max_threads(void) { return 1; }
    static inline int rtrainer_omp_enabled(void) { return 0; }
    #endif
    """
    int omp_thread_id "rtrainer_omp_thread_id" () noexcept nogil
    int omp_max_threads "rtrainer_omp_max_threads" () noexcept nogil
    bint omp_enabled "rtrainer_omp_enabled" () noexcept nogil
