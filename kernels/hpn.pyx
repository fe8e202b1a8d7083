"""Hyperspherical Prototype Network head (docs/architecture.md): loss and gradients. (Prediction, an argmax
over all V prototypes, is one BLAS matrix product in rtrainer/heads.py: 4-10x faster than a kernel.)

    ẑ_i   = z_i / max(‖z_i‖, 1e-8)                                z (n,D), n = B*T tokens
    P̃_k   = P_k / max(‖P_k‖, 1e-8)  if normalize else P_k         P (V,D) prototypes
    cos_i = ẑ_i · P̃[y_i]                                          y = targets (n) int64 in [0, V), or -1 = ignored
    loss  = (1/m) Σ_{i: y_i ≥ 0} (1 - cos_i)²                     m = number of scored tokens

Ignore index: a token whose target is -1 (IGNORE) is not scored: it adds nothing to the loss or to
any gradient, its cos_i is written as 0, and the mean is over the m scored tokens (the synthetic
tasks score only their answer positions). With m = 0 the loss is 0 and no gradient is added.

Backward of scale·loss (scale lets the trainer weight or un-average the head loss):
    c_i   = -2·scale·(1 - cos_i)/m ;  dẑ_i = c_i·P̃[y_i]       (c_i = 0 for ignored tokens)
    dz_i += (dẑ_i - (dẑ_i·ẑ_i) ẑ_i) / max(‖z_i‖, 1e-8)
    dP_k += (g_k - (g_k·P̃_k) P̃_k) / max(‖P_k‖, 1e-8)  with g_k = Σ_{i: y_i = k} c_i ẑ_i   (normalize)
    dP_k += g_k                                                                       (raw P)
Below the 1e-8 floor the max() is a constant, so its gradient has no projection term: dz_i += dẑ_i/1e-8
(likewise for P_k). At exactly 1e-8 the norm branch is taken, as torch's clamp_min does.

dP is computed without a (V,D) g buffer: the projection is linear in g_k, so each token contributes
    dP[y_i] += a_i·z_i + b_i·P[y_i],   a_i = c_i/(‖z_i‖'·‖P_k‖'),  b_i = -c_i·cos_i/‖P_k‖'²
(primes = floored norms; b_i = 0 for raw P or a floored P_k). a_i, b_i (n doubles each) are the only
scratch; cos_i there is recomputed in double from z and P rather than taken from the float32 `cos`.

Saved state: forward writes cos (n); backward needs z, P, targets and cos.
Parallel decomposition:
- forward / dz: prange over tokens (each owns its cos_i, its loss term and its dz row); the loss terms
  are then summed serially in token order, in double.
- dP: repeated targets collide, so prange over column blocks of D; inside a block tokens are visited in
  index order, so every dP element gets its additions in the same order for ANY n_threads.
Everything is bitwise identical for any n_threads. Backward accumulates (+=) into dz and dP.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport sqrt
from cython.parallel cimport prange

from _common cimport check_threads, col_block_width, dot_f64, shape_of, sumsq_f64
from _targets cimport IGNORE, check_targets as _check_targets, n_scored as _n_scored

cdef double _NORM_EPS = 1e-8



cdef _check_zP(str fn, const float[:, ::1] z, const float[:, ::1] P):
    if z.shape[1] != P.shape[1]:
        raise ValueError(f"{fn}: z has shape {shape_of(z)} and P has shape "
                         f"{shape_of(P)}; their last dimensions (D) differ")
    if P.shape[0] == 0:
        raise ValueError(f"{fn}: P has shape {shape_of(P)}; need at least one prototype")


cdef inline double _sumsq(const float* a, Py_ssize_t D) noexcept nogil:
    return sumsq_f64(a, D)        # in double, 8 fixed partial sums (_common.pxd)


cdef inline double _dot(const float* a, const float* b, Py_ssize_t D) noexcept nogil:
    return dot_f64(a, b, D)


cdef inline double _floor_norm(double nrm) noexcept nogil:
    return nrm if nrm >= _NORM_EPS else _NORM_EPS


# ----------------------------------------------------------------------------------------- forward

cdef inline double _cos_row(const float* z, const float* p, Py_ssize_t D, bint normalize) noexcept nogil:
    """cos = ẑ·P̃ for one token: z (D), p = P[y] (D)."""
    cdef double nzc = _floor_norm(sqrt(_sumsq(z, D)))
    cdef double npc = _floor_norm(sqrt(_sumsq(p, D))) if normalize else 1.0
    return _dot(z, p, D) / (nzc * npc)


cdef double _hpn_forward(float[::1] cos,                 # OUT (n)
                         const float[:, ::1] z,          # IN  (n,D)
                         const float[:, ::1] P,          # IN  (V,D)
                         const int64_t[::1] targets,     # IN  (n), in [0,V) or IGNORE (checked)
                         bint normalize,
                         double* term,                   # scratch (n): (1 - cos_i)² in double
                         int n_threads) noexcept nogil:
    cdef Py_ssize_t n = z.shape[0], D = z.shape[1], i
    cdef Py_ssize_t m = _n_scored(targets)
    cdef double c, loss = 0.0
    # cos_i = ẑ_i · P̃[y_i] ; term_i = (1 - cos_i)²   one token per iteration (0 if ignored)
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        if targets[i] == IGNORE:
            cos[i] = 0.0
            term[i] = 0.0
        else:
            c = _cos_row(&z[i, 0], &P[targets[i], 0], D, normalize)
            cos[i] = <float>c
            term[i] = (1.0 - c) * (1.0 - c)
    # loss = Σ_i term_i / m   serial, token order
    for i in range(n):
        loss += term[i]
    return loss / m if m > 0 else 0.0


def hpn_forward(float[::1] cos, const float[:, ::1] z, const float[:, ::1] P,
                const int64_t[::1] targets, bint normalize, int n_threads):
    """cos (n) OUT; z (n,D), P (V,D), targets (n) int64 IN. Returns the loss mean_i (1-cos_i)²."""
    check_threads(n_threads)
    _check_zP("hpn_forward", z, P)
    cdef Py_ssize_t n = z.shape[0]
    if n == 0:
        raise ValueError(f"hpn_forward: z has shape {shape_of(z)}; need at least one token")
    if targets.shape[0] != n:
        raise ValueError(f"hpn_forward: targets has shape ({targets.shape[0]},), expected ({n},) "
                         f"from z {shape_of(z)}")
    if cos.shape[0] != n:
        raise ValueError(f"hpn_forward: cos has shape ({cos.shape[0]},), expected ({n},) "
                         f"from z {shape_of(z)}")
    _check_targets(targets, P.shape[0])
    cdef double* term = <double*>malloc(n * sizeof(double))
    if term == NULL:
        raise MemoryError()
    cdef double loss
    try:
        with nogil:
            loss = _hpn_forward(cos, z, P, targets, normalize, term, n_threads)
    finally:
        free(term)
    return loss


# ---------------------------------------------------------------------------------------- backward

cdef inline void _dz_row(float* dz, const float* z, const float* p, Py_ssize_t D, double c,
                         bint normalize, double* a, double* b) noexcept nogil:
    """One token: dz (D) OUT +=, z (D) IN, p = P[y] (D) IN, c = -2·scale·(1-cos)/n.
    Writes the dP coefficients a (scale of z) and b (scale of p) of this token."""
    cdef Py_ssize_t j
    cdef double nz = sqrt(_sumsq(z, D))
    cdef double nzc = _floor_norm(nz)
    cdef double npn = sqrt(_sumsq(p, D)) if normalize else 1.0
    cdef double npc = _floor_norm(npn) if normalize else 1.0
    cdef double ct = _dot(z, p, D) / (nzc * npc)         # ẑ·P̃, recomputed in double
    # dẑ = c·P̃ ; dz += (dẑ - (dẑ·ẑ) ẑ)/‖z‖'   (no projection when ‖z‖ is floored)
    cdef double kp = c / (npc * nzc)                       # coefficient of p
    cdef double kz = (c * ct / (nzc * nzc)) if nz >= _NORM_EPS else 0.0   # coefficient of z
    for j in range(D):
        dz[j] += <float>(kp * p[j] - kz * z[j])
    a[0] = kp
    b[0] = (-c * ct / (npc * npc)) if (normalize and npn >= _NORM_EPS) else 0.0


cdef inline void _dP_cols(float[:, ::1] dP, const float[:, ::1] z, const float[:, ::1] P,
                          const int64_t[::1] targets, const double* a, const double* b,
                          Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """dP[y_i, j0:j1] += a_i·z[i, j0:j1] + b_i·P[y_i, j0:j1] for all tokens, in index order."""
    cdef Py_ssize_t i, j
    cdef float* dst
    cdef const float* zi
    cdef const float* pk
    cdef double ai, bi
    for i in range(z.shape[0]):
        if targets[i] == IGNORE:
            continue
        dst = &dP[targets[i], 0]
        pk = &P[targets[i], 0]
        zi = &z[i, 0]
        ai = a[i]
        bi = b[i]
        for j in range(j0, j1):
            dst[j] += <float>(ai * zi[j] + bi * pk[j])


cdef void _hpn_backward(float[:, ::1] dz,               # OUT (n,D), +=
                        float[:, ::1] dP,               # OUT (V,D), += (only if learnable)
                        const float[:, ::1] z,          # IN  (n,D)
                        const float[:, ::1] P,          # IN  (V,D)
                        const int64_t[::1] targets,     # IN  (n)
                        const float[::1] cos,           # IN  (n) from forward
                        bint normalize, bint learnable, double scale,
                        double* a, double* b,           # scratch (n) each: dP coefficients
                        int n_threads) noexcept nogil:
    cdef Py_ssize_t n = z.shape[0], D = z.shape[1], i, blk, j0, j1, width, nblk
    cdef Py_ssize_t m = _n_scored(targets)
    cdef double c
    if D == 0 or m == 0:
        return
    # c_i = -2·scale·(1-cos_i)/m ; dz_i += (dẑ_i - (dẑ_i·ẑ_i)ẑ_i)/‖z_i‖'   one token per iteration
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        if targets[i] == IGNORE:
            a[i] = 0.0
            b[i] = 0.0
        else:
            c = -2.0 * scale * (1.0 - cos[i]) / m
            _dz_row(&dz[i, 0], &z[i, 0], &P[targets[i], 0], D, c, normalize, &a[i], &b[i])
    if not learnable:
        return
    width = col_block_width(D, n_threads)
    nblk = (D + width - 1) // width
    # dP[y_i] += a_i z_i + b_i P[y_i]   block of columns per iteration, tokens in order inside
    for blk in prange(nblk, schedule='static', num_threads=n_threads, nogil=True):
        j0 = blk * width
        j1 = min(j0 + width, D)
        _dP_cols(dP, z, P, targets, a, b, j0, j1)


def hpn_backward(float[:, ::1] dz, float[:, ::1] dP, const float[:, ::1] z, const float[:, ::1] P,
                 const int64_t[::1] targets, const float[::1] cos, bint normalize, bint learnable,
                 double scale, int n_threads):
    """dz (n,D) OUT +=, dP (V,D) OUT += (only if learnable; else untouched, may be (0,D)) for
    scale·loss; z (n,D), P (V,D), targets (n), cos (n) from hpn_forward, all IN."""
    check_threads(n_threads)
    _check_zP("hpn_backward", z, P)
    cdef Py_ssize_t n = z.shape[0]
    if n == 0:
        raise ValueError(f"hpn_backward: z has shape {shape_of(z)}; need at least one token")
    if shape_of(dz) != shape_of(z):
        raise ValueError(f"hpn_backward: dz has shape {shape_of(dz)}, "
                         f"expected z's shape {shape_of(z)}")
    if learnable and shape_of(dP) != shape_of(P):
        raise ValueError(f"hpn_backward: dP has shape {shape_of(dP)}, "
                         f"expected P's shape {shape_of(P)} (learnable=True)")
    for name, m in (("targets", targets.shape[0]), ("cos", cos.shape[0])):
        if m != n:
            raise ValueError(f"hpn_backward: {name} has shape ({m},), expected ({n},) "
                             f"from z {shape_of(z)}")
    _check_targets(targets, P.shape[0])
    cdef double* a = <double*>malloc(2 * n * sizeof(double))
    if a == NULL:
        raise MemoryError()
    try:
        with nogil:
            _hpn_backward(dz, dP, z, P, targets, cos, normalize, learnable, scale,
                          a, a + n, n_threads)
    finally:
        free(a)
