"""The built-in heads beyond prediction: the softmax head (fused kernel vs float64 reference, finite
differences, the example's independent numpy head), the ignore index (-1) of both heads, and the
placement of fixed HPN prototypes (regular simplex, optimised spread)."""
import importlib.util

import numpy as np
import pytest

from rtrainer.testing import reference as ref
from rtrainer._kernels import hpn, xent
from rtrainer.heads import HPNHead, SoftmaxHead, max_cosine, simplex_prototypes, spread_prototypes
from rtrainer.params import FlatParams
from conftest import REPO


def bound(head):
    flat = FlatParams(head.param_specs())
    head.bind(flat.params, flat.grads)
    return head, flat


def targets_with_ignore(rng, n, V, frac=0.4):
    t = rng.integers(0, V, size=n).astype(np.int64)
    t[rng.random(n) < frac] = -1
    return t


# ------------------------------------------------------------------------------ softmax_xent kernel

@pytest.mark.parametrize("n,V", [(1, 1), (1, 5), (5, 3), (37, 20), (300, 65), (64, 1000)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_softmax_xent_vs_reference(n, V, n_threads):
    rng = np.random.default_rng([n, V, n_threads])
    x = (rng.normal(size=(n, V)) * 3.0).astype(np.float32)
    x[0, :] += 80.0                                    # large logits: the max shift must hold
    t = targets_with_ignore(rng, n, V)
    t[0] = V - 1
    scale = 0.7
    d = x.copy()
    loss = xent.softmax_xent(d, t, scale, n_threads)
    dr = x.astype(np.float64)
    loss_r = ref.softmax_xent_ref(dr, t, scale, 1)
    assert loss == pytest.approx(loss_r, rel=2e-6, abs=1e-6)
    np.testing.assert_allclose(d, dr, rtol=1e-5, atol=1e-7)
    assert np.all(d[t == -1] == 0.0)
    for nt in (1, 2, 3):                                # bitwise for any thread count
        d2 = x.copy()
        assert xent.softmax_xent(d2, t, scale, nt) == loss
        assert np.array_equal(d2, d)


def test_softmax_xent_ref_vs_finite_differences():
    rng = np.random.default_rng(3)
    n, V, scale = 6, 5, 1.3
    x = rng.normal(size=(n, V))
    t = np.array([0, -1, 4, 2, -1, 2])
    g = x.copy()
    ref.softmax_xent_ref(g, t, scale, 1)
    f = lambda y: scale * ref.softmax_xent_ref(y.copy(), t, 1.0, 1)  # noqa: E731
    h = 1e-4
    for i in range(n):
        for j in range(V):
            e = np.zeros_like(x)
            e[i, j] = h
            fd = (-f(x + 2 * e) + 8 * f(x + e) - 8 * f(x - e) + f(x - 2 * e)) / (12 * h)
            assert g[i, j] == pytest.approx(fd, abs=1e-9)


def test_softmax_xent_all_ignored_and_bad_targets():
    x = np.ones((3, 4), np.float32)
    assert xent.softmax_xent(x, np.full(3, -1, np.int64), 1.0, 2) == 0.0
    assert np.all(x == 0.0)
    for bad in (-2, 4):
        t = np.array([0, bad, 1], np.int64)
        with pytest.raises(ValueError, match=rf"target {bad} at index 1 is outside \[0, 4\)"):
            xent.softmax_xent(np.ones((3, 4), np.float32), t, 1.0, 1)
        with pytest.raises(ValueError, match=rf"target {bad} at index 1 is outside \[0, 4\)"):
            ref.softmax_xent_ref(np.ones((3, 4)), t, 1.0, 1)
    with pytest.raises(ValueError, match="targets has shape"):
        xent.softmax_xent(np.ones((3, 4), np.float32), np.zeros(2, np.int64), 1.0, 1)


# ------------------------------------------------------------------------------------ SoftmaxHead

def softmax_loss64(z, W, b, t):
    """float64 loss of the softmax head, through the reference."""
    x = z @ W.T + (b if b is not None else 0.0)
    return ref.softmax_xent_ref(x.copy(), t, 1.0, 1)


@pytest.mark.parametrize("bias", [True, False])
def test_softmax_head_gradients_vs_finite_differences(bias):
    rng = np.random.default_rng([7, bias])
    n, V, D = 9, 6, 4
    head, flat = bound(SoftmaxHead(V, D, bias=bias, n_threads=2))
    head.init_params(1, "mamba")
    flat.params["head.W"][...] = rng.normal(size=(V, D))
    if bias:
        flat.params["head.b"][...] = rng.normal(size=V)
    z = rng.normal(size=(n, D)).astype(np.float32)
    t = targets_with_ignore(rng, n, V)
    loss = head.forward(z, t)
    dz = np.zeros_like(z)
    head.backward(dz)
    W = flat.params["head.W"].astype(np.float64)
    b = flat.params["head.b"].astype(np.float64) if bias else None
    z64 = z.astype(np.float64)
    assert loss == pytest.approx(softmax_loss64(z64, W, b, t), rel=1e-6)
    h = 1e-5

    def fd(f, a):
        out = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            e = np.zeros_like(a)
            e[idx] = h
            out[idx] = (f(a + e) - f(a - e)) / (2 * h)
        return out

    np.testing.assert_allclose(dz, fd(lambda zz: softmax_loss64(zz, W, b, t), z64), atol=2e-6)
    np.testing.assert_allclose(flat.grads["head.W"], fd(lambda WW: softmax_loss64(z64, WW, b, t), W), atol=2e-6)
    if bias:
        np.testing.assert_allclose(flat.grads["head.b"], fd(lambda bb: softmax_loss64(z64, W, bb, t), b), atol=2e-6)
    assert np.all(dz[t == -1] == 0.0)


def test_softmax_head_matches_the_examples_numpy_head_and_predicts_the_argmax():
    spec = importlib.util.spec_from_file_location("softmax_example", REPO / "examples" / "softmax_head.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    rng = np.random.default_rng(11)
    n, V, D = 50, 30, 8
    a, fa = bound(SoftmaxHead(V, D, n_threads=2))
    b, fb = bound(ex.SoftmaxHead(V, D))
    a.init_params(3, "mamba")
    fa.params["head.b"][...] = rng.normal(size=V)
    fb.data[...] = fa.data                            # same layout: head.W then head.b
    z = rng.normal(size=(n, D)).astype(np.float32)
    t = rng.integers(0, V, size=n)
    assert a.forward(z, t) == pytest.approx(b.forward(z, t), rel=1e-6)
    dza, dzb = np.zeros_like(z), np.zeros_like(z)
    a.backward(dza)
    b.backward(dzb)
    np.testing.assert_allclose(dza, dzb, atol=1e-6)
    np.testing.assert_allclose(fa.grad, fb.grad, atol=1e-6)
    logits = z.astype(np.float64) @ fa.params["head.W"].T.astype(np.float64) + fa.params["head.b"]
    np.testing.assert_array_equal(a.predict(z, block=7), np.argmax(logits, axis=1))


# ------------------------------------------------------------------------------- HPN ignore index

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_hpn_ignore_index_equals_the_scored_subset(normalize, n_threads):
    rng = np.random.default_rng([5, normalize, n_threads])
    n, V, D = 40, 7, 6
    z = rng.normal(size=(n, D)).astype(np.float32)
    P = rng.normal(size=(V, D)).astype(np.float32)
    t = targets_with_ignore(rng, n, V, 0.5)
    keep = t != -1
    cos = np.empty(n, np.float32)
    loss = hpn.hpn_forward(cos, z, P, t, normalize, n_threads)
    cs = np.empty(keep.sum(), np.float32)
    loss_s = hpn.hpn_forward(cs, np.ascontiguousarray(z[keep]), P, t[keep], normalize, n_threads)
    assert loss == loss_s and np.array_equal(cos[keep], cs) and np.all(cos[~keep] == 0.0)
    cr = np.empty(n)
    assert loss == pytest.approx(ref.hpn_forward_ref(cr, z.astype(np.float64), P.astype(np.float64), t,
                                                     normalize, 1), rel=1e-6)
    dz, dP = np.zeros_like(z), np.zeros_like(P)
    hpn.hpn_backward(dz, dP, z, P, t, cos, normalize, True, 1.0, n_threads)
    dzs, dPs = np.zeros((keep.sum(), D), np.float32), np.zeros_like(P)
    hpn.hpn_backward(dzs, dPs, np.ascontiguousarray(z[keep]), P, t[keep], cs, normalize, True, 1.0, n_threads)
    assert np.array_equal(dz[keep], dzs) and np.all(dz[~keep] == 0.0) and np.array_equal(dP, dPs)
    dzr, dPr = np.zeros((n, D)), np.zeros((V, D))
    ref.hpn_backward_ref(dzr, dPr, z.astype(np.float64), P.astype(np.float64), t, cr, normalize, True, 1.0, 1)
    np.testing.assert_allclose(dz, dzr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dP, dPr, rtol=1e-5, atol=1e-6)


def test_hpn_reference_with_ignore_vs_finite_differences():
    rng = np.random.default_rng(9)
    n, V, D = 8, 4, 3
    z, P = rng.normal(size=(n, D)), rng.normal(size=(V, D))
    t = np.array([0, -1, 3, 3, -1, 1, 2, -1])
    cos = np.empty(n)
    ref.hpn_forward_ref(cos, z, P, t, True, 1)
    dz, dP = np.zeros_like(z), np.zeros_like(P)
    ref.hpn_backward_ref(dz, dP, z, P, t, cos, True, True, 1.0, 1)
    h = 1e-5
    for a, g, f in ((z, dz, lambda zz: ref.hpn_forward_ref(np.empty(n), zz, P, t, True, 1)),
                    (P, dP, lambda PP: ref.hpn_forward_ref(np.empty(n), z, PP, t, True, 1))):
        for idx in np.ndindex(a.shape):
            e = np.zeros_like(a)
            e[idx] = h
            assert g[idx] == pytest.approx((f(a + e) - f(a - e)) / (2 * h), abs=1e-8)
    assert np.all(dz[t == -1] == 0.0)


def test_hpn_all_ignored_gives_zero_loss_and_no_gradient():
    z, P = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32)
    t = np.full(4, -1, np.int64)
    cos = np.empty(4, np.float32)
    assert hpn.hpn_forward(cos, z, P, t, True, 2) == 0.0
    dz, dP = np.zeros_like(z), np.zeros_like(P)
    hpn.hpn_backward(dz, dP, z, P, t, cos, True, True, 1.0, 2)
    assert not dz.any() and not dP.any()


# ---------------------------------------------------------------------------- prototype placement

@pytest.mark.parametrize("V,D", [(2, 1), (2, 5), (3, 2), (16, 64), (65, 64), (126, 128), (513, 512)])
def test_simplex_is_exact(V, D):
    P = simplex_prototypes(V, D, seed=4)
    assert P.shape == (V, D)
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-12)
    C = P @ P.T
    off = C[~np.eye(V, dtype=bool)]
    np.testing.assert_allclose(off, -1.0 / (V - 1), atol=1e-12)
    assert np.array_equal(spread_prototypes(V, D, 4), P)           # D >= V-1: spread = simplex
    assert np.array_equal(simplex_prototypes(V, D, seed=4), P)     # seeded
    if D > 1:
        assert not np.allclose(simplex_prototypes(V, D, seed=5), P)


def test_simplex_needs_enough_dimensions():
    with pytest.raises(ValueError, match="needs D >= 9"):
        simplex_prototypes(10, 8)


@pytest.mark.parametrize("V,D", [(40, 3), (200, 8), (1000, 32)])
def test_optimised_spread_beats_random_unit_vectors(V, D):
    steps = 150 if V == 1000 else None                              # default budget: 300 steps
    P = spread_prototypes(V, D, seed=1, steps=steps)
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-12)
    worst = max_cosine(P)[0]
    for s in range(3):
        g = np.random.default_rng(s).normal(size=(V, D))
        rnd = max_cosine(g / np.linalg.norm(g, axis=1, keepdims=True))[0]
        assert worst < rnd - 0.1, (worst, rnd)
    assert np.array_equal(spread_prototypes(V, D, seed=1, steps=steps), P)   # deterministic


