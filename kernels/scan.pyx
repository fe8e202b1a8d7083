"""Fused discretisation + selective scan + C readout + D skip (the middle of a layer), forward and backward.

Notation (docs/architecture.md): B batch, T time, D channels (d_model), N state size (d_state), R dt rank.
`xdbl` (B,T,2N+R) is the x_proj output [Bt | Ct | draw]; the scan reads columns [0,2N) only.

Recurrence (per b, d; n = 0..N-1)
    delta_t[d] = softplus(dt[b,t,d] + dt_bias[d]),  softplus(x) = x if x > 20 else log1pf(expf(x))
    A[d,n]     = -expf(A_log[d,n])
    h_{-1}     = 0
    h_t[d,n]   = expf(delta_t[d]*A[d,n]) * h_{t-1}[d,n] + delta_t[d]*u_t[d]*Bt_t[n]
    y_t[d]     = sum_n h_t[d,n]*Ct_t[n] + D_skip[d]*u_t[d]

What forward saves
    hs (B, n_chunks, D, N), n_chunks = ceil(T/chunk): the state h BEFORE step t = c*chunk
    (hs[:,0] = 0). Activation memory is B*T*D*N/chunk, never the full trajectory.

What backward recomputes
    Chunks are walked in reverse. For chunk c and one channel d, h_t (t in the chunk) is recomputed
    from hs[b,c,d] into thread-private scratch H ((chunk+1)*N floats, plus expf(delta*A) in
    chunk*N floats), with exactly the operations of the forward (same inline step), so the
    recomputed states are bitwise those of the forward. Then t runs backwards through the chunk
    with the carry g[n] = dL/dh_t[n]:
        g        += dy_t*Ct_t                 dCt_t[n] += dy_t*h_t[n]
        dBt_t[n] += g[n]*delta_t*u_t          du_t     += dy_t*D_skip + delta_t*sum_n g[n]*Bt_t[n]
        q[n]      = g[n]*expf(delta_t*A[n])*h_{t-1}[n]
        ddelta_t  = sum_n A[n]*q[n] + u_t*sum_n g[n]*Bt_t[n]
        dA[n]    += delta_t*q[n]              (dA_log = A*dA: dA/dA_log = A)
        ddt_t     = ddelta_t*sigmoid(dt+dt_bias)   (also above the softplus threshold 20)
        dD_skip  += dy_t*u_t;  ddt_bias += ddt_t
        g[n]     *= expf(delta_t*A[n])        (-> dL/dh_{t-1})
    Backward ACCUMULATES (+=) into du, ddt, ddt_bias, dA_log, dxdbl[..., :2N] and dD_skip; the
    trailing R columns of dxdbl are never touched.

Parallel dimension (T is sequential)
    forward   prange over (b, channel block): each item owns y[b,:,block] and hs[b,:,block,:].
    backward  prange over channel blocks, b inside. A block owns its du/ddt columns and its rows
              of dA_log, dD_skip, ddt_bias (summed over b and t in thread-private float64). dBt/dCt
              sum over d, so each thread adds into its own (B,T,2N) float32 partial; after the loop
              the partials are reduced in thread order 0..nt-1 (prange over rows, no atomics).
    Scratch per thread: backward (2*L+1)*N + L + (2*DB+1)*N floats and DB*N + 2*DB doubles
    (L = min(chunk,T), DB <= 8) plus B*T*2N floats of partials; forward (2*DB+1)*N floats.
    Nothing of size B*T*D*N is ever allocated.

Determinism
    Fixed thread count + schedule='static' -> bitwise identical results. y and hs do not depend on
    n_threads or chunk at all (per-channel work in a fixed order); du, ddt, dA_log, dD_skip and
    ddt_bias neither; dBt/dCt depend on n_threads only through the order of the partial sums.
    With OpenMP disabled every iteration runs on "thread 0".

All arrays are float32 and C-contiguous; shapes are checked once in the `def` wrappers.
"""
from cython.parallel cimport prange
from libc.math cimport expf, fmaf, log1pf
from _common cimport rcf, rf, rt_expf
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from _omp cimport omp_thread_id
from _common cimport check_shape1, check_shape3, check_threads, sigmoidf


cdef enum:
    DB_MAX = 8          # channels per work item (shrunk for small D; numerically irrelevant)


