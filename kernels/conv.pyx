"""Causal depthwise convolution + SiLU (the first step of a layer), forward and backward.

Notation (docs/architecture.md): B batch, T time, D channels (d_model), K conv taps (d_conv).

Formula
    pre[b,t,d] = conv_b[d] + sum_{k=0}^{K-1} conv_w[d,k] * x[b, t+k-(K-1), d]   (x[b, <0, d] = 0:
                 zero left pad, i.e. the convolution is causal)
    u[b,t,d]   = silu(pre[b,t,d]) = pre * s,   s = sigmoid(pre) = 1/(1+expf(-pre))

What forward saves
    `pre` (B,T,D) is an output: the model keeps it (with the layer input `x`) for the backward.
    Nothing else is stored; sigmoid(pre) is not saved.

What backward recomputes
    s = sigmoid(pre) (one expf per element), then
        dpre[b,t,d]          = du[b,t,d] * silu'(pre),   silu'(p) = s*(1 + p*(1-s))
        dx[b,t+k-(K-1),d]   += dpre[b,t,d] * conv_w[d,k]                 (terms with t+k-(K-1) < 0 dropped)
        dconv_w[d,k]        += sum_{b,t} dpre[b,t,d] * x[b,t+k-(K-1),d]
        dconv_b[d]          += sum_{b,t} dpre[b,t,d]
    Backward ACCUMULATES (+=) into dx, dconv_w and dconv_b; the model zeroes them once per step.

Parallel dimension
    forward   prange over the B*T rows (b,t): a row writes only its own pre/u row (loops over its D
              channels, conv_w transposed once per call).
    backward  prange over channel blocks [d0, d0+CB) with b and t sequential inside. A block owns its
              dx columns and its rows of dconv_w/dconv_b outright, so there are no atomics and no
              cross-thread partials. The sums over (b,t) for dconv_w/dconv_b run in a fixed order
              (b, then t) in thread-private float64 scratch; per thread (K+1)*CB doubles plus (K+1)*CB
              floats (the block's conv_w transposed and one dpre row), CB = D/n_threads rounded up
              to 16 (one contiguous run of each row per thread).
    Every output element is computed by exactly one iteration in an order that does not depend on
    the thread count, so results are bitwise identical for any n_threads, and with OpenMP disabled.

All arrays are float32 and C-contiguous; shapes are checked once in the `def` wrappers.
"""
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free

from _omp cimport omp_thread_id
from _common cimport check_shape1, check_shape3, check_threads, col_block_width, rcf, rf, sigmoidf


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

cdef inline void _fwd_init(Py_ssize_t D, rf pre, rcf conv_b) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(D):
        pre[d] = conv_b[d]


cdef inline void _fwd_tap(Py_ssize_t D, rf pre, rcf wk, rcf xk) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(D):
        pre[d] = pre[d] + wk[d] * xk[d]


cdef inline void _fwd_silu(Py_ssize_t D, rf u, rcf pre) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(D):
        u[d] = pre[d] * sigmoidf(pre[d])


cdef inline void _conv_fwd_row(float* pre, float* u, const float* x, const float* wT,
                               const float* conv_b, Py_ssize_t i, Py_ssize_t T, Py_ssize_t D,
                               Py_ssize_t K) noexcept nogil:
    """One row i = b*T + t.  pre, u, x: (B*T*D) flat; wT (K*D) = conv_w transposed; conv_b (D).
    Per element: pre = conv_b, then + conv_w[d,k]*x for k ascending (taps at negative time are
    skipped), u = pre*sigmoid(pre); every loop runs over the row's D contiguous channels."""
    cdef Py_ssize_t t = i % T
    cdef Py_ssize_t row = i * D
    # taps k < k0 read x at negative time (zero pad) and are skipped
    cdef Py_ssize_t k0 = K - 1 - t if t < K - 1 else 0
    cdef Py_ssize_t k
    _fwd_init(D, pre + row, conv_b)
    for k in range(k0, K):
        _fwd_tap(D, pre + row, wT + k * D, x + row + (k - (K - 1)) * D)
    _fwd_silu(D, u + row, pre + row)


cdef void _conv_fwd(float* pre, float* u, const float* x, const float* wT,
                    const float* conv_b, Py_ssize_t B, Py_ssize_t T, Py_ssize_t D, Py_ssize_t K,
                    int n_threads) noexcept nogil:
    cdef Py_ssize_t i
    for i in prange(B * T, schedule='static', num_threads=n_threads):
        _conv_fwd_row(pre, u, x, wT, conv_b, i, T, D, K)