def test_max_cosine_matches_the_dense_computation():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 4))
    P = g / np.linalg.norm(g, axis=1, keepdims=True)
    C = P @ P.T
    np.fill_diagonal(C, -np.inf)
    m, nn, mx = max_cosine(P, block=7)
    assert m == pytest.approx(C.max()) and np.array_equal(nn, C.argmax(axis=1))


@pytest.mark.parametrize("init,prototype_init", [("mamba", "spread"), ("mamba", "random"), ("reference", "spread")])
def test_hpn_head_prototype_init(init, prototype_init):
    V, D = 20, 8
    head, flat = bound(HPNHead(V, D, prototype_init=prototype_init))
    head.init_params(3, init)
    P = flat.params["head.prototypes"].astype(np.float64)
    if init == "reference":
        assert abs(P.std() - 0.02) < 0.005                          # raw N(0, 0.02^2), as the reference
    elif prototype_init == "spread":
        np.testing.assert_allclose(P, spread_prototypes(V, D, 3), atol=1e-7)
    else:
        np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-6)
        assert max_cosine(P)[0] > max_cosine(spread_prototypes(V, D, 3))[0]


# ------------------------------------------------------------------------------ prototype_separation

def test_prototype_separation_penalty_and_its_gradient():
    rng = np.random.default_rng(21)
    n, V, D, lam = 12, 9, 4, 0.3
    z = rng.normal(size=(n, D)).astype(np.float32)
    t = targets_with_ignore(rng, n, V, 0.2)
    P0 = rng.normal(size=(V, D)).astype(np.float32)

    def run(sep):
        head, flat = bound(HPNHead(V, D, learnable=True, separation=sep))
        flat.params["head.prototypes"][...] = P0
        loss = head.forward(z, t)
        dz = np.zeros_like(z)
        head.backward(dz)
        return loss, dz, flat.grads["head.prototypes"].astype(np.float64)

    l0, dz0, g0 = run(0.0)
    l1, dz1, g1 = run(lam)

    def penalty(P):                                  # float64: lam * largest cosine between two rows
        Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
        C = Pn @ Pn.T
        np.fill_diagonal(C, -np.inf)
        return lam * C.max()

    P64 = P0.astype(np.float64)
    assert l1 - l0 == pytest.approx(penalty(P64), rel=1e-6)
    assert np.array_equal(dz0, dz1)                  # the penalty does not touch z
    h, fd = 1e-6, np.zeros_like(P64)
    for idx in np.ndindex(P64.shape):
        e = np.zeros_like(P64)
        e[idx] = h
        fd[idx] = (penalty(P64 + e) - penalty(P64 - e)) / (2 * h)
    np.testing.assert_allclose(g1 - g0, fd, atol=1e-6)
    assert np.count_nonzero(np.abs(fd).sum(axis=1)) == 2    # only the closest pair moves


def test_prototype_separation_needs_learnable_prototypes():
    with pytest.raises(ValueError, match="needs learnable prototypes"):
        HPNHead(4, 3, learnable=False, separation=0.1)
