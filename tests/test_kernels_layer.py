"""Layer kernels (conv, scan) vs the float64 reference, and the reference vs finite differences.

The rule for every kernel: forward vs reference; backward vs reference with a random cotangent (llm.c "fakeloss"
sum(out * dout)); reference gradients vs 4th-order central differences; odd shapes, 1s, T = 1;
n_threads in {1, 2, 3}; per-tensor tolerances with the max abs diff in the message.
"""
import inspect
import math

import numpy as np
import pytest

from rtrainer.testing import reference as ref
from rtrainer._kernels import conv, scan

THREADS = [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_close(name, got, want, rtol=1e-4, atol=1e-5):
    """|got - want| <= atol * max(1, max|want|) + rtol * |want|, elementwise.

    The absolute part scales with the tensor's magnitude: float32 kernels vs float64 references
    differ by rounding relative to the size of the terms summed, not of each result."""
    got = f64(got)
    want = f64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values in kernel output"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(got - want)
    bound = atol * scale + rtol * np.abs(want)
    bad = err > bound
    assert not bad.any(), (
        f"{name}: max abs diff {err.max():.3e} (max |ref| {scale:.3e}), "
        f"{int(bad.sum())}/{bad.size} elements outside atol={atol}*scale + rtol={rtol}*|ref|; "
        f"worst at {np.unravel_index(np.argmax(err - bound), err.shape)}")


def fd_grad(f, arr, h=1e-3):
    """4th-order central difference of the scalar f() w.r.t. every element of arr (in place)."""
    g = np.zeros_like(arr)
    flat = arr.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        x0 = flat[i]
        vals = []
        for s in (2.0, 1.0, -1.0, -2.0):
            flat[i] = x0 + s * h
            vals.append(f())
        flat[i] = x0
        gflat[i] = (-vals[0] + 8.0 * vals[1] - 8.0 * vals[2] + vals[3]) / (12.0 * h)
    return g


# ------------------------------------------------------------------------------------------------
# inputs with realistic ranges (those of the `mamba` initialisation)
# ------------------------------------------------------------------------------------------------

def conv_inputs(rng, B, T, D, K):
    x = f32(rng.standard_normal((B, T, D)))
    conv_w = f32(rng.standard_normal((D, K)) / math.sqrt(K))
    conv_b = f32(0.1 * rng.standard_normal(D))
    return x, conv_w, conv_b


def scan_inputs(rng, B, T, D, N, R, clip_dt=None):
    """u ~ N(0,1); A_log ~ log(1..N); softplus(dt_bias) log-uniform in [1e-3, 1e-1], with one
    channel just below and one above the softplus threshold 20 when D allows."""
    u = f32(rng.standard_normal((B, T, D)))
    dt = 0.3 * rng.standard_normal((B, T, D))
    if clip_dt is not None:
        dt = np.clip(dt, -clip_dt, clip_dt)
    dt = f32(dt)
    v = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D))
    dt_bias = np.log(np.expm1(v))
    if D >= 3:
        dt_bias[1] = 18.8       # softplus(x) = log1p(exp(x)), x in ~[18, 19.7]
        dt_bias[2] = 22.0       # softplus(x) = x (above the threshold)
    dt_bias = f32(dt_bias)
    A_log = f32(np.log(np.arange(1, N + 1, dtype=np.float64))[None, :]
                + 0.05 * rng.standard_normal((D, N)))
    xdbl = f32(rng.standard_normal((B, T, 2 * N + R)))
    D_skip = f32(1.0 + 0.1 * rng.standard_normal(D))
    return u, dt, dt_bias, A_log, xdbl, D_skip


