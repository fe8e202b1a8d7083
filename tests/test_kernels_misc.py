"""Embedding, final LayerNorm, HPN head and optimizer kernels vs their float64 references.

Per kernel (the rule for every kernel): float32 kernel vs float64 reference (forward, backward with a random cotangent,
gradients accumulated onto non-zero buffers), the references vs 4th-order central finite differences,
awkward shapes (1s, odd sizes, repeated ids/targets), n_threads in {1, 2, 3}, error messages, and
bitwise determinism.
"""
import inspect

import numpy as np
import pytest

from rtrainer.testing import reference as ref
from rtrainer._kernels import embed, hpn, norm, optim

THREADS = (1, 2, 3)
KERNELS = {
    embed: ("embed_forward", "embed_backward"),
    norm: ("layernorm_forward", "layernorm_backward"),
    hpn: ("hpn_forward", "hpn_backward"),
    optim: ("sumsq", "adamw_step"),
}


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def f64(a):
    return np.array(a, dtype=np.float64)


def assert_close(name, got, want, atol, rtol=0.0):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    tol = atol + rtol * np.abs(want)
    assert np.all(err <= tol), (f"{name}: max abs diff {err.max():.3e} (atol {atol:g}, rtol {rtol:g}, "
                                f"worst at {np.unravel_index(np.argmax(err - tol), err.shape)})")


def fd4(f, x, idx, h=1e-3):
    """4th-order central difference of scalar f at x (float64, perturbed in place) along x[idx]."""
    x0 = x[idx]
    vals = []
    for k in (2, 1, -1, -2):
        x[idx] = x0 + k * h
        vals.append(f())
    x[idx] = x0
    return (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)


def test_every_kernel_has_a_ref_with_the_same_parameters():
    for mod, names in KERNELS.items():
        for name in names:
            kp = list(inspect.signature(getattr(mod, name)).parameters)
            rp = list(inspect.signature(getattr(ref, name + "_ref")).parameters)
            assert kp == rp, f"{name}: kernel {kp} != ref {rp}"
            assert kp[-1] == "n_threads"


# ------------------------------------------------------------------------------------------ embed

@pytest.mark.parametrize("B,T,V,D", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 4, 33), (2, 9, 50, 130)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_embed_vs_ref(B, T, V, D, n_threads):
    rng = np.random.default_rng([B, T, V, D, n_threads])
    ids = rng.integers(0, V, size=(B, T))          # V small -> many repeated ids (scatter collisions)
    E = f32(rng.normal(size=(V, D)))
    out = np.full((B, T, D), np.nan, np.float32)
    embed.embed_forward(out, ids, E, n_threads)
    want = np.empty((B, T, D))
    ref.embed_forward_ref(want, ids, f64(E), n_threads)
    np.testing.assert_array_equal(out, want)        # a gather is exact

    dout = f32(rng.normal(size=(B, T, D)))
    dE0 = f32(rng.normal(size=(V, D)))               # non-zero: backward must accumulate
    dE = dE0.copy()
    embed.embed_backward(dE, ids, dout, n_threads)
    want = f64(dE0)
    ref.embed_backward_ref(want, ids, f64(dout), n_threads)
    assert_close("dE", dE, want, atol=1e-5, rtol=1e-5)
    for nt in THREADS:                               # tokens in order per column: any n_threads
        again = dE0.copy()
        embed.embed_backward(again, ids, dout, nt)
        np.testing.assert_array_equal(again, dE, err_msg=f"dE not bitwise equal for n_threads={nt}")


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_embed_rejects_out_of_range_ids(bad):
    V, D = 5, 3
    ids = np.zeros((2, 4), np.int64)
    ids[1, 2] = bad
    ids[1, 3] = -7                                   # a later bad id is not the one reported
    E = np.ones((V, D), np.float32)
    out = np.full((2, 4, D), 9.0, np.float32)
    msg = rf"token id {bad} at position \(b=1, t=2\) is outside \[0, 5\)"
    with pytest.raises(ValueError, match=msg):
        embed.embed_forward(out, ids, E, 2)
    assert np.all(out == 9.0), "embed_forward wrote before validating ids"
    dE = np.zeros((V, D), np.float32)
    with pytest.raises(ValueError, match=msg):
        embed.embed_backward(dE, ids, np.ones((2, 4, D), np.float32), 2)
    assert np.all(dE == 0.0), "embed_backward wrote before validating ids"
    with pytest.raises(ValueError, match=msg):
        ref.embed_forward_ref(np.zeros((2, 4, D)), ids, f64(E), 1)
    with pytest.raises(ValueError, match=msg):
        ref.embed_backward_ref(np.zeros((V, D)), ids, np.ones((2, 4, D)), 1)


