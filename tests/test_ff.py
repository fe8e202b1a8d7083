"""The Forward-Forward objective on D_skip (docs/staged-training.md): h+/h- against a loop, the loss against
its definition, and its TRUE gradient (with the normalisation term) against finite differences."""
import numpy as np
import pytest

from rtrainer.ff import ff_loss, ff_loss_grad, ff_vectors


def test_vectors_match_a_loop():
    rng = np.random.default_rng(1)
    B, T, D = 3, 5, 4
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    hp, hn = ff_vectors(x)
    ep, en = np.zeros(D), np.zeros(D)
    for b in range(B):
        for t in range(T):
            for d in range(D):
                ep[d] += x[b, t, d]
                en[d] += x[b, (t + 1) % T, d] * (1 if (t + d) % 2 == 0 else -1)
    np.testing.assert_allclose(hp, ep / (B * T), rtol=1e-12)
    np.testing.assert_allclose(hn, en / (B * T), rtol=1e-12, atol=1e-15)


def _def_loss(theta, hp, hn, margin):
    def g(h):
        s = np.sqrt(np.mean((h - h.mean()) ** 2)) + 1e-5
        return np.sum(h / s * theta / (np.linalg.norm(theta) + 1e-5))
    return max(0.0, margin - (g(hp) - g(hn)))


@pytest.mark.parametrize("seed", range(5))
def test_gradient_matches_finite_differences(seed):
    rng = np.random.default_rng(seed)
    D = 7
    hp, hn, theta = rng.normal(size=D), rng.normal(size=D), rng.normal(size=D)
    margin = 10.0   # hinge active
    L, g = ff_loss_grad(theta, hp, hn, margin)
    assert L == pytest.approx(_def_loss(theta, hp, hn, margin), rel=1e-12)
    assert L == pytest.approx(ff_loss(theta, hp, hn, margin), rel=1e-12)
    h = 1e-4
    fd = np.zeros(D)
    for i in range(D):   # 4th-order central differences
        e = np.zeros(D)
        e[i] = h
        f = lambda t: ff_loss(t, hp, hn, margin)
        fd[i] = (-f(theta + 2 * e) + 8 * f(theta + e) - 8 * f(theta - e) + f(theta - 2 * e)) / (12 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)
    # the reference's gradient -a/n (no normalisation term) is measurably different
    a = hp / (np.std(hp) + 1e-5) - hn / (np.std(hn) + 1e-5)
    assert np.max(np.abs(-a / (np.linalg.norm(theta) + 1e-5) - fd)) > 1e-3


def test_zero_loss_has_zero_gradient():
    rng = np.random.default_rng(3)
    hp, hn = rng.normal(size=6), rng.normal(size=6)
    a = hp / (np.std(hp) + 1e-5) - hn / (np.std(hn) + 1e-5)
    L, g = ff_loss_grad(a * 5.0, hp, hn, margin=1.0)   # theta along a: G = |a| >> 1
    assert L == 0.0 and not np.any(g)