def n_chunks(T, chunk):
    return -(-T // chunk)


def run_scan_forward(ins, chunk, n_threads):
    u, dt, dt_bias, A_log, xdbl, D_skip = ins
    B, T, D = u.shape
    N = A_log.shape[1]
    y = np.full((B, T, D), np.nan, np.float32)
    hs = np.full((B, n_chunks(T, chunk), D, N), np.nan, np.float32)
    scan.scan_forward(y, hs, u, dt, dt_bias, A_log, xdbl, D_skip, chunk, n_threads)
    return y, hs


def scan_grads_zero(ins, dtype=np.float32):
    u, dt, dt_bias, A_log, xdbl, D_skip = ins
    return [np.zeros(u.shape, dtype), np.zeros(u.shape, dtype), np.zeros(dt_bias.shape, dtype),
            np.zeros(A_log.shape, dtype), np.zeros(xdbl.shape, dtype),
            np.zeros(D_skip.shape, dtype)]


SCAN_GRAD_NAMES = ["du", "ddt", "ddt_bias", "dA_log", "dxdbl", "dD_skip"]


def run_scan_backward(ins, dy, hs, chunk, n_threads, grads=None):
    grads = scan_grads_zero(ins) if grads is None else grads
    scan.scan_backward(*grads, dy, *ins, hs, chunk, n_threads)
    return grads


def ref_scan(ins, dy, chunk):
    ins64 = [f64(a) for a in ins]
    u = ins64[0]
    B, T, D = u.shape
    N = ins64[3].shape[1]
    y = np.zeros((B, T, D))
    hs = np.zeros((B, n_chunks(T, chunk), D, N))
    ref.scan_forward_ref(y, hs, *ins64, chunk, 1)
    grads = scan_grads_zero(ins, np.float64)
    ref.scan_backward_ref(*grads, f64(dy), *ins64, hs, chunk, 1)
    return y, hs, grads


# ------------------------------------------------------------------------------------------------
# API parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, reference", [
    (conv.conv_forward, ref.conv_forward_ref), (conv.conv_backward, ref.conv_backward_ref),
    (scan.scan_forward, ref.scan_forward_ref), (scan.scan_backward, ref.scan_backward_ref)])
def test_ref_has_identical_parameters(kernel, reference):
    k = list(inspect.signature(kernel).parameters)
    r = list(inspect.signature(reference).parameters)
    assert k == r and k[-1] == "n_threads", f"{kernel.__name__}: {k} != {r}"


# ------------------------------------------------------------------------------------------------
# conv
# ------------------------------------------------------------------------------------------------

CONV_SHAPES = [  # (B, T, D, K)
    (1, 1, 1, 1), (2, 7, 5, 4), (3, 1, 6, 3), (1, 9, 33, 4), (2, 5, 3, 1), (1, 3, 4, 6),
    (2, 40, 70, 4)]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "B%dT%dD%dK%d" % s)
def test_conv_vs_ref(shape, n_threads):
    B, T, D, K = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    x, conv_w, conv_b = conv_inputs(rng, B, T, D, K)
    pre = np.full((B, T, D), np.nan, np.float32)
    u = np.full((B, T, D), np.nan, np.float32)
    conv.conv_forward(pre, u, x, conv_w, conv_b, n_threads)
    pre64, u64 = np.zeros((B, T, D)), np.zeros((B, T, D))
    ref.conv_forward_ref(pre64, u64, f64(x), f64(conv_w), f64(conv_b), 1)
    assert_close("pre", pre, pre64)
    assert_close("u", u, u64)

    du = f32(rng.standard_normal((B, T, D)))
    grads = [np.zeros((B, T, D), np.float32), np.zeros((D, K), np.float32), np.zeros(D, np.float32)]
    conv.conv_backward(*grads, du, x, pre, conv_w, n_threads)
    grads64 = [np.zeros(g.shape) for g in grads]
    ref.conv_backward_ref(*grads64, f64(du), f64(x), f64(pre), f64(conv_w), 1)
    for name, g, g64 in zip(["dx", "dconv_w", "dconv_b"], grads, grads64):
        assert_close(name, g, g64)


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 4, 2, 1), (2, 3, 2, 5)])
def test_conv_ref_vs_finite_differences(shape):
    B, T, D, K = shape
    rng = np.random.default_rng(1)
    x, conv_w, conv_b = (f64(a).copy() for a in conv_inputs(rng, B, T, D, K))
    cot = rng.standard_normal((B, T, D))

    def loss():
        pre, u = np.zeros((B, T, D)), np.zeros((B, T, D))
        ref.conv_forward_ref(pre, u, x, conv_w, conv_b, 1)
        return float(np.sum(u * cot))

    pre, u = np.zeros((B, T, D)), np.zeros((B, T, D))
    ref.conv_forward_ref(pre, u, x, conv_w, conv_b, 1)
    grads = [np.zeros_like(x), np.zeros_like(conv_w), np.zeros_like(conv_b)]
    ref.conv_backward_ref(*grads, cot, x, pre, conv_w, 1)
    for name, arr, g in zip(["dx", "dconv_w", "dconv_b"], [x, conv_w, conv_b], grads):
        assert_close(name + " (ref vs fd)", g, fd_grad(loss, arr), rtol=1e-7, atol=1e-8)


