"""Fused discretisation + selective scan + C readout + D skip (the middle of a layer), forward and backward.

Notation (docs/architecture.md): B batch, T time, D channels (d_model), N state size (d_state), R dt rank.
`xdbl` (B,T,2N+R) is the x_proj output [Bt | Ct | draw]; the scan reads columns [0,2N) only.

Recurrence (per b, d; n = 0..N-1)
    delta_t[d] = softplus(dt[b,t,d] + dt_bias[d]),  softplus(x) = x if x > 20 else log1p(exp(x))
                 (rt_softplusf, relative error <= 4e-7)
    A[d,n]     = -expf(A_log[d,n])
    h_{-1}     = 0
    h_t[d,n]   = expf(delta_t[d]*A[d,n]) * h_{t-1}[d,n] + delta_t[d]*u_t[d]*Bt_t[n]
    y_t[d]     = sum_n h_t[d,n]*Ct_t[n] + D_skip[d]*u_t[d]

What forward saves
    hs (B, n_chunks, D, N), n_chunks = ceil(T/chunk): the state h BEFORE step t = c*chunk
    (hs[:,0] = 0). Activation memory is B*T*D*N/chunk, never the full trajectory.

What backward recomputes
    Chunks are walked in reverse. For chunk c and one block of DB channels, h_t (t in the chunk)
    is recomputed from hs[b,c,block] into thread-private scratch H ((chunk+1)*N*DB floats, plus
    expf(delta*A) in chunk*N*DB floats), with exactly the operations of the forward, so the
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

Layout and vectorisation
    A work item is a block of DB channels, DB = the build target's vector width in floats (16 with
    AVX-512, 8 with AVX2; halved for small D). Its state is kept channel-minor, h[n*DB + j], so
    every inner loop runs over the block's channels: the exps, the updates, softplus and sigmoid
    vectorise across channels, and the sums over n (the readout, sum g*Bt, sum A*q) are DB
    independent running sums, each over n = 0..N-1 in order. Every channel is one lane that runs
    the same scalar sequence of operations whatever DB is (explicit fmaf, no reassociation).
    The per-row inputs of a group of rows are read in one pass before the recurrence (one cache
    line per row and block; the CPU overlaps independent loads, and the next rows are prefetched
    while the recurrence runs).

Parallel dimension (T is sequential)
    forward   prange over (b, channel block): each item owns y[b,:,block] and hs[b,:,block,:].
    backward  for each b and each chunk (reversed), a prange over channel blocks. A block owns its
              du/ddt columns and its rows of dA_log, dD_skip, ddt_bias (float64 accumulators that
              persist between the passes; dA is summed over a chunk's steps in float32 first, in
              reverse time order, then added), and its carry g. dBt/dCt sum
              over d: each thread adds into its own (chunk, 2N, DB) lane partials; after each pass
              a prange over the chunk's rows reduces them, threads in order 0..nt-1, then the DB
              lanes by halving (fixed order, no atomics), and zeroes them.
    Scratch per thread: backward ((2*L+2)*N + 7*L + 2)*DB floats plus L*2N*DB floats of lane
    partials (L = min(chunk,T)), per block 2*N*DB floats and (N+2)*DB doubles; forward
    (2*N + 4*32)*DB floats. Nothing of size B*T*D*N is ever allocated.

Determinism
    Fixed thread count + schedule='static' -> bitwise identical results. y and hs do not depend on
    n_threads or chunk at all (per-channel work in a fixed order); du, ddt, dA_log, dD_skip and
    ddt_bias neither; dBt/dCt depend on n_threads only through the order of the partial sums.
    With OpenMP disabled every iteration runs on "thread 0".

All arrays are float32 and C-contiguous; shapes are checked once in the `def` wrappers.
"""
from cython.parallel cimport prange
from libc.math cimport expf, fmaf
from _common cimport LANES, prefetch, rcf, rf, rt_expf_fast_le88, rt_softplusf
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from _omp cimport omp_thread_id
from _common cimport check_shape1, check_shape3, check_threads, sigmoidf