def test_embed_shape_errors():
    E = np.zeros((5, 3), np.float32)
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match=r"out has shape \(2, 4, 2\)"):
        embed.embed_forward(np.zeros((2, 4, 2), np.float32), ids, E, 1)
    with pytest.raises(ValueError, match=r"dout has shape \(2, 3, 3\)"):
        embed.embed_backward(np.zeros((5, 3), np.float32), ids, np.zeros((2, 3, 3), np.float32), 1)
    with pytest.raises(ValueError, match="n_threads"):
        embed.embed_forward(np.zeros((2, 4, 3), np.float32), ids, E, 0)


def test_embed_ref_vs_finite_differences():
    rng = np.random.default_rng(0)
    B, T, V, D = 2, 3, 4, 3
    ids = np.array([[0, 2, 0], [3, 0, 2]])
    E = rng.normal(size=(V, D))
    cot = rng.normal(size=(B, T, D))
    out = np.empty((B, T, D))

    def loss():
        ref.embed_forward_ref(out, ids, E, 1)
        return float(np.sum(out * cot))

    dE = np.zeros((V, D))
    ref.embed_backward_ref(dE, ids, cot, 1)
    num = np.array([[fd4(loss, E, (v, d)) for d in range(D)] for v in range(V)])
    assert_close("dE vs FD", dE, num, atol=1e-9)


# ------------------------------------------------------------------------------------------- norm

LN_EPS = 1e-5


@pytest.mark.parametrize("n,D", [(1, 1), (1, 7), (5, 1), (13, 33), (64, 256)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_layernorm_vs_ref(n, D, n_threads):
    rng = np.random.default_rng([n, D, n_threads])
    x = f32(rng.normal(size=(n, D)) * 3.0 + 1.5)
    z = np.empty((n, D), np.float32)
    rstd = np.empty(n, np.float32)
    norm.layernorm_forward(z, rstd, x, LN_EPS, n_threads)
    zr, rr = np.empty((n, D)), np.empty(n)
    ref.layernorm_forward_ref(zr, rr, f64(x), LN_EPS, n_threads)
    assert_close("z", z, zr, atol=2e-6, rtol=2e-6)
    assert_close("rstd", rstd, rr, atol=0.0, rtol=1e-6)

    dz = f32(rng.normal(size=(n, D)))
    dx0 = f32(rng.normal(size=(n, D)))
    dx = dx0.copy()
    norm.layernorm_backward(dx, dz, z, rstd, n_threads)
    want = f64(dx0)
    ref.layernorm_backward_ref(want, f64(dz), f64(z), f64(rstd), n_threads)
    assert_close("dx", dx, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=1e-5)

    for nt in THREADS:                               # row-owned: bitwise equal for any n_threads
        z2, r2, dx2 = np.empty_like(z), np.empty_like(rstd), dx0.copy()
        norm.layernorm_forward(z2, r2, x, LN_EPS, nt)
        norm.layernorm_backward(dx2, dz, z2, r2, nt)
        np.testing.assert_array_equal(z2, z)
        np.testing.assert_array_equal(r2, rstd)
        np.testing.assert_array_equal(dx2, dx)


@pytest.mark.parametrize("n,D", [(3, 5), (2, 1), (1, 8)])
def test_layernorm_ref_vs_finite_differences(n, D):
    rng = np.random.default_rng([n, D])
    x = rng.normal(size=(n, D))
    cot = rng.normal(size=(n, D))
    z, rstd = np.empty((n, D)), np.empty(n)

    def loss():
        ref.layernorm_forward_ref(z, rstd, x, LN_EPS, 1)
        return float(np.sum(z * cot))

    loss()
    dx = np.zeros((n, D))
    ref.layernorm_backward_ref(dx, cot, z, rstd, 1)
    num = np.array([[fd4(loss, x, (i, j)) for j in range(D)] for i in range(n)])
    assert_close("dx vs FD", dx, num, atol=1e-8, rtol=1e-7)


def test_layernorm_shape_errors():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"rstd has shape \(3,\)"):
        norm.layernorm_forward(np.zeros((4, 3), np.float32), np.zeros(3, np.float32), x, LN_EPS, 1)
    with pytest.raises(ValueError, match=r"dz has shape \(4, 2\)"):
        norm.layernorm_backward(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32), x,
                                np.zeros(4, np.float32), 1)