def test_conv_backward_accumulates_and_is_deterministic():
    B, T, D, K = 2, 33, 45, 4
    rng = np.random.default_rng(2)
    x, conv_w, conv_b = conv_inputs(rng, B, T, D, K)
    pre, u = np.zeros((B, T, D), np.float32), np.zeros((B, T, D), np.float32)
    conv.conv_forward(pre, u, x, conv_w, conv_b, 3)
    du = f32(rng.standard_normal((B, T, D)))

    def grads0():
        return [np.zeros((B, T, D), np.float32), np.zeros((D, K), np.float32),
                np.zeros(D, np.float32)]

    once, again, twice = grads0(), grads0(), grads0()
    conv.conv_backward(*once, du, x, pre, conv_w, 3)
    conv.conv_backward(*again, du, x, pre, conv_w, 3)
    for a, b in zip(once, again):                      # bitwise, same n_threads
        np.testing.assert_array_equal(a, b)
    conv.conv_backward(*twice, du, x, pre, conv_w, 3)
    conv.conv_backward(*twice, du, x, pre, conv_w, 3)
    for name, a, b in zip(["dx", "dconv_w", "dconv_b"], once, twice):
        assert_close(name + " x2", b, 2.0 * a, rtol=1e-6, atol=1e-7)
    # other thread counts move the channel-block edges, so an element may fall in the scalar
    # remainder of a vectorised loop, where gcc may contract a*b+c into an fma differently:
    # equal to float rounding, not bitwise (bitwise holds for a fixed thread count, above)
    for nt in (1, 2):
        other = grads0()
        conv.conv_backward(*other, du, x, pre, conv_w, nt)
        for name, a, b in zip(["dx", "dconv_w", "dconv_b"], once, other):
            assert_close(name + f" threads={nt}", b, a, rtol=1e-6, atol=1e-7)


def test_conv_shape_errors():
    x = np.zeros((2, 5, 3), np.float32)
    w = np.zeros((3, 4), np.float32)
    b = np.zeros(3, np.float32)
    out = np.zeros((2, 5, 3), np.float32)
    with pytest.raises(ValueError, match="conv_w"):
        conv.conv_forward(out, out.copy(), x, np.zeros((4, 4), np.float32), b, 1)
    with pytest.raises(ValueError, match="conv_b"):
        conv.conv_forward(out, out.copy(), x, w, np.zeros(2, np.float32), 1)
    with pytest.raises(ValueError, match="pre"):
        conv.conv_forward(np.zeros((2, 4, 3), np.float32), out, x, w, b, 1)
    with pytest.raises(ValueError, match="n_threads"):
        conv.conv_forward(out, out.copy(), x, w, b, 0)
    with pytest.raises(ValueError, match="dconv_w"):
        conv.conv_backward(out, np.zeros((3, 3), np.float32), b.copy(), x, x, x, w, 1)
    with pytest.raises(ValueError, match="du"):
        conv.conv_backward(out, w.copy(), b.copy(), np.zeros((2, 5, 4), np.float32), x, x, w, 1)
    with pytest.raises(ValueError):        # float64 buffers are refused, not silently cast
        conv.conv_forward(out, out.copy(), x.astype(np.float64), w, b, 1)


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------

