"""Final LayerNorm without affine parameters (z = LayerNorm(r) after the last layer, eps 1e-5).

    forward   mean_i = (1/D) Σ_j x[i,j]
              var_i  = (1/D) Σ_j (x[i,j] - mean_i)²          (biased, two-pass, in double; row sums in 8
                                                              fixed partial sums, _common.pxd)
              rstd_i = 1 / sqrt(var_i + eps)
              z[i,j] = (x[i,j] - mean_i) · rstd_i
    backward  dx[i,:] += rstd_i · (dz[i,:] - mean_j(dz[i,:]) - z[i,:] · mean_j(dz[i,:] · z[i,:]))

Shapes: x, z, dz, dx (n,D) with n = B*T rows; rstd (n).
Saved state: forward stores z and rstd; backward needs nothing else (x is not kept).
Parallel decomposition: prange over rows; each row of z/rstd/dx is owned by one iteration and its
row sums run serially in double, so results are bitwise identical for any n_threads.
Backward accumulates (+=) into dx.
"""
from libc.math cimport sqrt
from cython.parallel cimport prange
from _common cimport check_threads, dot_f64, shape_of, sqdev_f64, sum_f64



# ----------------------------------------------------------------------------------------- forward

cdef inline void _ln_row(float* z, float* rstd, const float* x, Py_ssize_t D,
                         double eps) noexcept nogil:
    """One row: z (D) OUT, rstd (1) OUT, x (D) IN."""
    cdef Py_ssize_t j
    cdef double mean, var, r
    mean = sum_f64(x, D) / D
    var = sqdev_f64(x, mean, D) / D
    r = 1.0 / sqrt(var + eps)
    rstd[0] = <float>r
    for j in range(D):
        z[j] = <float>((x[j] - mean) * r)


cdef void _layernorm_forward(float[:, ::1] z,          # OUT (n,D)
                             float[::1] rstd,          # OUT (n)
                             const float[:, ::1] x,    # IN  (n,D)
                             double eps, int n_threads) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], D = x.shape[1], i
    if n == 0 or D == 0:
        return
    # z = (x - mean) * rstd ; rstd = 1/sqrt(var + eps)   one row per iteration
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _ln_row(&z[i, 0], &rstd[i], &x[i, 0], D, eps)


def layernorm_forward(float[:, ::1] z, float[::1] rstd, const float[:, ::1] x, double eps,
                      int n_threads):
    """z (n,D) OUT, rstd (n) OUT = LayerNorm of x (n,D) IN without affine."""
    check_threads(n_threads)
    if z.shape[0] != x.shape[0] or z.shape[1] != x.shape[1]:
        raise ValueError(f"layernorm_forward: z has shape {shape_of(z)}, "
                         f"expected x's shape {shape_of(x)}")
    if rstd.shape[0] != x.shape[0]:
        raise ValueError(f"layernorm_forward: rstd has shape ({rstd.shape[0]},), "
                         f"expected ({x.shape[0]},) from x {shape_of(x)}")
    if not eps > 0.0:
        raise ValueError(f"layernorm_forward: eps must be > 0, got {eps}")
    with nogil:
        _layernorm_forward(z, rstd, x, eps, n_threads)


# ---------------------------------------------------------------------------------------- backward

cdef inline void _ln_row_backward(float* dx, const float* dz, const float* z, double rstd,
                                  Py_ssize_t D) noexcept nogil:
    """One row: dx (D) OUT +=, dz (D) IN, z (D) IN."""
    cdef Py_ssize_t j
    cdef double a = sum_f64(dz, D) / D
    cdef double b = dot_f64(dz, z, D) / D
    for j in range(D):
        dx[j] += <float>(rstd * (dz[j] - a - z[j] * b))


cdef void _layernorm_backward(float[:, ::1] dx,           # OUT (n,D), +=
                              const float[:, ::1] dz,     # IN  (n,D)
                              const float[:, ::1] z,      # IN  (n,D) saved by forward
                              const float[::1] rstd,      # IN  (n)   saved by forward
                              int n_threads) noexcept nogil:
    cdef Py_ssize_t n = dz.shape[0], D = dz.shape[1], i
    if n == 0 or D == 0:
        return
    # dx += rstd * (dz - mean(dz) - z * mean(dz * z))   one row per iteration
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _ln_row_backward(&dx[i, 0], &dz[i, 0], &z[i, 0], rstd[i], D)


def layernorm_backward(float[:, ::1] dx, const float[:, ::1] dz, const float[:, ::1] z,
                       const float[::1] rstd, int n_threads):
    """dx (n,D) OUT += LayerNorm input gradient from dz (n,D), z (n,D), rstd (n), all IN."""
    check_threads(n_threads)
    shape = shape_of(z)
    for name, arr in (("dx", dx), ("dz", dz)):
        if shape_of(arr) != shape:
            raise ValueError(f"layernorm_backward: {name} has shape {shape_of(arr)}, "
                             f"expected z's shape {shape}")
    if rstd.shape[0] != z.shape[0]:
        raise ValueError(f"layernorm_backward: rstd has shape ({rstd.shape[0]},), "
                         f"expected ({z.shape[0]},) from z {shape}")
    with nogil:
        _layernorm_backward(dx, dz, z, rstd, n_threads)