# -------------------------------------------------------------------------------------------- hpn

HPN_SHAPES = [(1, 1, 1), (1, 3, 4), (7, 3, 5), (50, 11, 33), (9, 4, 1)]   # (n, V, D)


def hpn_case(n, V, D, seed):
    rng = np.random.default_rng(seed)
    z = f32(rng.normal(size=(n, D)))
    P = f32(rng.normal(size=(V, D)) * 0.7)
    targets = rng.integers(0, V, size=n)            # V < n: repeated targets
    return rng, z, P, targets


@pytest.mark.parametrize("n,V,D", HPN_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_threads", THREADS)
def test_hpn_vs_ref(n, V, D, normalize, n_threads):
    rng, z, P, targets = hpn_case(n, V, D, [n, V, D, normalize, n_threads])
    cos = np.empty(n, np.float32)
    loss = hpn.hpn_forward(cos, z, P, targets, normalize, n_threads)
    cr = np.empty(n)
    lr_ = ref.hpn_forward_ref(cr, f64(z), f64(P), targets, normalize, n_threads)
    assert_close("cos", cos, cr, atol=1e-6, rtol=1e-6)
    assert_close("loss", loss, lr_, atol=1e-7, rtol=1e-6)

    scale = 0.7
    dz0, dP0 = f32(rng.normal(size=(n, D))), f32(rng.normal(size=(V, D)))
    dz, dP = dz0.copy(), dP0.copy()
    hpn.hpn_backward(dz, dP, z, P, targets, cos, normalize, True, scale, n_threads)
    dzr, dPr = f64(dz0), f64(dP0)
    ref.hpn_backward_ref(dzr, dPr, f64(z), f64(P), targets, f64(cos), normalize, True, scale, n_threads)
    assert_close("dz", dz, dzr, atol=1e-5, rtol=1e-5)
    assert_close("dP", dP, dPr, atol=1e-5, rtol=1e-5)

    # not learnable: dP untouched (full-size or (0, D))
    dz2, dPu = dz0.copy(), dP0.copy()
    hpn.hpn_backward(dz2, dPu, z, P, targets, cos, normalize, False, scale, n_threads)
    np.testing.assert_array_equal(dz2, dz)
    np.testing.assert_array_equal(dPu, dP0)
    dz3 = dz0.copy()
    hpn.hpn_backward(dz3, np.zeros((0, D), np.float32), z, P, targets, cos, normalize, False, scale,
                     n_threads)
    np.testing.assert_array_equal(dz3, dz)

    for nt in THREADS:                              # bitwise equal across threads and repeats
        c2 = np.empty(n, np.float32)
        assert hpn.hpn_forward(c2, z, P, targets, normalize, nt) == loss
        np.testing.assert_array_equal(c2, cos)
        dz4, dP4 = dz0.copy(), dP0.copy()
        hpn.hpn_backward(dz4, dP4, z, P, targets, cos, normalize, True, scale, nt)
        np.testing.assert_array_equal(dz4, dz, err_msg=f"dz differs for n_threads={nt}")
        np.testing.assert_array_equal(dP4, dP, err_msg=f"dP differs for n_threads={nt}")


@pytest.mark.parametrize("normalize", [True, False])
def test_hpn_small_norms_match_ref(normalize):
    """Rows below the 1e-8 floor: the max() is constant, so no projection term (and no NaN)."""
    rng = np.random.default_rng(5)
    n, V, D = 6, 3, 4
    z = f32(rng.normal(size=(n, D)))
    z[0] = 0.0
    z[1] *= 1e-10                                   # ‖z‖ < 1e-8
    P = f32(rng.normal(size=(V, D)))
    P[1] = 0.0
    P[2] *= 1e-10
    targets = np.array([0, 1, 2, 1, 2, 0])
    cos = np.empty(n, np.float32)
    loss = hpn.hpn_forward(cos, z, P, targets, normalize, 2)
    cr = np.empty(n)
    lr_ = ref.hpn_forward_ref(cr, f64(z), f64(P), targets, normalize, 1)
    assert np.isfinite(loss)
    assert_close("cos", cos, cr, atol=1e-6, rtol=1e-5)
    assert_close("loss", loss, lr_, atol=1e-6, rtol=1e-5)
    dz, dP = np.zeros((n, D), np.float32), np.zeros((V, D), np.float32)
    hpn.hpn_backward(dz, dP, z, P, targets, cos, normalize, True, 1.0, 2)
    dzr, dPr = np.zeros((n, D)), np.zeros((V, D))
    ref.hpn_backward_ref(dzr, dPr, f64(z), f64(P), targets, f64(cos), normalize, True, 1.0, 1)
    assert np.all(np.isfinite(dz)) and np.all(np.isfinite(dP))
    for name, got, want in (("dz", dz, dzr), ("dP", dP, dPr)):
        assert_close(name, got, want, atol=1e-6 * max(1.0, float(np.abs(want).max())), rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_hpn_ref_vs_finite_differences(normalize):
    rng = np.random.default_rng(int(normalize))
    n, V, D = 5, 3, 4
    z = rng.normal(size=(n, D))
    P = rng.normal(size=(V, D)) * 0.8
    targets = np.array([2, 0, 2, 2, 1])             # repeated target: dP collisions
    scale = 1.3
    cos = np.empty(n)

    def loss():
        return scale * ref.hpn_forward_ref(cos, z, P, targets, normalize, 1)

    loss()
    dz, dP = np.zeros((n, D)), np.zeros((V, D))
    ref.hpn_backward_ref(dz, dP, z, P, targets, cos, normalize, True, scale, 1)
    num_z = np.array([[fd4(loss, z, (i, j)) for j in range(D)] for i in range(n)])
    num_P = np.array([[fd4(loss, P, (k, j)) for j in range(D)] for k in range(V)])
    assert_close("dz vs FD", dz, num_z, atol=1e-9, rtol=1e-7)
    assert_close("dP vs FD", dP, num_P, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("bad", [-3, 4, 99])   # -1 is the ignore index
def test_hpn_rejects_out_of_range_targets(bad):
    n, V, D = 6, 4, 3
    z, P = np.ones((n, D), np.float32), np.ones((V, D), np.float32)
    targets = np.zeros(n, np.int64)
    targets[3] = bad
    targets[5] = -2
    msg = rf"target {bad} at index 3 is outside \[0, 4\)"
    cos = np.full(n, 7.0, np.float32)
    with pytest.raises(ValueError, match=msg):
        hpn.hpn_forward(cos, z, P, targets, True, 2)
    assert np.all(cos == 7.0)
    dz, dP = np.zeros((n, D), np.float32), np.zeros((V, D), np.float32)
    with pytest.raises(ValueError, match=msg):
        hpn.hpn_backward(dz, dP, z, P, targets, cos, True, True, 1.0, 2)
    assert np.all(dz == 0.0) and np.all(dP == 0.0)
    with pytest.raises(ValueError, match=msg):
        ref.hpn_forward_ref(np.zeros(n), f64(z), f64(P), targets, True, 1)
    with pytest.raises(ValueError, match=msg):
        ref.hpn_backward_ref(np.zeros((n, D)), np.zeros((V, D)), f64(z), f64(P), targets,
                             np.zeros(n), True, True, 1.0, 1)


def test_hpn_shape_errors():
    z, P = np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32)
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match=r"z has shape \(4, 2\) and P has shape \(5, 3\)"):
        hpn.hpn_forward(np.zeros(4, np.float32), np.zeros((4, 2), np.float32), P, t, True, 1)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\)"):
        hpn.hpn_forward(np.zeros(4, np.float32), z, P, t[:3].copy(), True, 1)
    with pytest.raises(ValueError, match=r"dP has shape \(0, 3\)"):
        hpn.hpn_backward(np.zeros((4, 3), np.float32), np.zeros((0, 3), np.float32), z, P, t,
                         np.zeros(4, np.float32), True, True, 1.0, 1)