SCAN_SHAPES = [  # (B, T, D, N, R, chunk)
    (1, 1, 1, 1, 1, 1),       # all ones
    (2, 7, 5, 3, 1, 3),       # T not a multiple of chunk
    (1, 9, 6, 4, 3, 4),       # R = 3
    (3, 5, 33, 16, 1, 16),    # chunk > T
    (2, 13, 10, 1, 3, 1),     # N = 1, chunk = 1
    (1, 1, 7, 5, 2, 3),       # T = 1
    (1, 64, 20, 16, 1, 16),   # realistic N and chunk
    (2, 17, 9, 2, 2, 5),
]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=lambda s: "B%dT%dD%dN%dR%dc%d" % s)
def test_scan_vs_ref(shape, n_threads):
    B, T, D, N, R, chunk = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    y64, hs64, grads64 = ref_scan(ins, dy, chunk)

    y, hs = run_scan_forward(ins, chunk, n_threads)
    assert hs.shape == (B, math.ceil(T / chunk), D, N)
    assert_close("y", y, y64)
    assert_close("hs", hs, hs64)
    np.testing.assert_array_equal(hs[:, 0], 0.0)

    grads = run_scan_backward(ins, dy, hs, chunk, n_threads)
    for name, g, g64 in zip(SCAN_GRAD_NAMES, grads, grads64):
        assert_close(name, g, g64)


@pytest.mark.parametrize("shape", [(2, 5, 3, 2, 2, 2), (1, 4, 4, 1, 1, 3), (2, 3, 3, 3, 3, 1)])
def test_scan_ref_vs_finite_differences(shape):
    B, T, D, N, R, chunk = shape
    rng = np.random.default_rng(3)
    # dt clipped so dt + dt_bias stays clear of the softplus threshold 20 by more than 2h
    ins = [f64(a).copy() for a in scan_inputs(rng, B, T, D, N, R, clip_dt=0.9)]
    cot = rng.standard_normal((B, T, D))
    nc = n_chunks(T, chunk)

    def loss():
        y, hs = np.zeros((B, T, D)), np.zeros((B, nc, D, N))
        ref.scan_forward_ref(y, hs, *ins, chunk, 1)
        return float(np.sum(y * cot))

    y, hs = np.zeros((B, T, D)), np.zeros((B, nc, D, N))
    ref.scan_forward_ref(y, hs, *ins, chunk, 1)
    grads = scan_grads_zero(ins, np.float64)
    ref.scan_backward_ref(*grads, cot, *ins, hs, chunk, 1)
    for name, arr, g in zip(SCAN_GRAD_NAMES, ins, grads):
        assert_close(name + " (ref vs fd)", g, fd_grad(loss, arr), rtol=1e-6, atol=1e-8)
    # the trailing R columns of xdbl (draw) do not feed the scan
    np.testing.assert_array_equal(grads[4][..., 2 * N:], 0.0)


def test_scan_forward_independent_of_chunk_and_threads():
    B, T, D, N, R = 2, 23, 19, 8, 1
    rng = np.random.default_rng(4)
    ins = scan_inputs(rng, B, T, D, N, R)
    y_full, hs_full = run_scan_forward(ins, 1, 1)        # chunk = 1: hs holds every h_{t-1}
    for chunk in (1, 3, 7, 23, 40):
        for nt in THREADS:
            y, hs = run_scan_forward(ins, chunk, nt)
            np.testing.assert_array_equal(y, y_full, err_msg=f"chunk={chunk} n_threads={nt}")
            np.testing.assert_array_equal(hs, hs_full[:, ::chunk],
                                          err_msg=f"chunk={chunk} n_threads={nt}")


