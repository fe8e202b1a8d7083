"""Single-token steps of the causal conv and the selective scan, for recurrent inference.

Notation: B prompts decoded together, C channels (d_model for mamba-lite, expand*d_model for the
full block), K conv taps, N state size, W = 2N+R the width of xdbl = [Bt | Ct | draw].

The training kernels (conv.pyx, scan.pyx) run over a whole (B, T) window. Generation instead
carries, per layer, the last K-1 conv inputs and the scan state h, and advances both by one token,
so a token costs the same whatever the length of the context.

conv_step  (state (B, K-1, C): the inputs at t-K+1 .. t-1, oldest first; zero before the start)
    pre[b,d] = conv_b[d] + sum_{k=0}^{K-2} conv_w[d,k]*state[b,k,d] + conv_w[d,K-1]*x[b,d]
    u[b,d]   = silu(pre[b,d])
    then state shifts by one: state[b,k] = state[b,k+1], state[b,K-2] = x[b]
scan_step  (h (B, N, C): the scan state after the previous token, zero before the start;
            negA (N, C) = -exp(A_log).T from neg_exp_t)
    delta    = softplus(dt[b,d] + dt_bias[d])
    h[b,n,d] = exp(delta*negA[n,d]) * h[b,n,d] + delta*u[b,d]*Bt[b,n]
    y[b,d]   = sum_n h[b,n,d]*Ct[b,n]  (n in order)  + D_skip[d]*u[b,d]

Both use the same operations in the same order as the window kernels (the taps summed from the
oldest, the exp of _common.pxd, fused multiply-adds where the scan uses them, the readout summed
over n in order), so a step reproduces the window forward at every position up to the rounding of
the surrounding BLAS products (tests/test_infer.py compares every position). The state is channel-minor (n outer, channels inner) so that the
inner loops run over contiguous channels and vectorise.

Parallel dimension: prange over (b, channel block) items; an item owns its outputs and its slice
of the state, so there are no races and the result does not depend on the thread count.
All arrays are float32 and C-contiguous; shapes are checked once in the `def` wrappers.
"""
from cython.parallel cimport prange
from libc.math cimport expf, fmaf, log1pf

from _common cimport rt_expf, sigmoidf, check_threads


cdef enum:
    CBLK = 64          # channels per work item (numerically irrelevant)


cdef inline float _softplus(float x) noexcept nogil:
    # as the scan kernel: x above 20, else log1p(exp(x)) with libm
    if x > 20:
        return x
    return log1pf(expf(x))


def _chk2(str fn, str name, a, Py_ssize_t n0, Py_ssize_t n1):
    if a.shape[0] != n0 or a.shape[1] != n1:
        raise ValueError(f"{fn}: {name} has shape {tuple(a.shape)[:2]}, expected {(n0, n1)}")


def _chk1(str fn, str name, a, Py_ssize_t n0):
    if a.shape[0] != n0:
        raise ValueError(f"{fn}: {name} has shape {tuple(a.shape)[:1]}, expected {(n0,)}")


# ----------------------------------------------------------------------------------------------
# conv
# ----------------------------------------------------------------------------------------------

cdef inline void _conv_item(float* pre, float* u, float* state, const float* x, const float* conv_w,
                            const float* conv_b, Py_ssize_t b, Py_ssize_t d0, Py_ssize_t d1,
                            Py_ssize_t C, Py_ssize_t K) noexcept nogil:
    cdef Py_ssize_t d, k
    cdef float acc
    cdef float* st = state + b * (K - 1) * C
    cdef const float* xb = x + b * C
    for d in range(d0, d1):
        acc = conv_b[d]
        for k in range(K - 1):
            acc = acc + conv_w[d * K + k] * st[k * C + d]
        acc = acc + conv_w[d * K + K - 1] * xb[d]
        pre[b * C + d] = acc
        u[b * C + d] = acc * sigmoidf(acc)
    # shift the window by one token
    for k in range(K - 2):
        for d in range(d0, d1):
            st[k * C + d] = st[(k + 1) * C + d]
    if K > 1:
        for d in range(d0, d1):
            st[(K - 2) * C + d] = xb[d]


def conv_step(float[:, ::1] pre not None,            # OUT (B,C)
              float[:, ::1] u not None,              # OUT (B,C)   silu(pre)
              float[:, :, ::1] state not None,       # IN/OUT (B,K-1,C) the last K-1 inputs
              const float[:, ::1] x not None,        # IN  (B,C)   this token's conv input
              const float[:, ::1] conv_w not None,   # IN  (C,K)
              const float[::1] conv_b not None,      # IN  (C,)
              int n_threads):
    """One token of the causal depthwise conv + SiLU; advances `state` by the token."""
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], K = conv_w.shape[1]
    check_threads(n_threads)
    _chk2("conv_step", "pre", pre, B, C)
    _chk2("conv_step", "u", u, B, C)
    _chk2("conv_step", "conv_w", conv_w, C, K)
    _chk1("conv_step", "conv_b", conv_b, C)
    if K < 1:
        raise ValueError("conv_step: conv_w needs K >= 1 taps")
    if state.shape[0] != B or state.shape[1] != K - 1 or state.shape[2] != C:
        raise ValueError(f"conv_step: state has shape {tuple(state.shape)[:3]}, expected {(B, K - 1, C)}")
    if B * C == 0:
        return
    cdef Py_ssize_t nblk = (C + CBLK - 1) // CBLK, i, b, d0, d1
    cdef float* sp = &state[0, 0, 0] if K > 1 else NULL
    cdef float* pp = &pre[0, 0]
    cdef float* up = &u[0, 0]
    cdef const float* xp = &x[0, 0]
    cdef const float* wp = &conv_w[0, 0]
    cdef const float* bp = &conv_b[0]
    with nogil:
        for i in prange(B * nblk, schedule='static', num_threads=n_threads):
            b = i // nblk
            d0 = (i % nblk) * CBLK
            d1 = d0 + CBLK if d0 + CBLK < C else C
            _conv_item(pp, up, sp, xp, wp, bp, b, d0, d1, C, K)


