"""Build information: was this build compiled with OpenMP, and how many threads it sees."""
from _omp cimport omp_enabled, omp_max_threads


def openmp_enabled():
    """True when the kernels were compiled with -fopenmp (prange really runs in parallel)."""
    return bool(omp_enabled())


def openmp_max_threads():
    """omp_get_max_threads() as the OpenMP runtime sees it (1 without OpenMP)."""
    return omp_max_threads()


from _common cimport LANES, rt_expf, rt_expf_fast, rt_expf_fast_le88, rt_softplusf


def vector_lanes():
    """Floats per vector register of the build target (the kernels' channel-block width)."""
    return LANES


ctypedef float (*_unary_f32)(float) noexcept nogil


cdef _apply(str name, _unary_f32 fn, float[::1] out, const float[::1] x):
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: out has {out.shape[0]} elements, x has {x.shape[0]}")
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = fn(x[i])


def vexp(float[::1] out, const float[::1] x):
    """out = exp(x) with the kernels' vectorised float32 exp (for its accuracy tests)."""
    _apply("vexp", rt_expf, out, x)


def vsoftplus(float[::1] out, const float[::1] x):
    """out = softplus(x) with the kernels' vectorised float32 softplus (for its accuracy tests)."""
    _apply("vsoftplus", rt_softplusf, out, x)


def vexp_fast(float[::1] out, const float[::1] x):
    """out = exp(x) with the scan's shorter float32 exp (for its accuracy tests)."""
    _apply("vexp_fast", rt_expf_fast, out, x)


def vexp_fast_le88(float[::1] out, const float[::1] x):
    """out = exp(x) with the scan's exp for x <= 88 (for its tests: bitwise vexp_fast there)."""
    _apply("vexp_fast_le88", rt_expf_fast_le88, out, x)
