"""The JAX parity oracle (rtrainer/testing/parity_jax.py) against rtrainer.

float64: JAX autograd loss and every gradient vs the float64 NumPy reference
(`model_loss_and_grads_ref`) to 1e-10 relative. float32: one jit-compiled JAX AdamW step
(`build_jax_train_step`) vs one rtrainer training step assembled from the kernels as
bench/bench_step.py does (forward, HPN loss, backward, grad norm, fused AdamW).
Skipped when jax is not installed (it is an optional extra).
"""
import math

import numpy as np
import pytest

pytest.importorskip("jax")
pj = pytest.importorskip("rtrainer.testing.parity_jax")

from rtrainer.heads import HPNHead  # noqa: E402
from rtrainer.model import MambaLiteStack  # noqa: E402
from rtrainer.optim import AdamW  # noqa: E402
from rtrainer.net import Net  # noqa: E402
from rtrainer.testing.reference import model_loss_and_grads_ref  # noqa: E402


def build(V, D, N, K, R, L, chunk, normalize=True, learnable=True, seed=0):
    """rtrainer model + head on one flat buffer, as tests/test_model.py builds them."""
    model = MambaLiteStack(V, D, N, K, R, L, scan_chunk=chunk, n_threads=1)
    head = HPNHead(V, D, normalize=normalize, learnable=learnable, n_threads=1)
    net = Net(model, head)
    net.init(seed, "mamba")
    flat = net.flat
    # move every tensor off its structured init so that no gradient is accidentally zero
    rng = np.random.default_rng(seed + 100)
    for name, v in flat.params.items():
        if name.endswith("D_skip") or name.endswith("conv_b"):
            v += rng.normal(0, 0.3, v.shape).astype(np.float32)
    return model, head, flat


def batch(V, B, T, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)
    return ids, targets


@pytest.mark.parametrize("normalize", [True, False])
def test_float64_loss_and_grads_match_reference(normalize):
    model, head, flat = build(V=13, D=6, N=4, K=3, R=2, L=3, chunk=3)
    ids, targets = batch(13, B=2, T=9)
    params = {k: v.astype(np.float64) for k, v in flat.params.items()}
    # non-unit prototype rows, so that normalize_prototypes matters
    params["head.prototypes"] *= np.random.default_rng(5).uniform(0.5, 2.0, (13, 1))
    snapshot = {k: v.copy() for k, v in params.items()}
    kw = dict(n_layers=3, d_state=4, dt_rank=2, normalize_prototypes=normalize,
              learnable_prototypes=True)
    loss, grads = model_loss_and_grads_ref(params, ids, targets, chunk=3, **kw)
    j_loss, j_grads = pj.loss_and_grads(params, ids, targets, dtype="float64", fast_compile=True, **kw)
    assert abs(loss - j_loss) <= 1e-10 * abs(loss), (loss, j_loss)
    assert set(j_grads) == set(grads) == set(params)
    for name, g in grads.items():
        jg = j_grads[name]
        assert jg.dtype == np.float64 and jg.shape == g.shape, name
        err = np.abs(g - jg).max()
        assert err <= 1e-10 * np.abs(g).max(), f"{name}: max abs diff {err:.3e} vs reference"
    for k in params:  # inputs untouched
        np.testing.assert_array_equal(params[k], snapshot[k])


def test_float32_fixed_prototypes_and_bad_inputs():
    model, head, flat = build(V=13, D=6, N=4, K=3, R=2, L=1, chunk=3, learnable=False)
    ids, targets = batch(13, B=2, T=5)
    params = dict(flat.params)
    kw = dict(n_layers=1, d_state=4, dt_rank=2, learnable_prototypes=False)
    l32, g32 = pj.loss_and_grads(params, ids, targets, dtype="float32", fast_compile=True, **kw)
    l64, g64 = model_loss_and_grads_ref(params, ids, targets, chunk=3, **kw)
    assert abs(l32 - l64) <= 1e-5 * max(1.0, abs(l64))
    assert set(g32) == set(g64) == set(params) - {"head.prototypes"}
    for n, g in g64.items():
        assert g32[n].dtype == np.float32
        assert np.abs(g32[n] - g).max() <= 1e-4 * max(1e-3, np.abs(g).max()), n
    bad = ids.copy()
    bad[0, 0] = 13
    with pytest.raises(ValueError, match="ids out of range"):
        pj.loss_and_grads(params, bad, targets, **kw)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="targets out of range"):
        pj.loss_and_grads(params, ids, bad, **kw)
    q = dict(params)
    del q["layers.0.A_log"]
    with pytest.raises(ValueError, match="layers.0.A_log"):
        pj.loss_and_grads(q, ids, targets, **kw)


def test_softplus_threshold_and_zero_norms():
    import jax
    import jax.numpy as jnp

    with pj.float64():   # float64 only inside this block (the oracle's import changes nothing)
        _check_softplus_and_zero_norms(jax, jnp)