ctypedef struct Dims:
    Py_ssize_t B, T, D, N, W, chunk, n_chunks, db, L


cdef inline float _softplus(float x) noexcept nogil:
    # softplus(x) = x above 20 (where log1p(exp(x)) == x in float32), else log1p(exp(x)) with exact libm calls
    if x > 20:
        return x
    return log1pf(expf(x))


cdef inline float _ssm_update(float h_prev, float delta, float A, float delta_u, float Bn) noexcept nogil:
    """h_t = exp(delta*A) * h_{t-1} + delta*u*Bt for one (channel, state) element. Forward and the
    backward's recompute both go through it (or _ssm_step, which inlines the same two
    operations), so they produce the same bits."""
    return fmaf(rt_expf(delta * A), h_prev, delta_u * Bn)


cdef inline void _ssm_lanes8(rf h_out, rcf h_prev, rf dA, rcf A, rcf Bt, float delta, float delta_u,
                             Py_ssize_t nl) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(nl):
        dA[l] = rt_expf(delta * A[l])                   # dA = expf(delta_t * A)
        h_out[l] = fmaf(dA[l], h_prev[l], delta_u * Bt[l])


cdef inline void _ssm_step(float* h_out, const float* h_prev, float* dA, const float* A,
                           const float* Bt, float delta, float delta_u,
                           Py_ssize_t N) noexcept nogil:
    """One step of the recurrence for one channel (the backward's recompute): the same operations
    as _ssm_update, keeping exp(delta*A) in dA.  h_out, h_prev, dA, A, Bt: (N,), not overlapping.
    In blocks of 8 state indices (a constant trip count gcc turns into one vector)."""
    cdef Py_ssize_t n0 = 0
    while n0 + 8 <= N:
        _ssm_lanes8(h_out + n0, h_prev + n0, dA + n0, A + n0, Bt + n0, delta, delta_u, 8)
        n0 += 8
    if n0 < N:
        _ssm_lanes8(h_out + n0, h_prev + n0, dA + n0, A + n0, Bt + n0, delta, delta_u, N - n0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

cdef inline void _fwd_lanes(Py_ssize_t nb, rf h, rf acc, rcf A, rcf dl, rcf dlu, float Bn,
                            float Cn) noexcept nogil:
    """One state index n of one step for the nb channels of a block (restrict: gcc vectorises
    across channels): h_t = exp(delta*A)*h_{t-1} + delta*u*Bt ; acc += h_t*Ct."""
    cdef Py_ssize_t j
    for j in range(nb):
        h[j] = _ssm_update(h[j], dl[j], A[j], dlu[j], Bn)
        acc[j] = fmaf(h[j], Cn, acc[j])


cdef inline void _scan_fwd_item(float* y, float* hs, const float* u, const float* dt,
                                const float* dt_bias, const float* A_log, const float* xdbl,
                                const float* D_skip, Dims m, Py_ssize_t b, Py_ssize_t d0,
                                Py_ssize_t d1, float* scr) noexcept nogil:
    """Batch b, channels [d0,d1), all t.
    y, u, dt: (B*T*D); hs: (B*n_chunks*D*N); xdbl: (B*T*W); A_log: (D*N); dt_bias, D_skip: (D).
    scr (thread-private): h (N,DB) | A (N,DB) | delta (DB) | delta*u (DB) | acc (DB).
    The state is kept channel-minor, h[n*DB + j], so every inner loop runs over the nb channels
    of the block: the exp and the update vectorise across channels, and the readout
    sum_n h*Ct is nb independent running sums, each over n in order (no serial dependency
    chain across n for the CPU to wait on, and the same order for every channel)."""
    cdef Py_ssize_t N = m.N, D = m.D, DB = m.db, nb = d1 - d0
    cdef float* h = scr
    cdef float* A = scr + DB * N
    cdef float* dl = scr + 2 * DB * N
    cdef float* dlu = dl + DB
    cdef float* acc = dlu + DB
    cdef Py_ssize_t j, n, t, row
    cdef const float* Bt
    cdef const float* Ct
    cdef float* hs_c
    # A = -exp(A_log);  h_{-1} = 0
    for n in range(N):
        for j in range(nb):
            A[n * DB + j] = -expf(A_log[(d0 + j) * N + n])
            h[n * DB + j] = 0
    for t in range(m.T):
        row = b * m.T + t
        Bt = xdbl + row * m.W
        Ct = Bt + N
        if t % m.chunk == 0:
            # hs[b, c, d0+j, n] = h[n, j] (state before step t = c*chunk)
            hs_c = hs + ((b * m.n_chunks + t // m.chunk) * D + d0) * N
            for j in range(nb):
                for n in range(N):
                    hs_c[j * N + n] = h[n * DB + j]
        # delta = softplus(dt + dt_bias)
        for j in range(nb):
            dl[j] = _softplus(dt[row * D + d0 + j] + dt_bias[d0 + j])
            dlu[j] = dl[j] * u[row * D + d0 + j]
            acc[j] = 0
        # h_t[n] = exp(delta*A[n]) * h_{t-1}[n] + delta*u*Bt[n] ;  acc += h_t[n]*Ct[n]
        if nb == DB_MAX:   # the common case: a constant trip count, one vector register of lanes
            for n in range(N):
                _fwd_lanes(DB_MAX, h + n * DB, acc, A + n * DB, dl, dlu, Bt[n], Ct[n])
        else:
            for n in range(N):
                _fwd_lanes(nb, h + n * DB, acc, A + n * DB, dl, dlu, Bt[n], Ct[n])
        # y_t = sum_n h_t*Ct_t + D_skip*u_t
        for j in range(nb):
            y[row * D + d0 + j] = fmaf(D_skip[d0 + j], u[row * D + d0 + j], acc[j])


cdef void _scan_fwd(float* y, float* hs, const float* u, const float* dt, const float* dt_bias,
                    const float* A_log, const float* xdbl, const float* D_skip, Dims m,
                    float* scratch, Py_ssize_t scr_size, int n_threads) noexcept nogil:
    cdef Py_ssize_t n_blocks = (m.D + m.db - 1) // m.db
    cdef Py_ssize_t i, b, d0, d1
    cdef int tid
    for i in prange(m.B * n_blocks, schedule='static', num_threads=n_threads):
        tid = omp_thread_id()
        b = i // n_blocks
        d0 = (i % n_blocks) * m.db
        d1 = d0 + m.db if d0 + m.db < m.D else m.D
        _scan_fwd_item(y, hs, u, dt, dt_bias, A_log, xdbl, D_skip, m, b, d0, d1,
                       scratch + tid * scr_size)


def scan_forward(float[:, :, ::1] y not None,             # OUT (B,T,D)
                 float[:, :, :, ::1] hs not None,         # OUT (B,ceil(T/chunk),D,N) h before t=c*chunk
                 const float[:, :, ::1] u not None,       # IN  (B,T,D) conv output
                 const float[:, :, ::1] dt not None,      # IN  (B,T,D) pre-bias draw @ dt_proj_w
                 const float[::1] dt_bias not None,       # IN  (D,)
                 const float[:, ::1] A_log not None,      # IN  (D,N)
                 const float[:, :, ::1] xdbl not None,    # IN  (B,T,2N+R) [Bt | Ct | draw]
                 const float[::1] D_skip not None,        # IN  (D,)
                 Py_ssize_t chunk,
                 int n_threads):
    """Selective scan forward: writes y (B,T,D) and the chunk-boundary states hs (B,nc,D,N)."""
    cdef Dims m = _dims("scan_forward", u, dt, dt_bias, A_log, xdbl, D_skip, chunk, n_threads)
    check_shape3("scan_forward", "y", y, m.B, m.T, m.D)
    _check_hs("scan_forward", hs, m)
    if m.B * m.T * m.D == 0:
        return
    m.db = _block(m.B, m.D, n_threads)
    cdef Py_ssize_t n_items = m.B * ((m.D + m.db - 1) // m.db)
    cdef int nt = n_threads if n_threads < n_items else <int>n_items
    cdef Py_ssize_t scr_size = 2 * m.db * m.N + 3 * m.db
    cdef float* scratch = <float*>malloc(nt * scr_size * sizeof(float))
    if scratch == NULL:
        raise MemoryError("scan_forward: thread scratch")
    try:
        with nogil:
            _scan_fwd(&y[0, 0, 0], &hs[0, 0, 0, 0], &u[0, 0, 0], &dt[0, 0, 0], &dt_bias[0],
                      &A_log[0, 0], &xdbl[0, 0, 0], &D_skip[0], m, scratch, scr_size, nt)
    finally:
        free(scratch)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

cdef inline void _bwd_lanes8(rf g, rf pB, rf pC, rf sB, rf sA, double* dA, rcf Ct, rcf Bt,
                             rcf hcur, rcf hprev, rcf Ek, rcf A, float dyv, float delta,
                             float delta_u, Py_ssize_t nl) noexcept nogil:
    """nl <= 8 consecutive state indices of one backward step (lane l = n mod 8); restrict and
    a constant lane count let gcc keep the lane sums in one vector register."""
    cdef Py_ssize_t l
    cdef float gl, ql
    for l in range(nl):
        gl = fmaf(dyv, Ct[l], g[l])                 # g += dy*Ct            (dL/dh_t)
        pC[l] = fmaf(dyv, hcur[l], pC[l])           # dCt += dy*h_t
        pB[l] = fmaf(gl, delta_u, pB[l])            # dBt += g*delta*u
        ql = gl * Ek[l] * hprev[l]                  # q = g*E*h_{t-1}
        dA[l] += <double>(delta * ql)               # dA += delta*q
        sB[l] = fmaf(gl, Bt[l], sB[l])              # gB lanes
        sA[l] = fmaf(A[l], ql, sA[l])               # gAq lanes
        g[l] = gl * Ek[l]                           # g <- dL/dh_{t-1}


cdef inline void _bwd_state_pass(float* g, float* pB, float* pC, float* sB, float* sA, double* dA,
                                 const float* Ct, const float* Bt, const float* hcur,
                                 const float* hprev, const float* Ek, const float* A, float dyv,
                                 float delta, float delta_u, Py_ssize_t N) noexcept nogil:
    """Every state index of one backward step, in blocks of 8 (the last one may be shorter);
    leaves the 8 lane sums of g*Bt in sB and of A*q in sA."""
    cdef Py_ssize_t n0, l
    for l in range(8):
        sB[l] = 0
        sA[l] = 0
    n0 = 0
    while n0 + 8 <= N:
        _bwd_lanes8(g + n0, pB + n0, pC + n0, sB, sA, dA + n0, Ct + n0, Bt + n0, hcur + n0,
                    hprev + n0, Ek + n0, A + n0, dyv, delta, delta_u, 8)
        n0 += 8
    if n0 < N:
        _bwd_lanes8(g + n0, pB + n0, pC + n0, sB, sA, dA + n0, Ct + n0, Bt + n0, hcur + n0,
                    hprev + n0, Ek + n0, A + n0, dyv, delta, delta_u, N - n0)


cdef inline void _scan_bwd_item(float* du, float* ddt, float* ddt_bias, float* dA_log,
                                float* dBC, float* dD_skip, const float* dy, const float* u,
                                const float* dt, const float* dt_bias, const float* A_log,
                                const float* xdbl, const float* D_skip, const float* hs, Dims m,
                                Py_ssize_t d0, Py_ssize_t d1, float* scr,
                                double* dacc) noexcept nogil:
    """Channels [d0,d1), every b, t = T-1..0.
    du, ddt, dy, u, dt: (B*T*D); xdbl: (B*T*W); hs: (B*n_chunks*D*N); dA_log, A_log: (D*N);
    ddt_bias, dD_skip, dt_bias, D_skip: (D).
    dBC: this thread's (B*T*2N) partial of dxdbl[..., :2N].
    scr (thread-private floats): A (DB,N) | g (DB,N) | H (L+1,N) | E (L,N) | q (N) | delta (L)
    dacc (thread-private doubles): dA (DB,N) | dD_skip (DB) | ddt_bias (DB)."""
    cdef Py_ssize_t N = m.N, D = m.D, T = m.T, nb = d1 - d0
    cdef float* A = scr
    cdef float* g_all = scr + m.db * N
    cdef float* H = scr + 2 * m.db * N             # H[k] = h_{t0+k-1}, k = 0..L
    cdef float* E = H + (m.L + 1) * N              # E[k] = expf(delta_{t0+k} * A)
    cdef float* q = E + m.L * N
    cdef float* dlt = q + N                        # dlt[k] = delta_{t0+k}
    cdef double* dA_acc = dacc
    cdef double* dD_acc = dacc + m.db * N
    cdef double* dbias_acc = dD_acc + m.db
    cdef Py_ssize_t b, c, t0, t1, L, j, k, n, d, row, i
    cdef float* g
    cdef const float* Aj
    cdef const float* Bt
    cdef const float* Ct
    cdef const float* hcur
    cdef const float* hprev
    cdef const float* Ek
    cdef float* pB
    cdef float* pC
    cdef float delta, uu, dyv, delta_u, gB, gAq, ddelta, dtv
    cdef float sB[8]
    cdef float sA[8]
    for i in range(nb * N):
        A[i] = -expf(A_log[d0 * N + i])
        dA_acc[i] = 0
    for j in range(nb):
        dD_acc[j] = 0
        dbias_acc[j] = 0
    for b in range(m.B):
        # carry g = dL/dh, zero after the last step
        for i in range(nb * N):
            g_all[i] = 0
        for c in range(m.n_chunks - 1, -1, -1):
            t0 = c * m.chunk
            t1 = t0 + m.chunk if t0 + m.chunk < T else T
            L = t1 - t0
            for j in range(nb):
                d = d0 + j
                Aj = A + j * N
                g = g_all + j * N
                # recompute h_t, t in [t0,t1), from hs[b,c,d,:] (same step as the forward)
                memcpy(H, hs + ((b * m.n_chunks + c) * D + d) * N, N * sizeof(float))
                for k in range(L):
                    row = b * T + t0 + k
                    delta = _softplus(dt[row * D + d] + dt_bias[d])
                    dlt[k] = delta
                    _ssm_step(H + (k + 1) * N, H + k * N, E + k * N, Aj, xdbl + row * m.W,
                              delta, delta * u[row * D + d], N)
                # backwards through the chunk, carry g = dL/dh_t
                for k in range(L - 1, -1, -1):
                    row = b * T + t0 + k
                    delta = dlt[k]
                    uu = u[row * D + d]
                    dyv = dy[row * D + d]
                    Bt = xdbl + row * m.W
                    Ct = Bt + N
                    hcur = H + (k + 1) * N
                    hprev = H + k * N
                    Ek = E + k * N
                    pB = dBC + row * 2 * N
                    pC = pB + N
                    delta_u = delta * uu
                    # one fused pass over n (see _bwd_state_pass); gB = sum_n g*Bt, gAq = sum_n A*q
                    # are summed in 8 lanes (n mod 8), then the lanes in a fixed tree
                    _bwd_state_pass(g, pB, pC, sB, sA, dA_acc + j * N, Ct, Bt, hcur, hprev, Ek, Aj,
                                    dyv, delta, delta_u, N)
                    gB = ((sB[0] + sB[4]) + (sB[1] + sB[5])) + ((sB[2] + sB[6]) + (sB[3] + sB[7]))
                    gAq = ((sA[0] + sA[4]) + (sA[1] + sA[5])) + ((sA[2] + sA[6]) + (sA[3] + sA[7]))
                    # du_t += dy*D_skip + delta*gB ;  ddelta = sum A*q + u*gB
                    du[row * D + d] += dyv * D_skip[d] + delta * gB
                    ddelta = gAq + uu * gB
                    # ddt = ddelta * softplus'(dt+dt_bias) = ddelta * sigmoid(dt+dt_bias)
                    dtv = ddelta * sigmoidf(dt[row * D + d] + dt_bias[d])
                    ddt[row * D + d] += dtv
                    dbias_acc[j] += dtv
                    dD_acc[j] += <double>(dyv * uu)
    for j in range(nb):
        d = d0 + j
        # dA_log = dA * dA/dA_log = dA * A
        for n in range(N):
            dA_log[d * N + n] += <float>(dA_acc[j * N + n] * A[j * N + n])
        dD_skip[d] += <float>dD_acc[j]
        ddt_bias[d] += <float>dbias_acc[j]


cdef inline void _reduce_row(float* dxdbl, const float* part, Py_ssize_t r, Py_ssize_t W,
                             Py_ssize_t N2, Py_ssize_t stride, int nt) noexcept nogil:
    """dxdbl[r, :2N] += sum_{tid=0..nt-1} part[tid, r, :] (fixed order)."""
    cdef Py_ssize_t n
    cdef int tid
    cdef float s
    for n in range(N2):
        s = 0
        for tid in range(nt):
            s = s + part[tid * stride + r * N2 + n]
        dxdbl[r * W + n] += s


cdef void _scan_bwd(float* du, float* ddt, float* ddt_bias, float* dA_log, float* dxdbl,
                    float* dD_skip, const float* dy, const float* u, const float* dt,
                    const float* dt_bias, const float* A_log, const float* xdbl,
                    const float* D_skip, const float* hs, Dims m, float* scratch,
                    Py_ssize_t scr_size, double* dscratch, Py_ssize_t dscr_size, float* part,
                    int n_threads) noexcept nogil:
    """part: (n_threads, B*T*2N) zeroed partials of dxdbl[..., :2N]."""
    cdef Py_ssize_t n_blocks = (m.D + m.db - 1) // m.db
    cdef Py_ssize_t stride = m.B * m.T * 2 * m.N
    cdef Py_ssize_t i, d0, d1, r
    cdef int tid
    for i in prange(n_blocks, schedule='static', num_threads=n_threads):
        tid = omp_thread_id()
        d0 = i * m.db
        d1 = d0 + m.db if d0 + m.db < m.D else m.D
        _scan_bwd_item(du, ddt, ddt_bias, dA_log, part + tid * stride, dD_skip, dy, u, dt,
                       dt_bias, A_log, xdbl, D_skip, hs, m, d0, d1,
                       scratch + tid * scr_size, dscratch + tid * dscr_size)
    # dxdbl[..., :2N] += partials, summed over threads in order 0..nt-1
    for r in prange(m.B * m.T, schedule='static', num_threads=n_threads):
        _reduce_row(dxdbl, part, r, m.W, 2 * m.N, stride, n_threads)


def scan_backward(float[:, :, ::1] du not None,            # OUT += (B,T,D)
                  float[:, :, ::1] ddt not None,           # OUT += (B,T,D) dL/d(pre-bias dt)
                  float[::1] ddt_bias not None,            # OUT += (D,)
                  float[:, ::1] dA_log not None,           # OUT += (D,N)
                  float[:, :, ::1] dxdbl not None,         # OUT += (B,T,2N+R), only [:, :, :2N]
                  float[::1] dD_skip not None,             # OUT += (D,)
                  const float[:, :, ::1] dy not None,      # IN  (B,T,D) dL/dy
                  const float[:, :, ::1] u not None,       # IN  (B,T,D)
                  const float[:, :, ::1] dt not None,      # IN  (B,T,D)
                  const float[::1] dt_bias not None,       # IN  (D,)
                  const float[:, ::1] A_log not None,      # IN  (D,N)
                  const float[:, :, ::1] xdbl not None,    # IN  (B,T,2N+R)
                  const float[::1] D_skip not None,        # IN  (D,)
                  const float[:, :, :, ::1] hs not None,   # IN  (B,ceil(T/chunk),D,N) from scan_forward
                  Py_ssize_t chunk,
                  int n_threads):
    """Selective scan backward; ACCUMULATES into du, ddt, ddt_bias, dA_log, dxdbl[..., :2N],
    dD_skip. hs must come from scan_forward with the same chunk."""
    cdef Dims m = _dims("scan_backward", u, dt, dt_bias, A_log, xdbl, D_skip, chunk, n_threads)
    check_shape3("scan_backward", "du", du, m.B, m.T, m.D)
    check_shape3("scan_backward", "ddt", ddt, m.B, m.T, m.D)
    check_shape3("scan_backward", "dy", dy, m.B, m.T, m.D)
    check_shape1("scan_backward", "ddt_bias", ddt_bias, m.D)
    check_shape1("scan_backward", "dD_skip", dD_skip, m.D)
    if dA_log.shape[0] != m.D or dA_log.shape[1] != m.N:
        raise ValueError(f"scan_backward: dA_log has shape {(dA_log.shape[0], dA_log.shape[1])}, "
                         f"expected (D, N) = {(m.D, m.N)}")
    if dxdbl.shape[0] != m.B or dxdbl.shape[1] != m.T or dxdbl.shape[2] != m.W:
        raise ValueError(f"scan_backward: dxdbl has shape "
                         f"{(dxdbl.shape[0], dxdbl.shape[1], dxdbl.shape[2])}, expected the shape "
                         f"of xdbl {(m.B, m.T, m.W)}")
    _check_hs("scan_backward", hs, m)
    if m.B * m.T * m.D == 0:
        return
    m.db = _block(1, m.D, n_threads)
    m.L = m.chunk if m.chunk < m.T else m.T
    cdef Py_ssize_t n_blocks = (m.D + m.db - 1) // m.db
    cdef int nt = n_threads if n_threads < n_blocks else <int>n_blocks
    cdef Py_ssize_t scr_size = 2 * m.db * m.N + (2 * m.L + 2) * m.N + m.L
    cdef Py_ssize_t dscr_size = m.db * m.N + 2 * m.db
    cdef float* scratch = <float*>malloc(nt * scr_size * sizeof(float))
    cdef double* dscratch = <double*>malloc(nt * dscr_size * sizeof(double))
    cdef float* part = <float*>calloc(nt * m.B * m.T * 2 * m.N, sizeof(float))
    try:
        if scratch == NULL or dscratch == NULL or part == NULL:
            raise MemoryError("scan_backward: thread scratch")
        with nogil:
            _scan_bwd(&du[0, 0, 0], &ddt[0, 0, 0], &ddt_bias[0], &dA_log[0, 0], &dxdbl[0, 0, 0],
                      &dD_skip[0], &dy[0, 0, 0], &u[0, 0, 0], &dt[0, 0, 0], &dt_bias[0],
                      &A_log[0, 0], &xdbl[0, 0, 0], &D_skip[0], &hs[0, 0, 0, 0], m,
                      scratch, scr_size, dscratch, dscr_size, part, nt)
    finally:
        free(scratch)
        free(dscratch)
        free(part)


# ----------------------------------------------------------------------------------------------
# shapes and work split (Python level, once per call)
# ----------------------------------------------------------------------------------------------

cdef Py_ssize_t _block(Py_ssize_t B, Py_ssize_t D, int n_threads):
    """Channels per work item: DB_MAX, halved while there are < 4 items per thread."""
    cdef Py_ssize_t db = DB_MAX
    while db > 1 and B * ((D + db - 1) // db) < 4 * n_threads:
        db //= 2
    return db


cdef Dims _dims(str fn, const float[:, :, ::1] u, const float[:, :, ::1] dt,
                const float[::1] dt_bias, const float[:, ::1] A_log,
                const float[:, :, ::1] xdbl, const float[::1] D_skip, Py_ssize_t chunk,
                int n_threads):
    cdef Dims m
    m.B = u.shape[0]
    m.T = u.shape[1]
    m.D = u.shape[2]
    m.N = A_log.shape[1]
    m.W = xdbl.shape[2]
    if chunk < 1:
        raise ValueError(f"{fn}: chunk must be >= 1, got {chunk}")
    if n_threads < 1:
        raise ValueError(f"{fn}: n_threads must be >= 1, got {n_threads}")
    m.chunk = chunk
    m.n_chunks = (m.T + chunk - 1) // chunk
    m.db = 1
    m.L = 1
    check_shape3(fn, "dt", dt, m.B, m.T, m.D)
    check_shape1(fn, "dt_bias", dt_bias, m.D)
    check_shape1(fn, "D_skip", D_skip, m.D)
    if A_log.shape[0] != m.D or m.N < 1:
        raise ValueError(f"{fn}: A_log has shape {(A_log.shape[0], A_log.shape[1])}, "
                         f"expected (D, N) = ({m.D}, N>=1) for u of shape {(m.B, m.T, m.D)}")
    if xdbl.shape[0] != m.B or xdbl.shape[1] != m.T or m.W < 2 * m.N:
        raise ValueError(f"{fn}: xdbl has shape {(xdbl.shape[0], xdbl.shape[1], m.W)}, "
                         f"expected (B, T, >= 2N) = ({m.B}, {m.T}, >= {2 * m.N})")
    return m


cdef _check_hs(str fn, const float[:, :, :, ::1] hs, Dims m):
    if (hs.shape[0] != m.B or hs.shape[1] != m.n_chunks or hs.shape[2] != m.D
            or hs.shape[3] != m.N):
        raise ValueError(f"{fn}: hs has shape "
                         f"{(hs.shape[0], hs.shape[1], hs.shape[2], hs.shape[3])}, expected "
                         f"(B, ceil(T/chunk), D, N) = {(m.B, m.n_chunks, m.D, m.N)}")


