"""Softmax cross-entropy (head.kind = "softmax", rtrainer/heads.py SoftmaxHead). The logits
x = z @ W^T (+ b) are a BLAS product in heads.py; this fused row-wise kernel turns them into the loss
and, in place, into d(scale·loss)/dx, so the backward is two more BLAS products:
    lse_i  = max_j x_ij + log Σ_j exp(x_ij - max_j x_ij)           (stable log-softmax, sum in double)
    loss   = (1/m) Σ_{i: y_i ≥ 0} (lse_i - x_i[y_i])                 m = number of scored tokens
    dx_ij  = (scale/m) (softmax(x_i)_j - [j = y_i])   for scored rows; 0 for ignored rows (y_i = -1)
Parallel over rows (each owns its row and its loss term); terms summed serially in row order:
bitwise identical for any n_threads.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport log
from cython.parallel cimport prange

from _common cimport check_threads, rt_expf, shape_of
from _targets cimport IGNORE, check_targets as _check_targets, n_scored as _n_scored


cdef inline double _xent_row(float* row, Py_ssize_t V, int64_t t, double c) noexcept nogil:
    """One scored row (V) IN: logits, OUT: c·(softmax - onehot(t)). Returns lse - x[t]."""
    cdef Py_ssize_t j
    cdef float mx = row[0], xt = row[t], inv
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, s
    # mx = max_j x_j
    for j in range(1, V):
        mx = row[j] if row[j] > mx else mx
    # row_j = exp(x_j - mx)   (a loop of its own: gcc vectorises the branch-free exp)
    for j in range(V):
        row[j] = rt_expf(row[j] - mx)
    # s = Σ_j row_j in double, four interleaved partial sums in a fixed order
    j = 0
    while j + 4 <= V:
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        j += 4
    while j < V:
        s0 += row[j]
        j += 1
    s = (s0 + s1) + (s2 + s3)
    # dx_j = c·row_j/s - c·[j = t]
    inv = <float>(c / s)
    for j in range(V):
        row[j] = row[j] * inv
    row[t] = <float>(row[t] - c)
    return mx + log(s) - xt


cdef void _xent_rows(float[:, ::1] x, const int64_t[::1] targets, double scale, Py_ssize_t m,
                     double* term, int n_threads) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], V = x.shape[1], i, j
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        if targets[i] == IGNORE:
            for j in range(V):
                x[i, j] = 0.0
            term[i] = 0.0
        else:
            term[i] = _xent_row(&x[i, 0], V, targets[i], scale / m)


def softmax_xent(float[:, ::1] logits, const int64_t[::1] targets, double scale, int n_threads):
    """logits (n,V) IN, OVERWRITTEN with d(scale·loss)/dlogits; targets (n) int64 in [0,V) or -1
    (ignored) IN. Returns loss = mean over the scored rows of logsumexp(logits_i) - logits_i[y_i]
    (0 with no scored row)."""
    check_threads(n_threads)
    cdef Py_ssize_t n = logits.shape[0], V = logits.shape[1]
    if n == 0 or V == 0:
        raise ValueError(f"softmax_xent: logits has shape {shape_of(logits)}; need at least one row and column")
    if targets.shape[0] != n:
        raise ValueError(f"softmax_xent: targets has shape ({targets.shape[0]},), expected ({n},) "
                         f"from logits {shape_of(logits)}")
    _check_targets(targets, V)
    cdef Py_ssize_t m = _n_scored(targets), i
    cdef double loss = 0.0
    cdef double* term = <double*>malloc(n * sizeof(double))
    if term == NULL:
        raise MemoryError()
    try:
        with nogil:
            _xent_rows(logits, targets, scale, m, term, n_threads)
            for i in range(n):
                loss += term[i]
    finally:
        free(term)
    return loss / m if m > 0 else 0.0