cdef enum:
    # channels per work item: one vector register of the build target (16 floats with AVX-512,
    # 8 with AVX2); shrunk for small D. Numerically irrelevant: every channel is one lane that
    # runs the same scalar sequence of operations whatever the block width.
    DB_MAX = LANES
    TROWS = 32          # rows per input pass of the forward


ctypedef struct Dims:
    Py_ssize_t B, T, D, N, W, chunk, n_chunks, db, L


cdef inline float _softplus(float x) noexcept nogil:
    # softplus(x) = x above 20, else log1p(exp(x)); branch-free so the loops over a block's
    # channels vectorise (relative error <= 4e-7, kernels/_common.pxd)
    return rt_softplusf(x)


cdef inline float _ssm_update(float h_prev, float delta, float A, float delta_u, float Bn) noexcept nogil:
    """h_t = exp(delta*A) * h_{t-1} + delta*u*Bt for one (channel, state) element. Forward and the
    backward's recompute both go through it (or _ssm_step, which inlines the same two
    operations), so they produce the same bits."""
    return fmaf(rt_expf_fast_le88(delta * A), h_prev, delta_u * Bn)


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


cdef inline void _fwd_step_full(Py_ssize_t N, rf h, rcf A, rcf dl, rcf dlu, rcf Bt,
                                rf acc_out) noexcept nogil:
    """Every state index of one step for a full block (DB_MAX channels): the operations of
    _fwd_lanes in the same order (so the same bits), with the readout's running sums in a local
    array (registers) instead of memory, and delta, delta*u loaded once per step."""
    cdef float acc[DB_MAX]
    cdef Py_ssize_t n, j, o
    cdef float Bn, Cn
    for j in range(DB_MAX):
        acc[j] = acc_out[j]
    for n in range(N):
        Bn = Bt[n]
        Cn = Bt[N + n]
        o = n * DB_MAX
        for j in range(DB_MAX):
            h[o + j] = _ssm_update(h[o + j], dl[j], A[o + j], dlu[j], Bn)
            acc[j] = fmaf(h[o + j], Cn, acc[j])
    for j in range(DB_MAX):
        acc_out[j] = acc[j]


cdef inline void _fwd_delta(Py_ssize_t nl, rf dl, rf dlu, rf uu, rf acc, rcf dt, rcf dt_bias,
                            rcf u) noexcept nogil:
    """delta = softplus(dt + dt_bias), delta*u, u and acc = 0 for nl channels."""
    cdef Py_ssize_t j
    for j in range(nl):
        dl[j] = _softplus(dt[j] + dt_bias[j])
        uu[j] = u[j]
        dlu[j] = dl[j] * u[j]
        acc[j] = 0


cdef inline void _fwd_out(Py_ssize_t nl, rf y, rcf D_skip, rcf uu, rcf acc) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(nl):
        y[j] = fmaf(D_skip[j], uu[j], acc[j])


