"""The whole model: float32 kernels vs the float64 reference, the reference vs finite
differences, the reference vs an independent autograd framework (PyTorch), determinism."""
import numpy as np
import pytest

from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack
from rtrainer.net import Net
from rtrainer.testing.reference import model_loss_and_grads_ref


def build(V=11, D=8, N=3, K=3, R=2, L=2, chunk=4, normalize=True, learnable=True, init="mamba", seed=0,
          n_threads=1):
    model = MambaLiteStack(V, D, N, K, R, L, scan_chunk=chunk, n_threads=n_threads)
    head = HPNHead(V, D, normalize=normalize, learnable=learnable, n_threads=n_threads)
    net = Net(model, head)
    net.init(seed, init)
    flat = net.flat
    # move every tensor off its structured init so that no gradient is accidentally zero
    rng = np.random.default_rng(seed + 100)
    for name, v in flat.params.items():
        if name.endswith("D_skip") or name.endswith("conv_b"):
            v += rng.normal(0, 0.3, v.shape).astype(np.float32)
    return model, head, flat


def step_grads(model, head, flat, ids, targets):
    flat.zero_grad()
    z = model.forward(ids)
    loss = head.forward(z, targets)
    dz = np.zeros_like(z)
    head.backward(dz)
    model.backward(dz)
    return loss, {k: v.copy() for k, v in flat.grads.items()}


def batch(V, B=3, T=7, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)
    return ids, targets


@pytest.mark.parametrize("normalize,learnable", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_model_matches_float64_reference(normalize, learnable, n_threads):
    model, head, flat = build(normalize=normalize, learnable=learnable, n_threads=n_threads)
    ids, targets = batch(model.V)
    loss, grads = step_grads(model, head, flat, ids, targets)
    ref_loss, ref_grads = model_loss_and_grads_ref(
        flat.params, ids, targets, n_layers=model.L, d_state=model.N, dt_rank=model.R,
        normalize_prototypes=normalize, learnable_prototypes=learnable, chunk=model.chunk)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert set(ref_grads) == {s.name for s in flat.specs if s.trainable}
    for name, g in ref_grads.items():
        scale = max(np.abs(g).max(), 1e-3)
        err = np.abs(grads[name] - g).max()
        assert err <= 2e-4 * scale, f"{name}: max abs diff {err:.3e} (grad scale {scale:.3e})"
    if not learnable:
        assert not np.any(grads["head.prototypes"]), "fixed prototypes must receive no gradient"


def test_reference_model_matches_finite_differences():
    model, head, flat = build(V=7, D=5, N=2, K=2, R=1, L=2, chunk=2)
    ids, targets = batch(model.V, B=2, T=5)
    params = {k: v.astype(np.float64) for k, v in flat.params.items()}
    kw = dict(n_layers=2, d_state=2, dt_rank=1, normalize_prototypes=True, learnable_prototypes=True, chunk=2)
    _, grads = model_loss_and_grads_ref(params, ids, targets, **kw)
    rng = np.random.default_rng(3)
    h = 1e-5
    for name, p in params.items():
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            if name == "embedding":  # only rows that are used have a gradient: probe one of them
                idx = (int(ids[0, 0]),) + idx[1:]
            vals = []
            for k in (-2, -1, 1, 2):
                q = {n: a.copy() for n, a in params.items()}
                q[name][idx] += k * h
                vals.append(model_loss_and_grads_ref(q, ids, targets, **kw)[0])
            fd = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
            assert abs(fd - grads[name][idx]) <= 1e-6 + 1e-4 * abs(fd), f"{name}{idx}: fd {fd} vs {grads[name][idx]}"


def test_reference_model_matches_pytorch_autograd():
    pt = pytest.importorskip("rtrainer.testing.parity_torch")
    pytest.importorskip("torch")
    model, head, flat = build(V=13, D=6, N=4, K=3, R=2, L=3, chunk=3)
    ids, targets = batch(model.V, B=2, T=9)
    params = {k: v.astype(np.float64) for k, v in flat.params.items()}
    for normalize in (True, False):
        kw = dict(n_layers=3, d_state=4, dt_rank=2, normalize_prototypes=normalize, learnable_prototypes=True)
        loss, grads = model_loss_and_grads_ref(params, ids, targets, chunk=3, **kw)
        t_loss, t_grads = pt.loss_and_grads(params, ids, targets, dtype="float64", **kw)
        assert abs(loss - t_loss) <= 1e-12 * max(1, abs(loss)), (loss, t_loss)
        for name, g in grads.items():
            err = np.abs(g - t_grads[name]).max()
            assert err <= 1e-10 * max(1.0, np.abs(g).max()), f"{name}: max abs diff {err:.3e} vs torch"


def test_kernels_match_pytorch_float32():
    """The float32 training step against PyTorch autograd in float32 on the same weights."""
    pt = pytest.importorskip("rtrainer.testing.parity_torch")
    pytest.importorskip("torch")
    model, head, flat = build(V=50, D=32, N=8, K=4, R=2, L=2, chunk=8)
    ids, targets = batch(model.V, B=4, T=24)
    loss, grads = step_grads(model, head, flat, ids, targets)
    t_loss, t_grads = pt.loss_and_grads(dict(flat.params), ids, targets, n_layers=2, d_state=8, dt_rank=2,
                                        normalize_prototypes=True, learnable_prototypes=True, dtype="float32")
    assert abs(loss - t_loss) <= 1e-5 * max(1, abs(loss)), (loss, t_loss)
    for name, g in t_grads.items():
        scale = max(np.abs(g).max(), 1e-3)
        err = np.abs(grads[name] - g).max()
        assert err <= 1e-3 * scale, f"{name}: max abs diff {err:.3e} vs torch float32 (scale {scale:.3e})"


@pytest.mark.parametrize("n_threads", [1, 2])
def test_step_is_bitwise_deterministic(n_threads):
    a = step_grads(*build(n_threads=n_threads, V=40, D=24, N=8), *batch(40, B=4, T=33))
    b = step_grads(*build(n_threads=n_threads, V=40, D=24, N=8), *batch(40, B=4, T=33))
    assert a[0] == b[0]
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name]), name


def test_scan_chunk_does_not_change_the_function():
    ids, targets = batch(40, B=2, T=37)
    l4, g4 = step_grads(*build(V=40, D=16, N=4, chunk=4), ids, targets)
    l64, g64 = step_grads(*build(V=40, D=16, N=4, chunk=64), ids, targets)
    assert l4 == l64
    for name in g4:
        np.testing.assert_allclose(g4[name], g64[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_activation_memory_grows_as_BTD_not_BTDN():
    """Activation workspace per token must not scale with d_state N (no state trajectory)."""
    def bytes_per_token(N):
        model, head, flat = build(V=20, D=32, N=N, chunk=64, L=1)
        ids, _ = batch(20, B=2, T=256)
        model.forward(ids)
        return model.activation_bytes() / ids.size
    small, large = bytes_per_token(4), bytes_per_token(64)
    # N x16 adds only the 2N columns of xdbl and the chunk-boundary states (N/chunk per channel)
    assert large < 2.5 * small, (small, large)
    full_trajectory = 32 * 64 * 4  # D*N float32 per token
    assert large < full_trajectory, (large, full_trajectory)


def test_out_of_range_token_is_an_error():
    model, head, flat = build()
    ids, targets = batch(model.V)
    ids[1, 2] = model.V
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        model.forward(ids)
