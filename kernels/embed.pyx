"""Token embedding: forward gather and backward scatter-add (the first op of the forward pass).

    forward   r[b, t, :] = E[ids[b, t], :]                      r (B,T,D), E (V,D), ids (B,T) int64
    backward  dE[ids[b, t], :] += dout[b, t, :]                 dE (V,D), dout (B,T,D)

Range check: every id must lie in [0, V). Both entry points scan ids BEFORE touching memory and raise
ValueError naming the first bad (b, t) in row-major order (an out-of-range token is an error, never wrapped).

Saved state: none (ids are the only thing backward needs).

Parallel decomposition:
- forward: prange over the B*T token rows; each row of `out` is owned by one iteration.
- backward: repeated ids collide on the same dE row, so tokens cannot be split across threads without
  atomics. Instead prange over column blocks of D; inside a block tokens are visited in (b, t) order.
  Every dE element therefore receives its additions in the same order whatever the block width, so the
  result is bitwise identical for ANY n_threads (not only for a fixed one).

Backward accumulates (+=) into dE; the caller zeroes the gradient buffer once per step.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from cython.parallel cimport prange
from _common cimport check_threads, col_block_width, shape_of

# Column-block granularity of the backward scatter: one 64-byte cache line of float32.


cdef Py_ssize_t _first_bad_id(const int64_t[:, ::1] ids, int64_t V) noexcept nogil:
    """Flat index b*T+t of the first id outside [0, V), or -1 if all are valid."""
    cdef Py_ssize_t B = ids.shape[0], T = ids.shape[1], b, t
    cdef int64_t k
    for b in range(B):
        for t in range(T):
            k = ids[b, t]
            if k < 0 or k >= V:
                return b * T + t
    return -1


cdef _check_ids(const int64_t[:, ::1] ids, Py_ssize_t V):
    cdef Py_ssize_t bad
    with nogil:
        bad = _first_bad_id(ids, <int64_t>V)
    if bad >= 0:
        b = bad // ids.shape[1]
        t = bad % ids.shape[1]
        raise ValueError(
            f"token id {ids[b, t]} at position (b={b}, t={t}) is outside [0, {V})")



# ----------------------------------------------------------------------------------------- forward

cdef void _embed_forward(float[:, :, ::1] out,          # OUT (B,T,D)
                         const int64_t[:, ::1] ids,     # IN  (B,T), all in [0,V) (checked)
                         const float[:, ::1] E,         # IN  (V,D)
                         int n_threads) noexcept nogil:
    cdef Py_ssize_t B = out.shape[0], T = out.shape[1], D = out.shape[2]
    cdef Py_ssize_t r, b, t
    if B * T == 0 or D == 0:
        return
    # r[b,t,:] = E[ids[b,t],:]   one token row per iteration
    for r in prange(B * T, schedule='static', num_threads=n_threads, nogil=True):
        b = r // T
        t = r - b * T
        memcpy(&out[b, t, 0], &E[ids[b, t], 0], D * sizeof(float))


def embed_forward(float[:, :, ::1] out, const int64_t[:, ::1] ids, const float[:, ::1] E,
                  int n_threads):
    """out (B,T,D) OUT = E[ids]; ids (B,T) int64 IN; E (V,D) IN. ValueError on ids outside [0, V)."""
    check_threads(n_threads)
    if out.shape[0] != ids.shape[0] or out.shape[1] != ids.shape[1] or out.shape[2] != E.shape[1]:
        raise ValueError(
            f"embed_forward: out has shape {shape_of(out)}, expected "
            f"(B, T, D) = {(ids.shape[0], ids.shape[1], E.shape[1])} from ids {shape_of(ids)} "
            f"and E {shape_of(E)}")
    _check_ids(ids, E.shape[0])
    with nogil:
        _embed_forward(out, ids, E, n_threads)


# ---------------------------------------------------------------------------------------- backward

cdef inline void _scatter_cols(float[:, ::1] dE, const int64_t[:, ::1] ids,
                               const float[:, :, ::1] dout,
                               Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """dE[ids[b,t], j0:j1] += dout[b, t, j0:j1] for all tokens, in (b, t) order."""
    cdef Py_ssize_t B = dout.shape[0], T = dout.shape[1], b, t, j
    cdef float* dst
    cdef const float* src
    for b in range(B):
        for t in range(T):
            dst = &dE[ids[b, t], 0]
            src = &dout[b, t, 0]
            for j in range(j0, j1):
                dst[j] += src[j]


cdef void _embed_backward(float[:, ::1] dE,              # OUT (V,D), +=
                          const int64_t[:, ::1] ids,     # IN  (B,T)
                          const float[:, :, ::1] dout,   # IN  (B,T,D)
                          int n_threads) noexcept nogil:
    cdef Py_ssize_t B = dout.shape[0], T = dout.shape[1], D = dout.shape[2]
    cdef Py_ssize_t width, nblk, blk, j0, j1
    if B * T == 0 or D == 0:
        return
    # one column block per thread, rounded up to whole cache lines
    width = col_block_width(D, n_threads)
    nblk = (D + width - 1) // width
    # dE[ids[b,t], j] += dout[b,t,j]   block of columns j per iteration, tokens in order inside
    for blk in prange(nblk, schedule='static', num_threads=n_threads, nogil=True):
        j0 = blk * width
        j1 = min(j0 + width, D)
        _scatter_cols(dE, ids, dout, j0, j1)


def embed_backward(float[:, ::1] dE, const int64_t[:, ::1] ids, const float[:, :, ::1] dout,
                   int n_threads):
    """dE (V,D) OUT += scatter of dout (B,T,D) IN by ids (B,T) int64 IN. ValueError on bad ids."""
    check_threads(n_threads)
    if (dout.shape[0] != ids.shape[0] or dout.shape[1] != ids.shape[1]
            or dout.shape[2] != dE.shape[1]):
        raise ValueError(
            f"embed_backward: dout has shape {shape_of(dout)}, expected "
            f"(B, T, D) = {(ids.shape[0], ids.shape[1], dE.shape[1])} from ids {shape_of(ids)} "
            f"and dE {shape_of(dE)}")
    _check_ids(ids, dE.shape[0])
    with nogil:
        _embed_backward(dE, ids, dout, n_threads)
