"""Pre-norm RMSNorm with a learnable weight (the `mamba` block, docs/architecture.md), forward and backward.

Notation: n rows (B*T tokens), D channels (d_model), w (D) the learnable weight.

    forward   ms_i   = (1/D) sum_j x[i,j]^2                       (in double)
              rstd_i = 1 / sqrt(ms_i + eps)
              out[i,j] = x[i,j] * rstd_i * w[j]
    backward  s_i        = sum_j dout[i,j] * w[j] * x[i,j]         (in double)
              dx[i,j]   += rstd_i * w[j] * dout[i,j] - x[i,j] * rstd_i^3 * s_i / D
              dw[j]     += sum_i dout[i,j] * x[i,j] * rstd_i

Saved state: forward writes rstd (n); backward reads x (the layer input, which the stack keeps
anyway as the residual stream) and rstd, and recomputes nothing else.

Parallel decomposition (no atomics, bitwise identical for any n_threads):
    forward, dx   prange over rows; each row's sums run serially in double.
    dw            prange over column blocks of CB columns; a block sums over rows i = 0..n-1 in
                  order, in double, into a function-local array.
Backward ACCUMULATES (+=) into dx and dw.
All arrays are float32 and C-contiguous; shapes are checked once in the `def` wrappers.
"""
from libc.math cimport sqrt
from cython.parallel cimport prange
from _common cimport check_threads, shape_of

cdef enum:
    CB = 64      # dw columns per work item



# ----------------------------------------------------------------------------------------- forward

cdef inline void _rms_row(float* out, float* rstd, const float* x, const float* w, Py_ssize_t D,
                          double eps) noexcept nogil:
    """One row: out (D) OUT, rstd (1) OUT, x (D) IN, w (D) IN."""
    cdef Py_ssize_t j
    cdef double ms = 0.0, r
    # ms = mean_j x^2
    for j in range(D):
        ms += <double>x[j] * x[j]
    ms /= D
    r = 1.0 / sqrt(ms + eps)
    rstd[0] = <float>r
    # out = x * rstd * w
    for j in range(D):
        out[j] = <float>(x[j] * r * w[j])


def rmsnorm_forward(float[:, ::1] out,          # OUT (n,D)
                    float[::1] rstd,            # OUT (n)
                    const float[:, ::1] x,      # IN  (n,D)
                    const float[::1] w,         # IN  (D)
                    double eps, int n_threads):
    """out (n,D) = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps) per row (n)."""
    check_threads(n_threads)
    cdef Py_ssize_t n = x.shape[0], D = x.shape[1], i
    if shape_of(out) != shape_of(x):
        raise ValueError(f"rmsnorm_forward: out has shape {shape_of(out)}, expected x's shape {shape_of(x)}")
    if rstd.shape[0] != n:
        raise ValueError(f"rmsnorm_forward: rstd has shape ({rstd.shape[0]},), expected ({n},) from x {shape_of(x)}")
    if w.shape[0] != D:
        raise ValueError(f"rmsnorm_forward: w has shape ({w.shape[0]},), expected ({D},) from x {shape_of(x)}")
    if not eps > 0.0:
        raise ValueError(f"rmsnorm_forward: eps must be > 0, got {eps}")
    if n == 0 or D == 0:
        return
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _rms_row(&out[i, 0], &rstd[i], &x[i, 0], &w[0], D, eps)


# ---------------------------------------------------------------------------------------- backward

cdef inline void _rms_row_backward(float* dx, const float* dout, const float* x, const float* w,
                                   double r, Py_ssize_t D) noexcept nogil:
    """One row: dx (D) OUT +=, dout, x, w (D) IN, r = rstd of the row."""
    cdef Py_ssize_t j
    cdef double s = 0.0, c
    # s = sum_j dout*w*x
    for j in range(D):
        s += <double>dout[j] * w[j] * x[j]
    c = r * r * r * s / D
    # dx += rstd*w*dout - x*rstd^3*s/D
    for j in range(D):
        dx[j] += <float>(r * w[j] * dout[j] - x[j] * c)


cdef inline void _rms_dw_block(float* dw, const float* dout, const float* x, const float* rstd,
                               Py_ssize_t n, Py_ssize_t D, Py_ssize_t c0,
                               Py_ssize_t c1) noexcept nogil:
    """dw[c0:c1] += sum_i dout[i,c]*x[i,c]*rstd_i, rows in order, in double."""
    cdef double acc[CB]
    cdef Py_ssize_t i, j, nb = c1 - c0
    cdef double r
    for j in range(nb):
        acc[j] = 0.0
    for i in range(n):
        r = rstd[i]
        for j in range(nb):
            acc[j] += <double>dout[i * D + c0 + j] * x[i * D + c0 + j] * r
    for j in range(nb):
        dw[c0 + j] += <float>acc[j]


def rmsnorm_backward(float[:, ::1] dx,             # OUT += (n,D)
                     float[::1] dw,                # OUT += (D)
                     const float[:, ::1] dout,     # IN  (n,D)
                     const float[:, ::1] x,        # IN  (n,D) the forward input
                     const float[::1] rstd,        # IN  (n)   saved by forward
                     const float[::1] w,           # IN  (D)
                     int n_threads):
    """Backward of rmsnorm_forward; ACCUMULATES into dx (n,D) and dw (D)."""
    check_threads(n_threads)
    cdef Py_ssize_t n = x.shape[0], D = x.shape[1], i, nblk
    shape = shape_of(x)
    for name, arr in (("dx", dx), ("dout", dout)):
        if shape_of(arr) != shape:
            raise ValueError(f"rmsnorm_backward: {name} has shape {shape_of(arr)}, expected x's shape {shape}")
    if rstd.shape[0] != n:
        raise ValueError(f"rmsnorm_backward: rstd has shape ({rstd.shape[0]},), expected ({n},) from x {shape}")
    for name, arr in (("w", w), ("dw", dw)):
        if arr.shape[0] != D:
            raise ValueError(f"rmsnorm_backward: {name} has shape ({arr.shape[0]},), expected ({D},) from x {shape}")
    if n == 0 or D == 0:
        return
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _rms_row_backward(&dx[i, 0], &dout[i, 0], &x[i, 0], &w[0], rstd[i], D)
    nblk = (D + CB - 1) // CB
    for i in prange(nblk, schedule='static', num_threads=n_threads, nogil=True):
        _rms_dw_block(&dw[0], &dout[0, 0], &x[0, 0], &rstd[0], n, D, i * CB,
                      i * CB + CB if i * CB + CB < D else D)