def _check_softplus_and_zero_norms(jax, jnp):
    x = jnp.array([-30.0, -1.0, 0.0, 19.9, 20.0, 20.1, 50.0], dtype=jnp.float64)
    sp = np.asarray(jax.jit(pj._softplus)(x))
    ref = np.where(np.asarray(x) > 20, np.asarray(x), np.log1p(np.exp(np.minimum(np.asarray(x), 20))))
    np.testing.assert_allclose(sp, ref, rtol=1e-15, atol=0)
    d = np.asarray(jax.jit(jax.vmap(jax.grad(pj._softplus)))(x))
    np.testing.assert_allclose(d, np.where(np.asarray(x) > 20, 1.0, 1 / (1 + np.exp(-np.asarray(x)))),
                               rtol=1e-15)
    # z = 0: zhat = 0 (norm floored at 1e-8), cos 0, loss 1, finite gradients
    z0 = jnp.zeros((3, 4), jnp.float64)
    P = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)))
    tg = jnp.array([0, 1, 4])
    f = lambda z, P: pj.hpn_loss(z, P, tg)[0]  # noqa: E731
    loss, (gz, gP) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z0, P)
    assert float(loss) == 1.0
    assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gP))


def _rtrainer_step(flat, model, head, opt, ids, targets, lr):
    B, T = ids.shape
    flat.zero_grad()
    z = model.forward(ids)
    loss = head.forward(z, targets)
    dz = np.zeros((B * T, model.D), np.float32)
    head.backward(dz)
    model.backward(dz)
    opt.step(lr, opt.clip_scale(opt.grad_norm()))
    return loss


@pytest.mark.parametrize("learnable", [False, True])
def test_train_step_matches_rtrainer_float32(learnable):
    V, D, N, K, R, L, B, T = 50, 32, 8, 4, 2, 2, 4, 24
    lr, wd = 1e-3, 0.1
    model, head, flat = build(V, D, N, K, R, L, chunk=8, learnable=learnable)
    opt = AdamW(flat, weight_decay=wd, n_threads=1)
    ids, targets = batch(V, B, T)
    p0 = {k: v.copy() for k, v in flat.params.items()}

    step = pj.build_jax_train_step(p0, n_layers=L, d_state=N, dt_rank=R,
                                   learnable_prototypes=learnable, lr=lr, weight_decay=wd,
                                   fast_compile=learnable)  # the benchmark's setting fully optimised
    j_loss = step.step(ids, targets)
    r_loss = _rtrainer_step(flat, model, head, opt, ids, targets, lr)
    assert abs(j_loss - r_loss) <= 1e-5 * max(1.0, abs(r_loss)), (j_loss, r_loss)
    assert step.compile_seconds is not None and step.compile_seconds > 0

    jp = step.params()
    assert list(jp) == list(flat.params) and all(a.dtype == np.float32 for a in jp.values())
    j_m, j_v = step.moments()
    trained = {s.name for s in flat.specs if s.trainable}
    assert set(j_m) == trained
    views_m, views_v = flat.views(flat.m), flat.views(flat.v)
    for name, p_r in flat.params.items():
        if name not in trained:  # fixed prototypes: bitwise unchanged on both sides
            np.testing.assert_array_equal(jp[name], p0[name])
            np.testing.assert_array_equal(p_r, p0[name])
            continue
        # step 1: m = 0.1 g, v = 0.001 g^2: the moments compare the float32 gradients
        m_scale = max(np.abs(views_m[name]).max(), 1e-12)
        assert np.abs(j_m[name] - views_m[name]).max() <= 1e-4 * m_scale, name
        sv_r, sv_j = np.sqrt(views_v[name]), np.sqrt(j_v[name])
        assert np.abs(sv_j - sv_r).max() <= 1e-4 * max(sv_r.max(), 1e-12), name
        # the update is ~lr*sign(g) + decay; measured agreement ~2e-4*lr (float32 rounding of p)
        du = np.abs((jp[name] - p0[name]) - (p_r - p0[name]))
        assert du.max() <= 1e-2 * lr, f"{name}: updates differ by {du.max() / lr:.2e} lr"
    # decayed tensors moved by the decay too: an unused embedding row moves by exactly -lr*wd*p
    unused = sorted(set(range(V)) - set(ids.ravel().tolist()))
    if unused:
        r = unused[0]
        np.testing.assert_allclose(jp["embedding"][r], p0["embedding"][r] * (1 - lr * wd), rtol=1e-6)
        np.testing.assert_allclose(flat.params["embedding"][r], jp["embedding"][r], rtol=1e-6)
    # a second step continues (bias correction counted in updates) and still agrees
    j2 = step.step(ids, targets)
    r2 = _rtrainer_step(flat, model, head, opt, ids, targets, lr)
    assert abs(j2 - r2) <= 1e-4 * max(1.0, abs(r2)), (j2, r2)
    assert j2 < j_loss


def test_default_decay_names_match_rtrainer():
    model, head, flat = build(V=7, D=4, N=2, K=2, R=1, L=2, chunk=2)
    rt = {s.name for s in flat.specs if s.decay}
    assert set(pj.default_decay_names(list(flat.params))) == rt