# ------------------------------------------------------------------------------------------ optim

def seg(*rows):
    return np.array(rows, np.int64).reshape(-1, 3)


SEGMENTS = seg((0, 20000, 1), (20000, 20001, 0), (20011, 20011, 1), (30000, 99999, 0), (99999, 100003, 1))


def test_sumsq_vs_ref_and_thread_independent():
    rng = np.random.default_rng(0)
    g = f32(rng.normal(size=100_010) * rng.uniform(0.0, 5.0, size=100_010))
    got = optim.sumsq(g, SEGMENTS, 1)
    want = ref.sumsq_ref(f64(g), SEGMENTS, 1)
    assert abs(got - want) <= 1e-12 * want, f"sumsq: abs diff {abs(got - want):.3e}"
    for nt in (1, 2, 3, 4, 7):
        assert optim.sumsq(g, SEGMENTS, nt) == got, f"sumsq not bitwise equal for n_threads={nt}"
    assert optim.sumsq(g, seg(), 2) == 0.0
    assert optim.sumsq(g, seg((5, 6, 0)), 1) == float(g[5]) ** 2
    # overlapping ranges are simply summed twice
    assert optim.sumsq(g, seg((0, 3, 0), (0, 3, 0)), 2) == pytest.approx(2 * np.sum(f64(g[:3]) ** 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sumsq_non_finite(bad):
    g = np.ones(50_000, np.float32)
    g[33_333] = bad
    for nt in THREADS:
        assert not np.isfinite(optim.sumsq(g, seg((0, 50_000, 1)), nt))
    assert not np.isfinite(ref.sumsq_ref(f64(g), seg((0, 50_000, 1)), 1))
    assert np.isfinite(optim.sumsq(g, seg((0, 33_333, 1), (33_334, 50_000, 0)), 2))  # outside: ignored


def test_segment_errors():
    g = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"segment 1 = \[4, 11\) is not a range inside \[0, 10\)"):
        optim.sumsq(g, seg((0, 2, 0), (4, 11, 0)), 1)
    with pytest.raises(ValueError, match=r"segment 0 = \[3, 2\)"):
        optim.sumsq(g, seg((3, 2, 0)), 1)
    with pytest.raises(ValueError, match=r"segments has shape \(1, 2\)"):
        optim.sumsq(g, np.zeros((1, 2), np.int64), 1)
    p, m, v = np.zeros(10, np.float32), np.zeros(10, np.float32), np.zeros(10, np.float32)
    args = (0.1, 0.9, 0.999, 1e-8, 0.01)
    with pytest.raises(ValueError, match="overlap"):
        optim.adamw_step(p, g, m, v, seg((0, 5, 0), (4, 6, 1)), *args, 1, 1.0, 1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        optim.adamw_step(p, g, m, v, seg((0, 5, 0)), *args, 0, 1.0, 1)
    with pytest.raises(ValueError, match=r"m has shape \(9,\)"):
        optim.adamw_step(p, g, m[:9].copy(), v, seg((0, 5, 0)), *args, 1, 1.0, 1)


ADAM = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def run_adamw(fn, p, m, v, grads, segments, grad_scales, n_threads, start_step=1):
    for s, (g, gsc) in enumerate(zip(grads, grad_scales)):
        fn(p, g, m, v, segments, ADAM["lr"], ADAM["beta1"], ADAM["beta2"], ADAM["eps"],
           ADAM["weight_decay"], start_step + s, gsc, n_threads)


@pytest.mark.parametrize("n_threads", THREADS)
def test_adamw_vs_ref_several_steps(n_threads):
    rng = np.random.default_rng(n_threads)
    P = 100_010
    p0 = f32(rng.normal(size=P))
    grads = [f32(rng.normal(size=P) * 0.1) for _ in range(5)]
    scales = [1.0, 0.5, 1.0, 0.25, 1.0]
    p, m, v = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
    run_adamw(optim.adamw_step, p, m, v, grads, SEGMENTS, scales, n_threads)
    pr, mr, vr = f64(p0), np.zeros(P), np.zeros(P)
    run_adamw(ref.adamw_step_ref, pr, mr, vr, [f64(g) for g in grads], SEGMENTS, scales, n_threads)
    inside = np.zeros(P, bool)
    for lo, hi, _ in SEGMENTS:
        inside[lo:hi] = True
    assert_close("p", p, pr, atol=1e-6, rtol=1e-6)
    assert_close("m", m, mr, atol=1e-8, rtol=1e-5)
    assert_close("v", v, vr, atol=1e-10, rtol=1e-5)
    np.testing.assert_array_equal(p[~inside], p0[~inside])      # outside segments: untouched
    assert np.all(m[~inside] == 0) and np.all(v[~inside] == 0)
    assert np.all(m[inside] != 0)
    for nt in THREADS:                                            # elementwise: any split is exact
        p2, m2, v2 = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
        run_adamw(optim.adamw_step, p2, m2, v2, grads, SEGMENTS, scales, nt)
        np.testing.assert_array_equal(p2, p)
        np.testing.assert_array_equal(m2, m)
        np.testing.assert_array_equal(v2, v)


def test_adamw_decay_flag():
    P = 40
    p0 = f32(np.linspace(-2, 2, P))
    p, m, v = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
    g = np.zeros(P, np.float32)                     # zero gradient: only weight decay can move p
    optim.adamw_step(p, g, m, v, seg((0, 10, 1), (10, 25, 0), (30, 40, 1)), 0.5, 0.9, 0.999, 1e-8,
                     0.2, 1, 1.0, 2)
    np.testing.assert_array_equal(p[:10], f32(f64(p0[:10]) * (1 - 0.5 * 0.2)))
    np.testing.assert_array_equal(p[10:30], p0[10:30])
    np.testing.assert_array_equal(p[30:], f32(f64(p0[30:]) * (1 - 0.5 * 0.2)))


def torch_adamw_by_formula(p, grads, lr, betas, eps, weight_decay):
    """torch.optim.AdamW (single-tensor, amsgrad=False, maximize=False) transcribed in float64."""
    p = f64(p)
    exp_avg, exp_avg_sq = np.zeros_like(p), np.zeros_like(p)
    beta1, beta2 = betas
    for step, grad in enumerate(grads, start=1):
        p *= 1 - lr * weight_decay                  # param.mul_(1 - lr * weight_decay)
        exp_avg += (grad - exp_avg) * (1 - beta1)   # exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq *= beta2                         # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1-beta2)
        exp_avg_sq += (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = np.sqrt(exp_avg_sq) / np.sqrt(bias_correction2) + eps
        p += -step_size * exp_avg / denom           # param.addcdiv_(exp_avg, denom, value=-step_size)
    return p


def test_adamw_matches_torch_formula():
    rng = np.random.default_rng(11)
    P, steps = 3001, 6
    p0 = f32(rng.normal(size=P))
    raw = [f32(rng.normal(size=P) * 0.3) for _ in range(steps)]
    scale = 0.4                                     # clipping: torch would see grad * scale
    want = torch_adamw_by_formula(p0, [f64(g) * scale for g in raw], ADAM["lr"],
                                  (ADAM["beta1"], ADAM["beta2"]), ADAM["eps"], ADAM["weight_decay"])
    segs = seg((0, P, 1))
    pr, mr, vr = f64(p0), np.zeros(P), np.zeros(P)
    run_adamw(ref.adamw_step_ref, pr, mr, vr, [f64(g) for g in raw], segs, [scale] * steps, 1)
    assert_close("ref p vs torch formula", pr, want, atol=1e-12, rtol=1e-12)
    p, m, v = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
    run_adamw(optim.adamw_step, p, m, v, raw, segs, [scale] * steps, 3)
    assert_close("kernel p vs torch formula", p, want, atol=1e-6, rtol=1e-6)


def test_adamw_matches_torch_if_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    P, steps = 257, 4
    p0 = f32(rng.normal(size=P))
    raw = [f32(rng.normal(size=P)) for _ in range(steps)]
    scale = 0.75
    w = torch.nn.Parameter(torch.tensor(f64(p0)))
    opt = torch.optim.AdamW([w], lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"],
                            weight_decay=ADAM["weight_decay"], foreach=False)
    for g in raw:
        w.grad = torch.tensor(f64(g) * scale)
        opt.step()
    p, m, v = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
    run_adamw(optim.adamw_step, p, m, v, raw, seg((0, P, 1)), [scale] * steps, 2)
    assert_close("kernel p vs torch.optim.AdamW", p, w.detach().numpy(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# rtrainer._kernels.timed: the public timing hook of the benchmarks' step breakdown
# ------------------------------------------------------------------------------------------------

def test_timed_hook_sees_every_kernel_call_and_restores():
    import rtrainer._kernels as K
    from rtrainer._kernels import embed

    calls = []
    raw_embed, raw_mm = embed.embed_forward, np.matmul
    E = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[0, 3, 1]], np.int64)
    out = np.empty((1, 3, 3), np.float32)
    with K.timed(lambda name, sec, args: calls.append((name, sec, len(args)))):
        assert embed.embed_forward is not raw_embed
        embed.embed_forward(out, ids, E, 1)
        np.matmul(E, E.T)
    assert embed.embed_forward is raw_embed and np.matmul is raw_mm
    names = [c[0] for c in calls]
    assert names == ["embed.embed_forward", "numpy.matmul"]
    assert all(c[1] >= 0.0 for c in calls) and calls[0][2] == 4
    np.testing.assert_array_equal(out[0], E[[0, 3, 1]])
    # restored after an exception too
    with pytest.raises(ValueError):
        with K.timed(lambda *a: None):
            embed.embed_forward(out, ids, E, 0)       # n_threads 0: the kernel's own error
    assert embed.embed_forward is raw_embed and np.matmul is raw_mm
    assert "xent" in K.kernel_modules() and "info" not in K.kernel_modules()
