"""Cross-framework parity of the `mamba` block and of the LTI ablation: the float64 NumPy
reference vs PyTorch autograd (rtrainer/testing/parity_torch.py, an independent implementation) to 1e-10
relative, and the float32 training step (rtrainer's kernels) vs PyTorch in float32: loss to 1e-6
relative, every gradient to 1e-4 of that tensor's largest gradient entry (measured: loss <= 4e-8,
gradients <= 3e-6 at these shapes)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("rtrainer.testing.parity_torch")

from rtrainer.testing.reference import mamba_model_loss_and_grads_ref, model_loss_and_grads_ref  # noqa: E402
from test_mamba_model import batch, build, build_net, step_grads  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("layer,selective,normalize", [
    ("mamba", True, True), ("mamba", True, False), ("mamba", False, True), ("mamba-lite", False, True)])
def test_reference_matches_pytorch_float64(layer, selective, normalize):
    model, head, flat = build(V=13, D=6, N=4, K=3, R=2, E=2, L=3, chunk=3, layer=layer, selective=selective)
    ids, targets = batch(model.V, B=2, T=9)
    params = {k: v.astype(np.float64) for k, v in flat.params.items()}
    params["head.prototypes"] *= np.random.default_rng(5).uniform(0.5, 2.0, (13, 1))  # non-unit rows
    kw = dict(n_layers=3, d_state=4, normalize_prototypes=normalize, learnable_prototypes=True, chunk=3,
              selective=selective)
    if layer == "mamba":
        loss, grads = mamba_model_loss_and_grads_ref(params, ids, targets, **kw)
    else:
        loss, grads = model_loss_and_grads_ref(params, ids, targets, dt_rank=2, **kw)
    kw.pop("chunk")
    t_loss, t_grads = pt.mamba_loss_and_grads(params, ids, targets, dt_rank=2, expand=2, layer=layer,
                                              dtype="float64", **kw)
    assert abs(loss - t_loss) <= 1e-12 * max(1, abs(loss)), (loss, t_loss)
    assert set(grads) == set(t_grads)
    for name, g in grads.items():
        err = np.abs(g - t_grads[name]).max()
        assert err <= 1e-10 * max(1.0, np.abs(g).max()), f"{name}: max abs diff {err:.3e} vs torch"


@pytest.mark.parametrize("selective", [True, False])
def test_kernels_match_pytorch_float32(selective):
    """The float32 training step against PyTorch autograd in float32 on the same weights."""
    model, head, flat = build(V=50, D=32, N=8, K=4, R=2, E=2, L=2, chunk=8, selective=selective)
    ids, targets = batch(model.V, B=4, T=24)
    loss, grads = step_grads(model, head, flat, ids, targets)
    t_loss, t_grads = pt.mamba_loss_and_grads(dict(flat.params), ids, targets, n_layers=2, d_state=8, dt_rank=2,
                                              expand=2, selective=selective, normalize_prototypes=True,
                                              learnable_prototypes=True, dtype="float32")
    assert abs(loss - t_loss) <= 1e-6 * max(1, abs(loss)), (loss, t_loss)
    assert set(t_grads) == {s.name for s in flat.specs if s.trainable}
    for name, g in t_grads.items():
        scale = max(np.abs(g).max(), 1e-3)
        err = np.abs(grads[name] - g).max()
        assert err <= 1e-4 * scale, f"{name}: max abs diff {err:.3e} vs torch float32 (scale {scale:.3e})"


def test_torch_module_matches_functional_oracle():
    """The nn.Module used as the benchmark peer computes the same loss as the functional oracle and
    its first AdamW step changes the loss."""
    model, head, flat = build(V=20, D=8, N=4, K=4, R=1, E=2, L=2, chunk=8)
    ids, targets = batch(20, B=2, T=12)
    params = {k: v.copy() for k, v in flat.params.items()}
    t_loss, _ = pt.mamba_loss_and_grads(params, ids, targets, n_layers=2, d_state=4, dt_rank=1, expand=2,
                                        learnable_prototypes=False, dtype="float32")
    m = pt.build_torch_mamba_model(params, n_layers=2, d_state=4, lr=1e-2,
                                   decay_names=[s.name for s in flat.specs if s.decay])
    l1 = m.train_step(ids, targets)
    l2 = m.train_step(ids, targets)
    assert abs(l1 - t_loss) <= 1e-6 * max(1, abs(t_loss)), (l1, t_loss)
    assert l2 != l1


@pytest.mark.parametrize("layer,selective", [("mamba", True), ("mamba", False), ("mamba-lite", False)])
def test_reference_matches_jax_float64(layer, selective):
    """The second independent oracle (skipped without jax)."""
    pytest.importorskip("jax")
    pj = pytest.importorskip("rtrainer.testing.parity_jax")
    model, head, flat = build(V=13, D=6, N=4, K=3, R=2, E=2, L=2, chunk=3, layer=layer, selective=selective)
    ids, targets = batch(model.V, B=2, T=9)
    params = {k: v.astype(np.float64) for k, v in flat.params.items()}
    kw = dict(n_layers=2, d_state=4, normalize_prototypes=True, learnable_prototypes=True, selective=selective)
    if layer == "mamba":
        loss, grads = mamba_model_loss_and_grads_ref(params, ids, targets, chunk=3, **kw)
    else:
        loss, grads = model_loss_and_grads_ref(params, ids, targets, dt_rank=2, chunk=3, **kw)
    j_loss, j_grads = pj.mamba_loss_and_grads(params, ids, targets, layer=layer, dtype="float64", **kw)
    assert abs(loss - j_loss) <= 1e-10 * max(1, abs(loss)), (loss, j_loss)
    assert set(grads) == set(j_grads)
    for name, g in grads.items():
        err = np.abs(g - j_grads[name]).max()
        assert err <= 1e-10 * max(1.0, np.abs(g).max()), f"{name}: max abs diff {err:.3e} vs jax"


def test_jax_mamba_train_step_matches_rtrainer_two_steps():
    """bench/compare.py's JAX peer for --layer mamba: its first two losses (the second after one
    AdamW update, so gradients and optimizer enter) equal rtrainer's float32 step."""
    pytest.importorskip("jax")
    pj = pytest.importorskip("rtrainer.testing.parity_jax")
    from rtrainer.optim import AdamW
    from rtrainer.step import NoFaults, train_step

    net = build_net(V=30, D=16, N=4, K=4, R=1, E=2, L=2, chunk=8, learnable=False)
    flat = net.flat
    ids, targets = batch(30, B=2, T=10)
    params = {k: v.copy() for k, v in flat.params.items()}
    decay = [s.name for s in flat.specs if s.decay and s.trainable]
    js = pj.build_jax_train_step(params, n_layers=2, d_state=4, dt_rank=1, learnable_prototypes=False,
                                 lr=1e-2, decay_names=decay, fast_compile=True, layer="mamba")
    opt = AdamW(flat, n_threads=1)
    for _ in range(2):
        loss = train_step(net, opt, ids, targets, 1e-2, faults=NoFaults()).loss
        j_loss = js.step(ids, targets)
        assert abs(loss - j_loss) <= 1e-6 * max(1.0, abs(loss)), (loss, j_loss)
    jp = js.params()
    for name in ("layers.0.in_proj_w", "layers.1.out_proj_w", "layers.0.A_log", "embedding"):
        np.testing.assert_allclose(flat.params[name], jp[name], rtol=0, atol=2e-5, err_msg=name)