# ----------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------

def neg_exp_t(float[:, ::1] negA not None,           # OUT (N,C)
              const float[:, ::1] A_log not None,    # IN  (C,N)
              int n_threads):
    """negA[n,d] = -expf(A_log[d,n]) (libm expf, as the scan kernel): the transposed decay rates,
    computed once per model (serial: C*N elements, once)."""
    cdef Py_ssize_t C = A_log.shape[0], N = A_log.shape[1], d, n
    check_threads(n_threads)
    _chk2("neg_exp_t", "negA", negA, N, C)
    for d in range(C):
        for n in range(N):
            negA[n, d] = -expf(A_log[d, n])


cdef inline void _scan_item(float* y, float* h, const float* u, const float* dt, const float* dt_bias,
                            const float* negA, const float* xdbl, const float* D_skip,
                            Py_ssize_t b, Py_ssize_t d0, Py_ssize_t d1, Py_ssize_t C, Py_ssize_t N,
                            Py_ssize_t W) noexcept nogil:
    cdef float dl[CBLK]
    cdef float dlu[CBLK]
    cdef float acc[CBLK]
    cdef Py_ssize_t nb = d1 - d0, j, n
    cdef const float* Bt = xdbl + b * W
    cdef const float* Ct = Bt + N
    cdef float* hb = h + b * N * C + d0
    cdef const float* An
    cdef float* hn
    cdef float Bn, Cn
    for j in range(nb):
        dl[j] = _softplus(dt[b * C + d0 + j] + dt_bias[d0 + j])
        dlu[j] = dl[j] * u[b * C + d0 + j]
        acc[j] = 0
    for n in range(N):
        hn = hb + n * C
        An = negA + n * C + d0
        Bn = Bt[n]
        Cn = Ct[n]
        for j in range(nb):
            hn[j] = fmaf(rt_expf(dl[j] * An[j]), hn[j], dlu[j] * Bn)
            acc[j] = fmaf(hn[j], Cn, acc[j])
    for j in range(nb):
        y[b * C + d0 + j] = fmaf(D_skip[d0 + j], u[b * C + d0 + j], acc[j])


def scan_step(float[:, ::1] y not None,              # OUT (B,C)
              float[:, :, ::1] h not None,           # IN/OUT (B,N,C) the scan state
              const float[:, ::1] u not None,        # IN  (B,C) conv output
              const float[:, ::1] dt not None,       # IN  (B,C) pre-bias draw @ dt_proj_w (0: LTI)
              const float[::1] dt_bias not None,     # IN  (C,)
              const float[:, ::1] negA not None,     # IN  (N,C) -exp(A_log).T (neg_exp_t)
              const float[:, ::1] xdbl not None,     # IN  (B,W) [Bt | Ct | draw], W >= 2N
              const float[::1] D_skip not None,      # IN  (C,)
              int n_threads):
    """One token of the selective scan: advances h and writes y."""
    cdef Py_ssize_t B = u.shape[0], C = u.shape[1], N = negA.shape[0], W = xdbl.shape[1]
    check_threads(n_threads)
    _chk2("scan_step", "y", y, B, C)
    _chk2("scan_step", "dt", dt, B, C)
    _chk2("scan_step", "negA", negA, N, C)
    _chk1("scan_step", "dt_bias", dt_bias, C)
    _chk1("scan_step", "D_skip", D_skip, C)
    if xdbl.shape[0] != B or W < 2 * N:
        raise ValueError(f"scan_step: xdbl has shape {(xdbl.shape[0], W)}, expected ({B}, >= {2 * N})")
    if h.shape[0] != B or h.shape[1] != N or h.shape[2] != C:
        raise ValueError(f"scan_step: h has shape {tuple(h.shape)[:3]}, expected {(B, N, C)}")
    if B * C == 0:
        return
    cdef Py_ssize_t nblk = (C + CBLK - 1) // CBLK, i, b, d0, d1
    cdef float* yp = &y[0, 0]
    cdef float* hp = &h[0, 0, 0] if N > 0 else NULL
    cdef const float* up = &u[0, 0]
    cdef const float* dtp = &dt[0, 0]
    cdef const float* dbp = &dt_bias[0]
    cdef const float* ap = &negA[0, 0] if N > 0 else NULL
    cdef const float* xp = &xdbl[0, 0] if W > 0 else NULL
    cdef const float* dsp = &D_skip[0]
    with nogil:
        for i in prange(B * nblk, schedule='static', num_threads=n_threads):
            b = i // nblk
            d0 = (i % nblk) * CBLK
            d1 = d0 + CBLK if d0 + CBLK < C else C
            _scan_item(yp, hp, up, dtp, dbp, ap, xp, dsp, b, d0, d1, C, N, W)