def test_scan_backward_chunk_independent():
    B, T, D, N, R = 2, 23, 19, 8, 2
    rng = np.random.default_rng(5)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    base = None
    for chunk in (1, 4, 23, 50):
        _, hs = run_scan_forward(ins, chunk, 2)
        grads = run_scan_backward(ins, dy, hs, chunk, 2)
        if base is None:
            base = grads
            continue
        for name, a, b in zip(SCAN_GRAD_NAMES, base, grads):
            assert_close(f"{name} chunk={chunk}", b, a, rtol=1e-6, atol=1e-7)


def test_scan_backward_accumulates_and_leaves_draw_columns():
    B, T, D, N, R, chunk = 2, 11, 13, 4, 3, 4
    rng = np.random.default_rng(6)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    _, hs = run_scan_forward(ins, chunk, 3)
    once = run_scan_backward(ins, dy, hs, chunk, 3)

    # accumulates into non-zero buffers; the draw columns of dxdbl are never written
    init = [f32(rng.standard_normal(g.shape)) for g in once]
    acc = run_scan_backward(ins, dy, hs, chunk, 3, grads=[a.copy() for a in init])
    for name, a, i, g in zip(SCAN_GRAD_NAMES, acc, init, once):
        assert_close(name + " += init", a, f64(i) + f64(g), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(acc[4][..., 2 * N:], init[4][..., 2 * N:])

    # calling twice doubles the gradient
    twice = run_scan_backward(ins, dy, hs, chunk, 3)
    run_scan_backward(ins, dy, hs, chunk, 3, grads=twice)
    for name, a, b in zip(SCAN_GRAD_NAMES, once, twice):
        assert_close(name + " x2", b, 2.0 * f64(a), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_threads", THREADS)
def test_scan_bitwise_deterministic(n_threads):
    B, T, D, N, R, chunk = 1, 37, 41, 16, 1, 8       # B = 1: parallel over channel blocks
    rng = np.random.default_rng(7)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    y1, hs1 = run_scan_forward(ins, chunk, n_threads)
    y2, hs2 = run_scan_forward(ins, chunk, n_threads)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(hs1, hs2)
    g1 = run_scan_backward(ins, dy, hs1, chunk, n_threads)
    g2 = run_scan_backward(ins, dy, hs1, chunk, n_threads)
    for name, a, b in zip(SCAN_GRAD_NAMES, g1, g2):
        np.testing.assert_array_equal(a, b, err_msg=name)


def _assert_other_thread_counts_agree(ins, dy, chunk, y1, hs1, g1):
    """At 2 and 3 threads: y, hs and the per-channel gradients bitwise those of 1 thread (y1,
    hs1, g1); dxdbl (summed over channels through per-thread partials) up to rounding."""
    for nt in (2, 3):
        y, hs = run_scan_forward(ins, chunk, nt)
        np.testing.assert_array_equal(y, y1)
        np.testing.assert_array_equal(hs, hs1)
        g = run_scan_backward(ins, dy, hs, chunk, nt)
        for name, a, b in zip(SCAN_GRAD_NAMES, g1, g):
            if name == "dxdbl":
                assert_close(f"dxdbl n_threads={nt}", b, a, rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(b, a, err_msg=f"{name} n_threads={nt}")


def test_scan_thread_count_only_reorders_dxdbl_sums():
    """Per-channel work runs in a fixed order whatever the split: only dBt/dCt (summed over d
    through per-thread partials) may differ between thread counts, and only by rounding."""
    B, T, D, N, R, chunk = 2, 19, 37, 8, 2, 6
    rng = np.random.default_rng(9)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    y1, hs1 = run_scan_forward(ins, chunk, 1)
    g1 = run_scan_backward(ins, dy, hs1, chunk, 1)
    _assert_other_thread_counts_agree(ins, dy, chunk, y1, hs1, g1)


def test_scan_full_width_blocks_match_narrow_blocks_bitwise():
    """D = 70: at 1 thread the channel blocks are one full vector register wide (plus a partial
    last block), at 2 and 3 threads they are narrower. Each channel must come out bitwise the same
    on either code path (only dBt/dCt may differ, by the order of their sums), and match the
    float64 reference."""
    B, T, D, N, R, chunk = 2, 21, 70, 16, 1, 8
    rng = np.random.default_rng(10)
    ins = scan_inputs(rng, B, T, D, N, R)
    dy = f32(rng.standard_normal((B, T, D)))
    y64, hs64, grads64 = ref_scan(ins, dy, chunk)
    y1, hs1 = run_scan_forward(ins, chunk, 1)
    g1 = run_scan_backward(ins, dy, hs1, chunk, 1)
    assert_close("y", y1, y64)
    for name, g, g64 in zip(SCAN_GRAD_NAMES, g1, grads64):
        assert_close(name, g, g64)
    _assert_other_thread_counts_agree(ins, dy, chunk, y1, hs1, g1)


def test_scan_shape_errors():
    B, T, D, N, R, chunk = 2, 7, 5, 3, 1, 3
    rng = np.random.default_rng(8)
    ins = scan_inputs(rng, B, T, D, N, R)
    u, dt, dt_bias, A_log, xdbl, D_skip = ins
    y = np.zeros((B, T, D), np.float32)
    hs = np.zeros((B, 3, D, N), np.float32)
    scan.scan_forward(y, hs, *ins, chunk, 2)                           # the good call

    def fwd(**kw):
        args = dict(y=y, hs=hs, u=u, dt=dt, dt_bias=dt_bias, A_log=A_log, xdbl=xdbl,
                    D_skip=D_skip, chunk=chunk, n_threads=2)
        args.update(kw)
        scan.scan_forward(*args.values())

    with pytest.raises(ValueError, match=r"hs has shape \(2, 2, 5, 3\).*\(2, 3, 5, 3\)"):
        fwd(hs=np.zeros((B, 2, D, N), np.float32))
    with pytest.raises(ValueError, match="hs"):
        fwd(chunk=2)                                           # needs ceil(7/2) = 4 chunks
    with pytest.raises(ValueError, match="xdbl"):
        fwd(xdbl=f32(xdbl[..., : 2 * N - 1]))
    with pytest.raises(ValueError, match="A_log"):
        fwd(A_log=np.zeros((D + 1, N), np.float32))
    with pytest.raises(ValueError, match="dt_bias"):
        fwd(dt_bias=np.zeros(D + 1, np.float32))
    with pytest.raises(ValueError, match="D_skip"):
        fwd(D_skip=np.zeros(D - 1, np.float32))
    with pytest.raises(ValueError, match="dt has shape"):
        fwd(dt=np.zeros((B, T + 1, D), np.float32))
    with pytest.raises(ValueError, match="y has shape"):
        fwd(y=np.zeros((B, T, D + 1), np.float32))
    with pytest.raises(ValueError, match="chunk"):
        fwd(chunk=0)
    with pytest.raises(ValueError, match="n_threads"):
        fwd(n_threads=0)

    dy = f32(rng.standard_normal((B, T, D)))
    good = scan_grads_zero(ins)
    scan.scan_backward(*good, dy, *ins, hs, chunk, 2)
    for i, bad_shape in [(0, (B, T, D + 1)), (1, (B, T - 1, D)), (2, (D + 1,)), (3, (D, N + 1)),
                         (4, (B, T, 2 * N + R + 1)), (5, (1,))]:
        grads = scan_grads_zero(ins)
        grads[i] = np.zeros(bad_shape, np.float32)
        with pytest.raises(ValueError, match=SCAN_GRAD_NAMES[i]):
            scan.scan_backward(*grads, dy, *ins, hs, chunk, 2)
    with pytest.raises(ValueError, match="dy"):
        scan.scan_backward(*good, dy[:, :-1].copy(), *ins, hs, chunk, 2)
    with pytest.raises(ValueError, match="hs"):
        scan.scan_backward(*good, dy, *ins, hs, 4, 2)              # hs saved with chunk 3