cdef inline void _scan_fwd_item(float* y, float* hs, const float* u, const float* dt,
                                const float* dt_bias, const float* A_log, const float* xdbl,
                                const float* D_skip, Dims m, Py_ssize_t b, Py_ssize_t d0,
                                Py_ssize_t d1, float* scr) noexcept nogil:
    """Batch b, channels [d0,d1), all t.
    y, u, dt: (B*T*D); hs: (B*n_chunks*D*N); xdbl: (B*T*W); A_log: (D*N); dt_bias, D_skip: (D).
    scr (thread-private): h (N,DB) | A (N,DB) | delta, delta*u, u, acc (TROWS,DB).
    The state is kept channel-minor, h[n*DB + j], so every inner loop runs over the nb channels
    of the block: the exp and the update vectorise across channels, and the readout
    sum_n h*Ct is nb independent running sums, each over n in order (no serial dependency
    chain across n for the CPU to wait on, and the same order for every channel).
    Rows go in groups of TROWS: first every input of the group is read (independent loads of
    one cache line per row, which the CPU overlaps), then the recurrence runs on scratch, then
    y is written; read inside the recurrence, the strided rows stalled it."""
    cdef Py_ssize_t N = m.N, D = m.D, DB = m.db, nb = d1 - d0
    cdef float* h = scr
    cdef float* A = scr + DB * N
    cdef float* dl = scr + 2 * DB * N
    cdef float* dlu = dl + TROWS * DB
    cdef float* uu = dlu + TROWS * DB
    cdef float* acc = uu + TROWS * DB
    cdef Py_ssize_t j, n, t, t0, tl, k, row, pf_row, pf_d, pf_n
    cdef const float* Bt
    cdef const float* Ct
    cdef float* hs_c
    # A = -exp(A_log);  h_{-1} = 0
    for n in range(N):
        for j in range(nb):
            A[n * DB + j] = -expf(A_log[(d0 + j) * N + n])
            h[n * DB + j] = 0
    t0 = 0
    while t0 < m.T:
        tl = TROWS if t0 + TROWS <= m.T else m.T - t0
        # delta = softplus(dt + dt_bias), delta*u
        for k in range(tl):
            row = b * m.T + t0 + k
            _fwd_delta(nb, dl + k * DB, dlu + k * DB, uu + k * DB, acc + k * DB,
                       dt + row * D + d0, dt_bias + d0, u + row * D + d0)
        # the rows of the next group (or of the next block's first group) are fetched while
        # this group's recurrence runs
        if t0 + tl < m.T:
            pf_row = b * m.T + t0 + tl
            pf_d = d0
            pf_n = m.T - t0 - tl
        else:
            pf_row = b * m.T
            pf_d = d1
            pf_n = m.T if d1 < D else 0
        if pf_n > TROWS:
            pf_n = TROWS
        for k in range(tl):
            t = t0 + k
            row = b * m.T + t
            if k < pf_n:
                prefetch(dt + (pf_row + k) * D + pf_d, DB)
                prefetch(u + (pf_row + k) * D + pf_d, DB)
            Bt = xdbl + row * m.W
            Ct = Bt + N
            if t % m.chunk == 0:
                # hs[b, c, d0+j, n] = h[n, j] (state before step t = c*chunk)
                hs_c = hs + ((b * m.n_chunks + t // m.chunk) * D + d0) * N
                for j in range(nb):
                    for n in range(N):
                        hs_c[j * N + n] = h[n * DB + j]
            # h_t[n] = exp(delta*A[n]) * h_{t-1}[n] + delta*u*Bt[n] ;  acc += h_t[n]*Ct[n]
            if nb == DB_MAX:   # the common case: a constant trip count, one vector register
                _fwd_step_full(N, h, A, dl + k * DB, dlu + k * DB, Bt, acc + k * DB)
            else:
                for n in range(N):
                    _fwd_lanes(nb, h + n * DB, acc + k * DB, A + n * DB, dl + k * DB,
                               dlu + k * DB, Bt[n], Ct[n])
        # y_t = sum_n h_t*Ct_t + D_skip*u_t
        for k in range(tl):
            row = b * m.T + t0 + k
            _fwd_out(nb, y + row * D + d0, D_skip + d0, uu + k * DB, acc + k * DB)
        t0 += tl


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
    cdef Py_ssize_t scr_size = 2 * m.db * m.N + 4 * TROWS * m.db
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

cdef inline void _bwd_lanes(Py_ssize_t nl, rf g, rf pB, rf pC, rf sB, rf sA, rf dA,
                            rcf hcur, rcf hprev, rcf Ek, rcf A, rcf dyv, rcf dl, rcf dlu,
                            float Cn, float Bn) noexcept nogil:
    """One state index n of one backward step for the nl channels of a block (lane j = channel
    d0 + j; restrict: gcc vectorises across channels). Per channel the same operations in the
    same order whatever nl: g += dy*Ct; dCt, dBt lane partials; q = g*E*h_{t-1}; dA += delta*q;
    the running sums over n of g*Bt (sB) and A*q (sA); g <- g*E (dL/dh_{t-1})."""
    cdef Py_ssize_t j
    cdef float gl, ql
    for j in range(nl):
        gl = fmaf(dyv[j], Cn, g[j])
        pC[j] = fmaf(dyv[j], hcur[j], pC[j])
        pB[j] = fmaf(gl, dlu[j], pB[j])
        ql = gl * Ek[j] * hprev[j]
        dA[j] = fmaf(dl[j], ql, dA[j])
        sB[j] = fmaf(gl, Bn, sB[j])
        sA[j] = fmaf(A[j], ql, sA[j])
        g[j] = gl * Ek[j]


cdef inline void _bwd_step_full(Py_ssize_t N, rf g, rf pB, rf pC, rf dA, rcf Hk1, rcf Hk,
                                rcf Ek, rcf A, rcf dyv, rcf dl, rcf dlu, rcf Bt, rf sBo,
                                rf sAo) noexcept nogil:
    """Every state index of one backward step for a full block (DB_MAX channels): the
    operations of _bwd_lanes in the same order, with the running sums over n in local arrays
    (registers) instead of memory shared with the other pointers."""
    cdef float sB[DB_MAX]
    cdef float sA[DB_MAX]
    cdef Py_ssize_t n, j, o
    cdef float gl, ql, Bn, Cn
    for j in range(DB_MAX):
        sB[j] = 0
        sA[j] = 0
    for n in range(N):
        Bn = Bt[n]
        Cn = Bt[N + n]
        o = n * DB_MAX
        for j in range(DB_MAX):
            gl = fmaf(dyv[j], Cn, g[o + j])
            pC[o + j] = fmaf(dyv[j], Hk1[o + j], pC[o + j])
            pB[o + j] = fmaf(gl, dlu[j], pB[o + j])
            ql = gl * Ek[o + j] * Hk[o + j]
            dA[o + j] = fmaf(dl[j], ql, dA[o + j])
            sB[j] = fmaf(gl, Bn, sB[j])
            sA[j] = fmaf(A[o + j], ql, sA[j])
            g[o + j] = gl * Ek[o + j]
    for j in range(DB_MAX):
        sBo[j] = sB[j]
        sAo[j] = sA[j]


cdef inline void _bwd_chan(Py_ssize_t nl, rf du, rf ddt, double* dbias, double* dDs, rcf dyv,
                           rcf uu, rcf dl, rcf x, rcf sB, rcf sA, rcf D_skip) noexcept nogil:
    """The per-channel tail of one backward step: du = dy*D_skip + delta*gB;
    ddelta = gAq + u*gB; ddt = ddelta*sigmoid(dt + dt_bias) (also above the softplus threshold)."""
    cdef Py_ssize_t j
    cdef float dtv
    for j in range(nl):
        du[j] = fmaf(dl[j], sB[j], dyv[j] * D_skip[j])
        dtv = fmaf(uu[j], sB[j], sA[j]) * sigmoidf(x[j])
        ddt[j] = dtv
        dbias[j] += dtv
        dDs[j] += <double>(dyv[j] * uu[j])


cdef inline void _scan_bwd_item(float* du, float* ddt, const float* dy, const float* u,
                                const float* dt, const float* dt_bias, const float* xdbl,
                                const float* D_skip, const float* hs, Dims m, Py_ssize_t b,
                                Py_ssize_t c, Py_ssize_t d0, Py_ssize_t d1, const float* A,
                                float* g, double* dA_acc, double* dD_acc, double* dbias_acc,
                                float* part, float* scr) noexcept nogil:
    """Batch b, chunk c, channels [d0,d1) of one block (block-owned state persists between the
    chunks: A, g, dA_acc (N,DB) and dD_acc, dbias_acc (DB), channel-minor, index n*DB + j).
    du, ddt, dy, u, dt: (B*T*D); xdbl: (B*T*W); hs: (B*n_chunks*D*N).
    part: this thread's (L, 2N, DB) lane partials of dxdbl[rows of the chunk, :2N].
    scr (thread-private): H (L+1,N,DB) | E (L,N,DB) | delta, delta*u, dt+dt_bias, dy, u,
    du and ddt contributions (L,DB) | sB, sA (DB) | the chunk's dA (N,DB)."""
    cdef Py_ssize_t N = m.N, D = m.D, T = m.T, DB = m.db, nb = d1 - d0
    cdef Py_ssize_t t0 = c * m.chunk
    cdef Py_ssize_t L = m.chunk if t0 + m.chunk <= T else T - t0
    cdef float* H = scr                            # H[k] = h_{t0+k-1}, k = 0..L
    cdef float* E = H + (m.L + 1) * N * DB         # E[k] = expf(delta_{t0+k} * A)
    cdef float* dl = E + m.L * N * DB
    cdef float* dlu = dl + m.L * DB
    cdef float* xs = dlu + m.L * DB
    cdef float* dyv = xs + m.L * DB
    cdef float* uu = dyv + m.L * DB
    cdef float* dus = uu + m.L * DB
    cdef float* ddts = dus + m.L * DB
    cdef float* sB = ddts + m.L * DB
    cdef float* sA = sB + DB
    cdef float* dAc = sA + DB                      # this chunk's dA, summed over its steps
    cdef Py_ssize_t j, k, n, row
    cdef const float* Bt
    cdef const float* hs_c
    cdef float* pk
    # H[0] = hs[b, c, d0+j, n], transposed to channel-minor
    hs_c = hs + ((b * m.n_chunks + c) * D + d0) * N
    for j in range(nb):
        for n in range(N):
            H[n * DB + j] = hs_c[j * N + n]
    # recompute h_t, t in [t0, t0+L), with exactly the forward's operations
    # every per-row input of the chunk first (independent loads, see _scan_fwd_item)
    for k in range(L):
        row = b * T + t0 + k
        _delta_lanes(nb, dl + k * DB, dlu + k * DB, xs + k * DB, dyv + k * DB, uu + k * DB,
                     dt + row * D + d0, dt_bias + d0, u + row * D + d0, dy + row * D + d0)
    for k in range(L):
        row = b * T + t0 + k
        Bt = xdbl + row * m.W
        if nb == DB_MAX:
            for n in range(N):
                _rec_lanes(DB_MAX, H + ((k + 1) * N + n) * DB, H + (k * N + n) * DB,
                           E + (k * N + n) * DB, A + n * DB, dl + k * DB, dlu + k * DB, Bt[n])
        else:
            for n in range(N):
                _rec_lanes(nb, H + ((k + 1) * N + n) * DB, H + (k * N + n) * DB,
                           E + (k * N + n) * DB, A + n * DB, dl + k * DB, dlu + k * DB, Bt[n])
    # backwards through the chunk, carry g = dL/dh_t
    memset(dAc, 0, N * DB * sizeof(float))
    for k in range(L - 1, -1, -1):
        row = b * T + t0 + k
        if d1 < D:
            # the next block's rows of this chunk (the same thread's next item, mostly)
            prefetch(dt + row * D + d1, DB)
            prefetch(u + row * D + d1, DB)
            prefetch(dy + row * D + d1, DB)
            prefetch(du + row * D + d1, DB)
            prefetch(ddt + row * D + d1, DB)
        Bt = xdbl + row * m.W
        pk = part + k * 2 * N * DB
        if nb == DB_MAX:
            _bwd_step_full(N, g, pk, pk + N * DB, dAc, H + (k + 1) * N * DB, H + k * N * DB,
                           E + k * N * DB, A, dyv + k * DB, dl + k * DB, dlu + k * DB, Bt,
                           sB, sA)
        else:
            for j in range(nb):
                sB[j] = 0
                sA[j] = 0
            for n in range(N):
                _bwd_lanes(nb, g + n * DB, pk + n * DB, pk + (N + n) * DB, sB, sA,
                           dAc + n * DB, H + ((k + 1) * N + n) * DB, H + (k * N + n) * DB,
                           E + (k * N + n) * DB, A + n * DB, dyv + k * DB, dl + k * DB, dlu + k * DB,
                           Bt[N + n], Bt[n])
        _bwd_chan(nb, dus + k * DB, ddts + k * DB, dbias_acc, dD_acc, dyv + k * DB,
                  uu + k * DB, dl + k * DB, xs + k * DB, sB, sA, D_skip + d0)
    for n in range(N * DB):
        dA_acc[n] += <double>dAc[n]
    for k in range(L):
        row = b * T + t0 + k
        _add_lanes(nb, du + row * D + d0, dus + k * DB)
        _add_lanes(nb, ddt + row * D + d0, ddts + k * DB)


cdef inline void _add_lanes(Py_ssize_t nl, rf out, rcf v) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(nl):
        out[j] = out[j] + v[j]


cdef inline void _delta_lanes(Py_ssize_t nl, rf dl, rf dlu, rf xs, rf dyv, rf uu, rcf dt,
                              rcf dt_bias, rcf u, rcf dy) noexcept nogil:
    """delta = softplus(dt + dt_bias), delta*u, dt + dt_bias, dy and u for nl channels."""
    cdef Py_ssize_t j
    for j in range(nl):
        dyv[j] = dy[j]
        uu[j] = u[j]
        xs[j] = dt[j] + dt_bias[j]
        dl[j] = _softplus(dt[j] + dt_bias[j])
        dlu[j] = dl[j] * u[j]


cdef inline void _rec_lanes(Py_ssize_t nl, rf h, rcf hprev, rf Ek, rcf A, rcf dl, rcf dlu,
                            float Bn) noexcept nogil:
    """The forward's update (_ssm_update) for one state index and nl channels, keeping E."""
    cdef Py_ssize_t j
    for j in range(nl):
        Ek[j] = rt_expf_fast_le88(dl[j] * A[j])
        h[j] = fmaf(Ek[j], hprev[j], dlu[j] * Bn)


cdef inline void _reduce_rows(float* dxdbl, float* part, Py_ssize_t row0, Py_ssize_t k,
                              Py_ssize_t W, Py_ssize_t N2, Py_ssize_t DB, Py_ssize_t stride,
                              int nt) noexcept nogil:
    """dxdbl[row0+k, :2N] += the lane partials of chunk row k: summed over threads 0..nt-1 in
    order, then over the DB lanes by halving (a fixed tree); the partials are left zeroed."""
    cdef float* p0 = part + k * N2 * DB
    cdef float* pt
    cdef Py_ssize_t i, n, j, w
    cdef int tid
    for tid in range(1, nt):
        pt = p0 + tid * stride
        for i in range(N2 * DB):
            p0[i] = p0[i] + pt[i]
            pt[i] = 0
    w = DB
    while w > 1:
        w //= 2
        for n in range(N2):
            for j in range(w):
                p0[n * DB + j] = p0[n * DB + j] + p0[n * DB + j + w]
    for n in range(N2):
        dxdbl[(row0 + k) * W + n] += p0[n * DB]
    for i in range(N2 * DB):
        p0[i] = 0


cdef void _scan_bwd(float* du, float* ddt, float* ddt_bias, float* dA_log, float* dxdbl,
                    float* dD_skip, const float* dy, const float* u, const float* dt,
                    const float* dt_bias, const float* A_log, const float* xdbl,
                    const float* D_skip, const float* hs, Dims m, float* scratch,
                    Py_ssize_t scr_size, float* blk, double* dblk, float* part,
                    int n_threads) noexcept nogil:
    """blk: per block A and g, (n_blocks, 2, N, DB) floats; dblk: per block dA, dD_skip,
    ddt_bias accumulators, (n_blocks, N*DB + 2*DB) doubles; part: (n_threads, L, 2N, DB)
    zeroed lane partials of dxdbl[chunk rows, :2N].
    For each b and each chunk (in reverse) one parallel pass over the channel blocks, then one
    over the chunk's rows that reduces the partials (fixed order)."""
    cdef Py_ssize_t n_blocks = (m.D + m.db - 1) // m.db
    cdef Py_ssize_t N = m.N, DB = m.db
    cdef Py_ssize_t bsz = 2 * N * DB, dsz = N * DB + 2 * DB
    cdef Py_ssize_t stride = m.L * 2 * N * DB
    cdef Py_ssize_t i, j, n, d0, d1, b, c, k, t0, L, nbk
    cdef int tid
    cdef float* Ab
    cdef double* dacc
    memset(blk, 0, n_blocks * bsz * sizeof(float))
    memset(dblk, 0, n_blocks * dsz * sizeof(double))
    for i in range(n_blocks):
        d0 = i * DB
        nbk = DB if d0 + DB <= m.D else m.D - d0
        for j in range(nbk):
            for n in range(N):
                blk[i * bsz + n * DB + j] = -expf(A_log[(d0 + j) * N + n])
    for b in range(m.B):
        # carry g = dL/dh, zero after the last step
        for i in range(n_blocks):
            memset(blk + i * bsz + N * DB, 0, N * DB * sizeof(float))
        for c in range(m.n_chunks - 1, -1, -1):
            t0 = c * m.chunk
            L = m.chunk if t0 + m.chunk <= m.T else m.T - t0
            for i in prange(n_blocks, schedule='static', num_threads=n_threads):
                tid = omp_thread_id()
                d0 = i * DB
                d1 = d0 + DB if d0 + DB < m.D else m.D
                _scan_bwd_item(du, ddt, dy, u, dt, dt_bias, xdbl, D_skip, hs, m, b, c, d0, d1,
                               blk + i * bsz, blk + i * bsz + N * DB, dblk + i * dsz,
                               dblk + i * dsz + N * DB, dblk + i * dsz + N * DB + DB,
                               part + tid * stride, scratch + tid * scr_size)
            for k in prange(L, schedule='static', num_threads=n_threads):
                _reduce_rows(dxdbl, part, b * m.T + t0, k, m.W, 2 * N, DB, stride, n_threads)
    for i in range(n_blocks):
        d0 = i * DB
        nbk = DB if d0 + DB <= m.D else m.D - d0
        Ab = blk + i * bsz
        dacc = dblk + i * dsz
        for j in range(nbk):
            # dA_log = dA * dA/dA_log = dA * A
            for n in range(N):
                dA_log[(d0 + j) * N + n] += <float>(dacc[n * DB + j] * Ab[n * DB + j])
            dD_skip[d0 + j] += <float>dacc[N * DB + j]
            ddt_bias[d0 + j] += <float>dacc[N * DB + DB + j]


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
    cdef Py_ssize_t scr_size = ((2 * m.L + 2) * m.N + 7 * m.L + 2) * m.db
    cdef float* scratch = <float*>malloc(nt * scr_size * sizeof(float))
    cdef float* blk = <float*>malloc(n_blocks * 2 * m.N * m.db * sizeof(float))
    cdef double* dblk = <double*>malloc(n_blocks * (m.N + 2) * m.db * sizeof(double))
    cdef float* part = <float*>calloc(nt * m.L * 2 * m.N * m.db, sizeof(float))
    try:
        if scratch == NULL or blk == NULL or dblk == NULL or part == NULL:
            raise MemoryError("scan_backward: thread scratch")
        with nogil:
            _scan_bwd(&du[0, 0, 0], &ddt[0, 0, 0], &ddt_bias[0], &dA_log[0, 0], &dxdbl[0, 0, 0],
                      &dD_skip[0], &dy[0, 0, 0], &u[0, 0, 0], &dt[0, 0, 0], &dt_bias[0],
                      &A_log[0, 0], &xdbl[0, 0, 0], &D_skip[0], &hs[0, 0, 0, 0], m,
                      scratch, scr_size, blk, dblk, part, nt)
    finally:
        free(scratch)
        free(blk)
        free(dblk)
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


