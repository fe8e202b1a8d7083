# Helpers shared by the kernel modules. Header-only (inline functions), so a module that
# cimports it needs no runtime provider: every kernel module stays a self-contained extension.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    /* exp(x) for float32, branch-free so that gcc vectorises the loops that call it (the scan's
       exp over B*T*D*N elements dominated the step with scalar libm expf).
       exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 with ln2 split in two (Cody-Waite);
       exp(r) = 1 + r + r^2 q(r), q a degree-5 Chebyshev fit of (exp(r) - 1 - r) / r^2 on |r| <= 0.36;
       2^n applied as two factors so that denormal results come out right.
       Max relative error <= 2e-7 against exp in float64 wherever the result is a normal float
       (tests/test_expf.py); 0 below x = -103.97, +inf above 88.7228, NaN -> NaN. */
    static inline float rtrainer_expf(float x) {
        const float magic = 12582912.0f;            /* 1.5 * 2^23: x/ln2 + magic rounds to an integer */
        float xc = x < -103.97f ? -103.97f : x;     /* NaN passes both comparisons unchanged */
        xc = xc > 88.7228f ? 88.7228f : xc;
        /* explicit fmaf everywhere: the scalar and the vectorised copies of a loop must round
           identically (gcc may contract a*b+c differently in each), so results do not depend
           on where a loop's vector body ends */
        float z = fmaf(xc, 1.44269504088896341f, magic);
        float n = z - magic;
        float r = fmaf(n, -0.693145751953125f, xc);   /* ln2 high part: n * it is exact for |n| < 512 */
        r = fmaf(n, -1.4286068203094173e-06f, r);     /* ln2 low part */
        float q = 1.9903865177184343e-04f;
        q = fmaf(q, r, 1.3937184121459723e-03f);
        q = fmaf(q, r, 8.3332927897572517e-03f);
        q = fmaf(q, r, 4.1666433215141296e-02f);
        q = fmaf(q, r, 1.6666667163372040e-01f);
        q = fmaf(q, r, 0.5f);
        float p = fmaf(r * r, q, r) + 1.0f;
        int32_t zi;
        memcpy(&zi, &z, 4);
        int32_t ni = zi - 0x4B400000;                /* the bits of magic: n as an integer */
        int32_t n1 = ni >> 1, n2 = ni - n1;
        int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
        float s1, s2;
        memcpy(&s1, &b1, 4);
        memcpy(&s2, &b2, 4);
        float y = (p * s1) * s2;
        y = x < -103.97f ? 0.0f : y;
        y = x > 88.7228f ? HUGE_VALF : y;
        return y;
    }

    /* exp(x) for float32 with fewer operations, for the scan's exp(delta*A) over B*T*D*N elements:
       the same range reduction, 2^n applied as one factor (no denormal results: exp(x) for
       x < -87 is 0, i.e. results below 1.6e-38 are flushed) and q of degree 3 (a near-minimax
       fit of (exp(r) - 1 - r) / r^2 on |r| <= 0.3476, truncation error 1.1e-7).
       Max relative error <= 2e-7 against exp in float64 on [-87, 88] (tests/test_expf.py);
       0 below -87, +inf above 88, NaN -> NaN. */
    /* The same function without the clamp above: for x <= 88 (and NaN) bitwise
       rtrainer_expf_fast(x); above 88 the result is meaningless. The scan calls it with
       x = delta*A <= 0 (delta = softplus >= 0, A = -exp(A_log) < 0), where the upper clamp and
       its select are dead work on every one of the B*T*D*N elements. */
    static inline float rtrainer_expf_fast_le88(float x) {
        const float magic = 12582912.0f;
        float xc = x < -87.0f ? -87.0f : x;         /* NaN passes unchanged */
        float z = fmaf(xc, 1.44269504088896341f, magic);
        float n = z - magic;
        float r = fmaf(n, -0.693145751953125f, xc);
        r = fmaf(n, -1.4286068203094173e-06f, r);
        float q = 0.008312384597957134f;               /* q of degree 3 */
        q = fmaf(q, r, 0.04189140722155571f);
        q = fmaf(q, r, 0.16667120158672333f);
        q = fmaf(q, r, 0.4999922215938568f);
        float p = fmaf(r * r, q, r) + 1.0f;
        uint32_t zi;
        memcpy(&zi, &z, 4);
        uint32_t bits = (zi << 23) + (127u << 23);   /* the low bits of z hold n: 2^n */
        float s;
        memcpy(&s, &bits, 4);
        float y = p * s;
        return x < -87.0f ? 0.0f : y;
    }
    static inline float rtrainer_expf_fast(float x) {
        float y = rtrainer_expf_fast_le88(x > 88.0f ? 88.0f : x);   /* NaN passes unchanged */
        return x > 88.0f ? HUGE_VALF : y;
    }
    /* softplus(x) = log(1 + exp(x)) for float32, branch-free (vectorises like rtrainer_expf):
       x above 20 -> x (the threshold of the model's definition); otherwise
       max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and
       log1p(e) = k*ln2 + log(m) + (e - (u - 1)) / u,  u = 1 + e = 2^k * m, m in [sqrt(1/2), sqrt(2)),
       log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: 2s + s^3 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6)
       (the series' remainder is below 3e-9 relative). The last term restores what rounding u
       lost of e. Max relative error <= 4e-7 against float64 (tests/test_expf.py);
       -inf -> 0, NaN -> NaN. */
    static inline float rtrainer_softplusf(float x) {
        float ax = fabsf(x);
        float e = rtrainer_expf(-ax);
        float u = 1.0f + e;
        float c = (e - (u - 1.0f)) / u;
        int big = u > 1.41421356f;
        float m = big ? 0.5f * u : u;
        float k = big ? 0.693147180559945309f : 0.0f;
        float s = (m - 1.0f) / (m + 1.0f);
        float s2 = s * s;
        float p = fmaf(s2, 0.2222222222222222f, 0.2857142857142857f);
        p = fmaf(p, s2, 0.4f);
        p = fmaf(p, s2, 0.6666666666666667f);
        float lm = fmaf(s * s2, p, 2.0f * s);
        float l1p = k + (lm + c);
        float y = (x > 0.0f ? x : 0.0f) + l1p;   /* not fmaxf: gcc calls libm for it */
        return x > 20.0f ? x : y;
    }
    /* software prefetch of the nl floats at p (two lines: a block need not be line-aligned) */
    static inline void rtrainer_prefetch(const float* p, Py_ssize_t nl) {
        __builtin_prefetch(p, 0, 3);
        __builtin_prefetch(p + nl - 1, 0, 3);
    }
    /* the vector width, in floats, of the build target: the kernels' channel blocks are this wide
       (one register) */
    #if defined(__AVX512F__)
    #define RTRAINER_LANES 16
    #elif defined(__AVX__)
    #define RTRAINER_LANES 8
    #else
    #define RTRAINER_LANES 4
    #endif
    """
    float rt_expf "rtrainer_expf" (float x) noexcept nogil
    float rt_softplusf "rtrainer_softplusf" (float x) noexcept nogil
    float rt_expf_fast "rtrainer_expf_fast" (float x) noexcept nogil
    float rt_expf_fast_le88 "rtrainer_expf_fast_le88" (float x) noexcept nogil
    enum: LANES "RTRAINER_LANES"
    void prefetch "rtrainer_prefetch" (const float* p, Py_ssize_t nl) noexcept nogil

# Row sums in float64 with 8 independent partial sums (lane l takes the elements j = l mod 8;
# the lanes are then added in a fixed tree): the same result for any thread count and vector
# width, and no serial chain of dependent additions (a plain running sum waits one add latency
# per element). sum_f64: sum a; sumsq_f64: sum a^2; dot_f64: sum a*b; sqdev_f64: sum (a - m)^2.
cdef extern from *:
    """
    #define RTRAINER_SUM8(EXPR)                                                        \
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                      \
        Py_ssize_t j = 0;                                                              \
        for (; j + 8 <= n; j += 8)                                                     \
            for (int l = 0; l < 8; l++) { Py_ssize_t i = j + l; acc[l] += (EXPR); }    \
        for (int l = 0; j + l < n; l++) { Py_ssize_t i = j + l; acc[l] += (EXPR); }    \
        return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    static inline double rtrainer_sum_f64(const float* a, Py_ssize_t n) {
        RTRAINER_SUM8((double)a[i]) }
    static inline double rtrainer_sumsq_f64(const float* a, Py_ssize_t n) {
        RTRAINER_SUM8((double)a[i] * a[i]) }
    static inline double rtrainer_dot_f64(const float* a, const float* b, Py_ssize_t n) {
        RTRAINER_SUM8((double)a[i] * b[i]) }
    static inline double rtrainer_sqdev_f64(const float* a, double m, Py_ssize_t n) {
        RTRAINER_SUM8(((double)a[i] - m) * ((double)a[i] - m)) }
    """
    double sum_f64 "rtrainer_sum_f64" (const float* a, Py_ssize_t n) noexcept nogil
    double sumsq_f64 "rtrainer_sumsq_f64" (const float* a, Py_ssize_t n) noexcept nogil
    double dot_f64 "rtrainer_dot_f64" (const float* a, const float* b, Py_ssize_t n) noexcept nogil
    double sqdev_f64 "rtrainer_sqdev_f64" (const float* a, double m, Py_ssize_t n) noexcept nogil

# restrict-qualified pointers: for the arguments of small inner-loop helpers, so that gcc knows
# their buffers do not overlap and vectorises loops that touch many of them (it gives up on
# run-time alias checks beyond ~10 pointers)
cdef extern from *:
    """
    typedef float * __restrict__ rtrainer_rf;
    typedef const float * __restrict__ rtrainer_rcf;
    """
    ctypedef float* rf "rtrainer_rf"
    ctypedef const float* rcf "rtrainer_rcf"

# column blocks of float32 written by one thread are whole 64-byte cache lines
cdef enum:
    COL_ALIGN = 16


cdef inline float sigmoidf(float x) noexcept nogil:
    # 1/(1+exp(-x)) with rt_expf (relative error <= 2e-7; see above)
    return <float>1 / (<float>1 + rt_expf(-x))


cdef inline Py_ssize_t col_block_width(Py_ssize_t D, int n_threads) noexcept nogil:
    """Width of the column blocks that split D columns over n_threads, rounded up to COL_ALIGN."""
    cdef Py_ssize_t width = (D + n_threads - 1) // n_threads
    return ((width + COL_ALIGN - 1) // COL_ALIGN) * COL_ALIGN


cdef inline tuple shape_of(object a):
    """Shape tuple of a memoryview or array (error messages only)."""
    return tuple(a.shape)


cdef inline check_threads(int n_threads):
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")


cdef inline check_shape3(str fn, str name, const float[:, :, ::1] a, Py_ssize_t B, Py_ssize_t T, Py_ssize_t D):
    if a.shape[0] != B or a.shape[1] != T or a.shape[2] != D:
        raise ValueError(f"{fn}: {name} has shape {(a.shape[0], a.shape[1], a.shape[2])}, "
                         f"expected (B, T, D) = {(B, T, D)}")


cdef inline check_shape1(str fn, str name, const float[::1] a, Py_ssize_t D):
    if a.shape[0] != D:
        raise ValueError(f"{fn}: {name} has shape {(a.shape[0],)}, expected (D,) = {(D,)}")
