# Helpers shared by the kernel modules. Header-only (inline functions), so a module that
# cimports it needs no runtime provider (STYLE §1, "Packaging the kernels").
from libc.math cimport expf

# column blocks of float32 written by one thread are whole 64-byte cache lines
cdef enum:
    COL_ALIGN = 16


cdef inline float sigmoidf(float x) noexcept nogil:
    # 1/(1+exp(-x)) with the exact libm expf (SPEC §2.1: no polynomial approximation)
    return <float>1 / (<float>1 + expf(-x))


cdef inline Py_ssize_t col_block_width(Py_ssize_t D, int n_threads) noexcept nogil:
    """Width of the column blocks that split D columns over n_threads, rounded up to COL_ALIGN."""
    cdef Py_ssize_t width = (D + n_threads - 1) // n_threads
    return ((width + COL_ALIGN - 1) // COL_ALIGN) * COL_ALIGN


cdef inline check_threads(int n_threads):
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")


cdef inline check_shape3(str fn, str name, const float[:, :, ::1] a, Py_ssize_t B, Py_ssize_t T, Py_ssize_t D):
    if a.shape[0] != B or a.shape[1] != T or a.shape[2] != D:
        raise ValueError(f"{fn}: {name} has shape {(a.shape[0], a.shape[1], a.shape[2])}, "
                         f"expected (B, T, D) = {(B, T, D)}")


cdef inline check_shape1(str fn, str name, const float[::1] a, Py_ssize_t D):
    if a.shape[0] != D:
        raise ValueError(f"{fn}: {name} has shape {(a.shape[0],)}, expected (D,) = {(D,)}")