def conv_forward(float[:, :, ::1] pre not None,        # OUT (B,T,D)
                 float[:, :, ::1] u not None,          # OUT (B,T,D)   u = silu(pre)
                 const float[:, :, ::1] x not None,    # IN  (B,T,D)
                 const float[:, ::1] conv_w not None,  # IN  (D,K)
                 const float[::1] conv_b not None,     # IN  (D,)
                 int n_threads):
    """Causal depthwise conv + SiLU.  Writes pre (B,T,D) and u = silu(pre) (B,T,D).

    pre[b,t,d] = conv_b[d] + sum_k conv_w[d,k] * x[b, t+k-(K-1), d]  (zero left pad).
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], D = x.shape[2], K = conv_w.shape[1]
    check_shape3("conv_forward", "pre", pre, B, T, D)
    check_shape3("conv_forward", "u", u, B, T, D)
    if conv_w.shape[0] != D or K < 1:
        raise ValueError(f"conv_forward: conv_w has shape {(conv_w.shape[0], conv_w.shape[1])}, "
                         f"expected (D, K) = ({D}, K>=1) for x of shape {(B, T, D)}")
    check_shape1("conv_forward", "conv_b", conv_b, D)
    check_threads(n_threads)
    if B * T * D == 0:
        return
    cdef float* wT = <float*>malloc(K * D * sizeof(float))
    cdef Py_ssize_t d, k
    if wT == NULL:
        raise MemoryError("conv_forward: scratch")
    try:
        with nogil:
            for d in range(D):
                for k in range(K):
                    wT[k * D + d] = conv_w[d, k]
            _conv_fwd(&pre[0, 0, 0], &u[0, 0, 0], &x[0, 0, 0], wT, &conv_b[0],
                      B, T, D, K, n_threads)
    finally:
        free(wT)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

cdef inline void _conv_bwd_block(float* dx, float* dconv_w, float* dconv_b, const float* du,
                                 const float* x, const float* pre, const float* conv_w,
                                 Py_ssize_t B, Py_ssize_t T, Py_ssize_t D, Py_ssize_t K,
                                 Py_ssize_t d0, Py_ssize_t d1, double* acc,
                                 float* fscr) noexcept nogil:
    """Channels [d0, d1) for every (b, t).

    dx, du, x, pre: (B*T*D) flat; dconv_w, conv_w: (D*K) flat; dconv_b: (D).
    acc  (thread-private float64, (K+1, nb)): rows [0,K) sum dconv_w[d0:d1, k], row K dconv_b.
    fscr (thread-private float32): wT (K, nb) = conv_w[d0:d1, :].T | dp (nb) = dpre row.
    Inner loops run over the nb contiguous channels so they vectorise (except expf).
    """
    cdef Py_ssize_t nb = d1 - d0
    cdef Py_ssize_t b, t, j, k, k0, row, off
    cdef float p, s
    cdef float* wT = fscr
    cdef float* dp = fscr + K * nb
    cdef double* accb = acc + K * nb
    cdef double* accw
    cdef const float* xr
    cdef float* dxr
    cdef const float* wk
    for j in range((K + 1) * nb):
        acc[j] = 0.0
    for j in range(nb):
        for k in range(K):
            wT[k * nb + j] = conv_w[(d0 + j) * K + k]
    for b in range(B):
        for t in range(T):
            row = (b * T + t) * D + d0
            # taps k < k0 read x at negative time (zero pad): no contribution
            k0 = K - 1 - t if t < K - 1 else 0
            # dpre = du * silu'(pre),  silu'(p) = s*(1 + p*(1-s)),  s = sigmoid(p)
            for j in range(nb):
                p = pre[row + j]
                s = sigmoidf(p)
                dp[j] = du[row + j] * (s * (<float>1 + p * (<float>1 - s)))
            # dconv_b[d] += sum_{b,t} dpre[b,t,d]
            for j in range(nb):
                accb[j] += dp[j]
            for k in range(k0, K):
                off = row + (k - (K - 1)) * D              # x[b, t+k-(K-1), d0]
                xr = x + off
                dxr = dx + off
                accw = acc + k * nb
                wk = wT + k * nb
                # dconv_w[d,k] += sum_{b,t} dpre[b,t,d] * x[b,t+k-(K-1),d]
                for j in range(nb):
                    accw[j] += <double>dp[j] * xr[j]
                # dx[b,t+k-(K-1),d] += dpre[b,t,d] * conv_w[d,k]
                for j in range(nb):
                    dxr[j] += dp[j] * wk[j]
    for j in range(nb):
        for k in range(K):
            dconv_w[(d0 + j) * K + k] += <float>acc[k * nb + j]
        dconv_b[d0 + j] += <float>accb[j]


cdef void _conv_bwd(float* dx, float* dconv_w, float* dconv_b, const float* du, const float* x,
                    const float* pre, const float* conv_w, Py_ssize_t B, Py_ssize_t T,
                    Py_ssize_t D, Py_ssize_t K, Py_ssize_t cb, Py_ssize_t n_blocks,
                    double* scratch, float* fscratch, int n_threads) noexcept nogil:
    """scratch: (n_threads, (K+1)*cb) float64; fscratch: (n_threads, (K+1)*cb) float32."""
    cdef Py_ssize_t i, d0, d1
    cdef int tid
    for i in prange(n_blocks, schedule='static', num_threads=n_threads):
        tid = omp_thread_id()
        d0 = i * cb
        d1 = d0 + cb if d0 + cb < D else D
        _conv_bwd_block(dx, dconv_w, dconv_b, du, x, pre, conv_w, B, T, D, K, d0, d1,
                        scratch + tid * cb * (K + 1), fscratch + tid * cb * (K + 1))


def conv_backward(float[:, :, ::1] dx not None,         # OUT += (B,T,D)
                  float[:, ::1] dconv_w not None,       # OUT += (D,K)
                  float[::1] dconv_b not None,          # OUT += (D,)
                  const float[:, :, ::1] du not None,   # IN  (B,T,D)  dL/du
                  const float[:, :, ::1] x not None,    # IN  (B,T,D)  saved layer input
                  const float[:, :, ::1] pre not None,  # IN  (B,T,D)  saved by conv_forward
                  const float[:, ::1] conv_w not None,  # IN  (D,K)
                  int n_threads):
    """Backward of conv_forward; ACCUMULATES into dx (B,T,D), dconv_w (D,K), dconv_b (D)."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], D = x.shape[2], K = conv_w.shape[1]
    check_shape3("conv_backward", "dx", dx, B, T, D)
    check_shape3("conv_backward", "du", du, B, T, D)
    check_shape3("conv_backward", "pre", pre, B, T, D)
    if conv_w.shape[0] != D or K < 1:
        raise ValueError(f"conv_backward: conv_w has shape {(conv_w.shape[0], conv_w.shape[1])}, "
                         f"expected (D, K) = ({D}, K>=1) for x of shape {(B, T, D)}")
    if dconv_w.shape[0] != D or dconv_w.shape[1] != K:
        raise ValueError(f"conv_backward: dconv_w has shape "
                         f"{(dconv_w.shape[0], dconv_w.shape[1])}, expected (D, K) = {(D, K)}")
    check_shape1("conv_backward", "dconv_b", dconv_b, D)
    check_threads(n_threads)
    if B * T * D == 0:
        return
    # channel block: CB_MAX, halved while there are fewer than 4 blocks per thread
    # one block of contiguous channels per thread: every (b, t) row of a block is one contiguous
    # run of memory (narrow blocks strided through the rows and stalled on memory)
    cdef Py_ssize_t cb = col_block_width(D, n_threads)
    cdef Py_ssize_t n_blocks = (D + cb - 1) // cb
    cdef int nt = n_threads if n_threads < n_blocks else <int>n_blocks
    cdef double* scratch = <double*>malloc(nt * cb * (K + 1) * sizeof(double))
    cdef float* fscratch = <float*>malloc(nt * cb * (K + 1) * sizeof(float))
    try:
        if scratch == NULL or fscratch == NULL:
            raise MemoryError("conv_backward: thread scratch")
        with nogil:
            _conv_bwd(&dx[0, 0, 0], &dconv_w[0, 0], &dconv_b[0], &du[0, 0, 0], &x[0, 0, 0],
                      &pre[0, 0, 0], &conv_w[0, 0], B, T, D, K, cb, n_blocks, scratch, fscratch,
                      nt)
    finally:
        free(scratch)
        free(fscratch)


# ----------------------------------------------------------------------------------------------
# shape checks (Python level, once per call)
# ----------------------------------------------------------------------------------------------

