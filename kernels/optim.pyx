"""Flat-buffer optimizer helpers: global gradient norm and the AdamW update (parameters, gradients
and moments live in one flat buffer each).

Parameters, gradients and the moments m, v share one flat float32 layout of P elements. `segments`
(S,3) int64 rows (start, end, flag) select the ranges [start, end) that take part (trainable,
unfrozen tensors); flag is the decay flag for adamw_step and ignored by sumsq.

    sumsq       Σ_{segments} Σ_{i in [start,end)} g_i²                         (in double)
    adamw_step  (PyTorch AdamW, decoupled weight decay; scalars in double, storage float32)
                gs  = g·grad_scale                     (grad_scale: global-norm clipping factor)
                m   = β1·m + (1-β1)·gs ;  v = β2·v + (1-β2)·gs²
                bc1 = 1 - β1^step ;  bc2 = 1 - β2^step  (step = number of this update, >= 1)
                p   = p·(1 - lr·wd)                    (only if flag)
                p   = p - (lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps)
                Elements outside every segment are not touched.

Parallel decomposition: every segment is cut into fixed blocks of _BLOCK elements (the last block of a
segment may be shorter); prange over the global block list.
- sumsq: each block is summed in double in index order (8 interleaved partial sums combined in a fixed
  tree, so the compiler may vectorise), the block sums are then added serially in block order. Block
  boundaries do not depend on n_threads, so the result is bitwise identical for ANY n_threads.
  A NaN/inf gradient element makes the result non-finite: the trainer's non-finite check relies on it.
- adamw_step: elementwise, so any split is deterministic. Segments must not overlap (checked).
Scratch: the block list (3 int64 per block) and, for sumsq, one double per block.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport sqrt
from cython.parallel cimport prange
from _common cimport check_threads, shape_of

cdef enum:
    _BLOCK = 8192



cdef Py_ssize_t _check_segments(str fn, const int64_t[:, ::1] segments, Py_ssize_t P,
                                bint disjoint) except -1:
    """Validate 0 <= start <= end <= P (and pairwise disjointness); return the number of blocks."""
    if segments.shape[1] != 3:
        raise ValueError(f"{fn}: segments has shape {shape_of(segments)}, expected (S, 3) "
                         f"rows (start, end, flag)")
    cdef Py_ssize_t s, nblk = 0
    cdef int64_t lo, hi
    for s in range(segments.shape[0]):
        lo = segments[s, 0]
        hi = segments[s, 1]
        if lo < 0 or hi < lo or hi > P:
            raise ValueError(f"{fn}: segment {s} = [{lo}, {hi}) is not a range inside [0, {P})")
        nblk += (hi - lo + _BLOCK - 1) // _BLOCK
    if disjoint and segments.shape[0] > 1:
        ranges = sorted((segments[s, 0], segments[s, 1], s) for s in range(segments.shape[0])
                        if segments[s, 1] > segments[s, 0])
        for (lo0, hi0, s0), (lo1, hi1, s1) in zip(ranges, ranges[1:]):
            if lo1 < hi0:
                raise ValueError(f"{fn}: segments {s0} = [{lo0}, {hi0}) and {s1} = [{lo1}, {hi1}) "
                                 f"overlap")
    return nblk


cdef void _make_blocks(int64_t* blocks, const int64_t[:, ::1] segments) noexcept nogil:
    """blocks (nblk, 3): (start, end, flag) of every _BLOCK-sized piece, segments in order."""
    cdef Py_ssize_t s, k = 0
    cdef int64_t lo, hi
    for s in range(segments.shape[0]):
        lo = segments[s, 0]
        hi = segments[s, 1]
        while lo < hi:
            blocks[3 * k] = lo
            blocks[3 * k + 1] = lo + _BLOCK if hi - lo > _BLOCK else hi
            blocks[3 * k + 2] = segments[s, 2]
            lo = blocks[3 * k + 1]
            k += 1


cdef int64_t* _alloc_blocks(Py_ssize_t nblk, const int64_t[:, ::1] segments) except NULL:
    cdef int64_t* blocks = <int64_t*>malloc((3 * nblk + 1) * sizeof(int64_t))
    if blocks == NULL:
        raise MemoryError()
    with nogil:
        _make_blocks(blocks, segments)
    return blocks


# ------------------------------------------------------------------------------------------ sumsq

cdef inline double _block_sumsq(const float* g, int64_t lo, int64_t hi) noexcept nogil:
    """Σ_{i in [lo,hi)} g_i² in double: lane l sums i ≡ l (mod 8) in order, lanes combined as a tree."""
    cdef double acc[8]
    cdef double x
    cdef int64_t i = lo
    cdef int l
    for l in range(8):
        acc[l] = 0.0
    while i + 8 <= hi:
        for l in range(8):
            x = g[i + l]
            acc[l] += x * x
        i += 8
    l = 0
    while i < hi:
        x = g[i]
        acc[l] += x * x
        i += 1
        l += 1
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef double _sumsq(const float[::1] g,                  # IN (P)
                   const int64_t* blocks,               # IN (nblk, 3)
                   double* part,                        # scratch (nblk)
                   Py_ssize_t nblk, int n_threads) noexcept nogil:
    cdef Py_ssize_t b
    cdef double total = 0.0
    # part_b = Σ_{i in block b} g_i²   one block per iteration
    for b in prange(nblk, schedule='static', num_threads=n_threads, nogil=True):
        part[b] = _block_sumsq(&g[0], blocks[3 * b], blocks[3 * b + 1])
    # total = Σ_b part_b   serial, block order
    for b in range(nblk):
        total += part[b]
    return total


def sumsq(const float[::1] g, const int64_t[:, ::1] segments, int n_threads):
    """Σ g_i² (double) over the [start, end) rows of segments (S,3) int64; g (P) float32 IN.
    Bitwise identical for any n_threads."""
    check_threads(n_threads)
    cdef Py_ssize_t nblk = _check_segments("sumsq", segments, g.shape[0], False)
    if nblk == 0:
        return 0.0
    cdef int64_t* blocks = _alloc_blocks(nblk, segments)
    cdef double* part = <double*>malloc(nblk * sizeof(double))
    cdef double total
    if part == NULL:
        free(blocks)
        raise MemoryError()
    try:
        with nogil:
            total = _sumsq(g, blocks, part, nblk, n_threads)
    finally:
        free(part)
        free(blocks)
    return total


# ------------------------------------------------------------------------------------- adamw_step

cdef inline void _adamw_block(float* p, const float* g, float* m, float* v,
                              int64_t lo, int64_t hi, bint decay,
                              double beta1, double beta2, double eps, double decay_mul,
                              double step_size, double bc2_sqrt, double grad_scale) noexcept nogil:
    cdef int64_t i
    cdef double gs, mi, vi, pi
    for i in range(lo, hi):
        gs = g[i] * grad_scale
        mi = beta1 * m[i] + (1.0 - beta1) * gs
        vi = beta2 * v[i] + (1.0 - beta2) * gs * gs
        m[i] = <float>mi
        v[i] = <float>vi
        pi = p[i]
        if decay:
            pi = pi * decay_mul
        pi = pi - step_size * mi / (sqrt(vi) / bc2_sqrt + eps)
        p[i] = <float>pi


cdef void _adamw_step(float[::1] p, const float[::1] g, float[::1] m, float[::1] v,   # (P) each
                      const int64_t* blocks, Py_ssize_t nblk,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      double bc1, double bc2, double grad_scale, int n_threads) noexcept nogil:
    cdef Py_ssize_t b
    cdef double decay_mul = 1.0 - lr * weight_decay
    cdef double step_size = lr / bc1
    cdef double bc2_sqrt = sqrt(bc2)
    # m,v moments; p = p·(1-lr·wd) if flag; p -= (lr/bc1)·m/(sqrt(v)/sqrt(bc2)+eps)   block per iter
    for b in prange(nblk, schedule='static', num_threads=n_threads, nogil=True):
        _adamw_block(&p[0], &g[0], &m[0], &v[0], blocks[3 * b], blocks[3 * b + 1],
                     blocks[3 * b + 2] != 0, beta1, beta2, eps, decay_mul, step_size, bc2_sqrt,
                     grad_scale)


def adamw_step(float[::1] p, const float[::1] g, float[::1] m, float[::1] v,
               const int64_t[:, ::1] segments, double lr, double beta1, double beta2, double eps,
               double weight_decay, long long step, double grad_scale, int n_threads):
    """One AdamW update of p, m, v (P) OUT from g (P) IN on the segments (S,3) int64
    (start, end, decay_flag); step >= 1 is the number of this update (bias correction)."""
    check_threads(n_threads)
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1 (number of this update), got {step}")
    P = p.shape[0]
    for name, n in (("g", g.shape[0]), ("m", m.shape[0]), ("v", v.shape[0])):
        if n != P:
            raise ValueError(f"adamw_step: {name} has shape ({n},), expected ({P},) from p")
    cdef Py_ssize_t nblk = _check_segments("adamw_step", segments, P, True)
    if nblk == 0:
        return
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    cdef int64_t* blocks = _alloc_blocks(nblk, segments)
    try:
        with nogil:
            _adamw_step(p, g, m, v, blocks, nblk, lr, beta1, beta2, eps, weight_decay,
                        bc1, bc2, grad_scale, n_threads)
    finally:
        free(blocks)
