"""Self-checks of the PyTorch parity oracle (rtrainer/testing/parity_torch.py).

The oracle is only worth something if it is itself right, so: autograd gradients vs 4th-order
central finite differences (float64, a few random coordinates of every tensor), the whole forward
vs a plain float64 numpy transcription of the mamba-lite model (conv taps, softplus threshold, LayerNorm
eps and biased variance, scan, HPN head), the three scan variants vs each other, the AdamW
reference vs the closed-form update, and the nn.Module vs the functional oracle.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("rtrainer.testing.parity_torch")

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin against a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


CFG = dict(vocab_size=7, d_model=5, n_layers=2, d_state=3, d_conv=3, dt_rank=2)
B, T = 2, 5


def _setup(seed=0, **over):
    cfg = {**CFG, **over}
    p = pt.init_params(**cfg, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 100)
    # larger-than-init dt weights so delta varies per token and every tensor matters
    for i in range(cfg["n_layers"]):
        p[f"layers.{i}.dt_proj_w"] = rng.standard_normal(p[f"layers.{i}.dt_proj_w"].shape)
        p[f"layers.{i}.dt_proj_b"] = rng.uniform(-2.0, 0.5, p[f"layers.{i}.dt_proj_b"].shape)
        p[f"layers.{i}.A_log"] += 0.1 * rng.standard_normal(p[f"layers.{i}.A_log"].shape)
        p[f"layers.{i}.D_skip"] += 0.3 * rng.standard_normal(p[f"layers.{i}.D_skip"].shape)
    p["head.prototypes"] *= rng.uniform(0.5, 2.0, (cfg["vocab_size"], 1))  # non-unit rows
    ids = rng.integers(0, cfg["vocab_size"], (B, T))
    targets = rng.integers(0, cfg["vocab_size"], (B, T))
    return cfg, p, ids, targets


def _loss_only(p, ids, targets, cfg, normalize, scan="loop"):
    with torch.no_grad():
        tp = {k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()}
        return float(pt.forward_loss(tp, torch.tensor(ids), torch.tensor(targets),
                                     n_layers=cfg["n_layers"], d_state=cfg["d_state"],
                                     normalize_prototypes=normalize, scan=scan))


# ------------------------------------------------------------------ plain numpy transcription

def _softplus_np(x):
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def _model_loss_np(p, ids, targets, *, n_layers, d_state, normalize):
    """The mamba-lite model in float64 numpy with explicit loops (independent of torch's conv1d/layer_norm)."""
    N = d_state
    r = p["embedding"][ids].copy()                                   # (B,T,D)
    Bsz, T_, D = r.shape
    for i in range(n_layers):
        g = lambda n: p[f"layers.{i}.{n}"]  # noqa: E731
        K = g("conv_w").shape[1]
        pre = np.broadcast_to(g("conv_b"), r.shape).copy()
        for t in range(T_):
            for k in range(K):
                s = t + k - (K - 1)
                if s >= 0:
                    pre[:, t] += g("conv_w")[:, k] * r[:, s]
        u = pre / (1.0 + np.exp(-pre))
        xdbl = u @ g("x_proj_w")
        Bt, Ct, draw = xdbl[..., :N], xdbl[..., N:2 * N], xdbl[..., 2 * N:]
        delta = _softplus_np(draw @ g("dt_proj_w") + g("dt_proj_b"))
        A = -np.exp(g("A_log"))
        y = np.empty_like(u)
        for b in range(Bsz):
            h = np.zeros((D, N))
            for t in range(T_):
                h = np.exp(delta[b, t][:, None] * A) * h + np.outer(delta[b, t] * u[b, t], Bt[b, t])
                y[b, t] = h @ Ct[b, t] + g("D_skip") * u[b, t]
        r = r + y @ g("out_proj_w")
    mu = r.mean(-1, keepdims=True)
    var = ((r - mu) ** 2).mean(-1, keepdims=True)
    z = (r - mu) / np.sqrt(var + 1e-5)
    zhat = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
    P = p["head.prototypes"]
    if normalize:
        P = P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-8)
    cos = (zhat * P[targets]).sum(-1)
    return float(np.mean((1.0 - cos) ** 2)), z


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("normalize,learnable", [(True, True), (False, True), (True, False)])
def test_gradients_match_finite_differences(normalize, learnable):
    cfg, p, ids, targets = _setup(seed=1)
    loss, grads = pt.loss_and_grads(p, ids, targets, n_layers=cfg["n_layers"],
                                    d_state=cfg["d_state"], dt_rank=cfg["dt_rank"],
                                    normalize_prototypes=normalize,
                                    learnable_prototypes=learnable)
    assert math.isclose(loss, _loss_only(p, ids, targets, cfg, normalize), rel_tol=1e-14)
    expected = set(p) - (set() if learnable else {"head.prototypes"})
    assert set(grads) == expected
    rng = np.random.default_rng(7)
    h = 1e-3
    for name in sorted(expected):
        g = grads[name]
        assert g.dtype == np.float64 and g.shape == p[name].shape, name
        flat_idx = list(rng.choice(g.size, size=min(3, g.size), replace=False))
        if name in ("embedding", "head.prototypes"):  # only used rows have nonzero gradient
            row = int((ids if name == "embedding" else targets)[0, 0])
            flat_idx.append(row * g.shape[1] + int(rng.integers(g.shape[1])))
        for fi in flat_idx:
            idx = np.unravel_index(fi, g.shape)
            vals = []
            for step in (-2, -1, 1, 2):
                q = dict(p)
                q[name] = p[name].copy()
                q[name][idx] += step * h
                vals.append(_loss_only(q, ids, targets, cfg, normalize))
            fd = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
            err = abs(fd - g[idx])
            assert err <= 1e-8 + 1e-6 * abs(fd), f"{name}{idx}: autograd {g[idx]!r} fd {fd!r} diff {err:.3e}"


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_matches_numpy_transcription(normalize):
    cfg, p, ids, targets = _setup(seed=2)
    p["layers.0.dt_proj_b"][0] = 25.0   # softplus(x) = x branch (threshold 20) for channel 0
    p["layers.1.dt_proj_b"][1] = 19.0   # just below the threshold: log1p(exp(x))
    ref, z_ref = _model_loss_np(p, ids, targets, n_layers=cfg["n_layers"],
                                d_state=cfg["d_state"], normalize=normalize)
    with torch.no_grad():
        tp = {k: torch.tensor(v) for k, v in p.items()}
        got, aux = pt.forward_loss(tp, torch.tensor(ids), torch.tensor(targets),
                                   n_layers=cfg["n_layers"], d_state=cfg["d_state"],
                                   normalize_prototypes=normalize, return_aux=True)
    got = float(got)
    assert abs(got - ref) <= 1e-12 * max(1.0, abs(ref)), f"torch {got!r} numpy {ref!r}"
    # the HPN loss is invariant to a per-token scale of z, so LayerNorm's eps is only visible in z
    err = np.abs(aux["z"].numpy() - z_ref).max()
    assert err <= 1e-12, f"z: max abs diff {err:.3e}"


def test_softplus_convention():
    x = torch.tensor([-30.0, -1.0, 0.0, 19.9, 20.0, 20.1, 50.0], dtype=torch.float64)
    got = torch.nn.functional.softplus(x, beta=1.0, threshold=pt.SOFTPLUS_THRESHOLD)
    np.testing.assert_allclose(got.numpy(), _softplus_np(x.numpy()), rtol=1e-15, atol=0)
    assert got[-2].item() == 20.1 and got[-1].item() == 50.0


def test_conv_conventions():
    rng = np.random.default_rng(3)
    Bsz, T_, D, K = 2, 6, 4, 3
    x = torch.tensor(rng.standard_normal((Bsz, T_, D)))
    w = torch.zeros(D, K, dtype=torch.float64)
    w[:, K - 1] = 1.0                                   # current step only -> identity
    b = torch.zeros(D, dtype=torch.float64)
    torch.testing.assert_close(pt.causal_conv(x, w, b), x, rtol=0, atol=0)
    w = torch.zeros(D, K, dtype=torch.float64)
    w[:, K - 2] = 1.0                                   # previous step, zero left pad
    shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    torch.testing.assert_close(pt.causal_conv(x, w, b), shifted, rtol=0, atol=0)
    w = torch.tensor(rng.standard_normal((D, K)))
    b = torch.tensor(rng.standard_normal(D))
    ref = b.expand(Bsz, T_, D).clone()
    for t in range(T_):
        for k in range(K):
            if t + k - (K - 1) >= 0:
                ref[:, t] += w[:, k] * x[:, t + k - (K - 1)]
    torch.testing.assert_close(pt.causal_conv(x, w, b), ref, rtol=1e-14, atol=1e-14)


def _scan_inputs(T_, seed=4):
    rng = np.random.default_rng(seed)
    Bsz, D, N = 2, 3, 4
    f = lambda *s: torch.tensor(rng.standard_normal(s))  # noqa: E731
    u, Bt, Ct = f(Bsz, T_, D), f(Bsz, T_, N), f(Bsz, T_, N)
    delta = torch.tensor(rng.uniform(1e-3, 0.5, (Bsz, T_, D)))
    A = -torch.exp(f(D, N) * 0.3)
    D_skip = f(D)
    return u, delta, A, Bt, Ct, D_skip


@pytest.mark.parametrize("scan", ["loop", "vectorised", "chunked"])
def test_single_step_scan(scan):
    u, delta, A, Bt, Ct, D_skip = _scan_inputs(T_=1)
    y = pt.selective_scan(u, delta, A, Bt, Ct, D_skip, scan=scan)
    expected = delta * u * (Bt * Ct).sum(-1, keepdim=True) + D_skip * u   # h_{-1} = 0
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)


def test_two_step_scan_by_hand():
    u, delta, A, Bt, Ct, D_skip = _scan_inputs(T_=2)
    h0 = (delta[:, 0] * u[:, 0])[..., None] * Bt[:, 0, None, :]
    h1 = torch.exp(delta[:, 1, :, None] * A) * h0 + (delta[:, 1] * u[:, 1])[..., None] * Bt[:, 1, None, :]
    y1 = (h1 * Ct[:, 1, None, :]).sum(-1) + D_skip * u[:, 1]
    y = pt.selective_scan(u, delta, A, Bt, Ct, D_skip, scan="loop")
    torch.testing.assert_close(y[:, 1], y1, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_scan_variants_agree(chunk):
    cfg, p, ids, targets = _setup(seed=5)
    ids = np.concatenate([ids, ids[:, :2]], axis=1)       # T = 7: ragged last chunk
    targets = np.concatenate([targets, targets[:, :2]], axis=1)
    kw = dict(n_layers=cfg["n_layers"], d_state=cfg["d_state"], dt_rank=cfg["dt_rank"])
    l0, g0 = pt.loss_and_grads(p, ids, targets, scan="loop", **kw)
    for scan in ("vectorised", "chunked"):
        l1, g1 = pt.loss_and_grads(p, ids, targets, scan=scan, chunk=chunk, **kw)
        assert math.isclose(l0, l1, rel_tol=1e-13), (scan, l0, l1)
        for n in g0:
            err = np.abs(g0[n] - g1[n]).max()
            assert err <= 1e-12 * max(1.0, np.abs(g0[n]).max()), f"{scan} {n}: max abs diff {err:.3e}"


def test_layernorm_and_hpn_conventions():
    cfg, p, ids, targets = _setup(seed=6)
    tp = {k: torch.tensor(v) for k, v in p.items()}
    loss, aux = pt.forward_loss(tp, torch.tensor(ids), torch.tensor(targets),
                                n_layers=cfg["n_layers"], d_state=cfg["d_state"], return_aux=True)
    z = aux["z"].detach().numpy()
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-14)
    # biased variance: mean(z^2) = var / (var + eps) < 1
    assert np.all(np.mean(z ** 2, -1) < 1.0)
    # HPN: z = 0 gives zhat = 0 (norm clamped at 1e-8), cos 0, loss 1, finite gradient
    z0 = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    P = torch.tensor(np.random.default_rng(0).standard_normal((5, 4)), requires_grad=True)
    l0, cos = pt.hpn_loss(z0, P, torch.tensor([0, 1, 4]))
    assert l0.item() == 1.0 and torch.all(cos == 0)
    l0.backward()
    assert torch.isfinite(z0.grad).all() and torch.isfinite(P.grad).all()
    # normalised: scaling a prototype row does not change the loss; raw: it does
    P2 = P.detach().clone()
    P2[1] *= 3.0
    zz = torch.tensor(np.random.default_rng(1).standard_normal((3, 4)))
    tg = torch.tensor([0, 1, 4])
    a, _ = pt.hpn_loss(zz, P.detach(), tg, normalize_prototypes=True)
    b_, _ = pt.hpn_loss(zz, P2, tg, normalize_prototypes=True)
    assert abs(a.item() - b_.item()) < 1e-14
    a, _ = pt.hpn_loss(zz, P.detach(), tg, normalize_prototypes=False)
    b_, _ = pt.hpn_loss(zz, P2, tg, normalize_prototypes=False)
    assert abs(a.item() - b_.item()) > 1e-6


def test_bad_inputs_are_errors():
    cfg, p, ids, targets = _setup(seed=7)
    kw = dict(n_layers=cfg["n_layers"], d_state=cfg["d_state"], dt_rank=cfg["dt_rank"])
    bad = ids.copy()
    bad[0, 0] = cfg["vocab_size"]
    with pytest.raises(ValueError, match="ids out of range"):
        pt.loss_and_grads(p, bad, targets, **kw)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="targets out of range"):
        pt.loss_and_grads(p, ids, bad, **kw)
    q = dict(p)
    del q["layers.1.A_log"]
    with pytest.raises(ValueError, match="layers.1.A_log"):
        pt.loss_and_grads(q, ids, targets, **kw)


def test_float32_grads_close_to_float64():
    cfg, p, ids, targets = _setup(seed=8)
    kw = dict(n_layers=cfg["n_layers"], d_state=cfg["d_state"], dt_rank=cfg["dt_rank"])
    l64, g64 = pt.loss_and_grads(p, ids, targets, dtype="float64", **kw)
    l32, g32 = pt.loss_and_grads(p, ids, targets, dtype="float32", **kw)
    assert abs(l64 - l32) < 1e-5
    for n in g64:
        assert g32[n].dtype == np.float32
        err = np.abs(g64[n] - g32[n]).max()
        assert err <= 1e-4 * max(1.0, np.abs(g64[n]).max()), f"{n}: {err:.3e}"


def test_adamw_reference_step_closed_form():
    rng = np.random.default_rng(9)
    shapes = {"w": (3, 4), "b": (4,), "frozen": (2,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    m = {k: rng.standard_normal(s) * 0.1 for k, s in shapes.items()}
    v = {k: rng.uniform(0.0, 0.1, s) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(shapes[k]) for k in ("w", "b")}
    lr, (b1, b2), eps, wd, step = 1e-2, (0.9, 0.999), 1e-8, 0.1, 3
    snapshot = {k: a.copy() for k, a in params.items()}
    p2, m2, v2 = pt.adamw_reference_step(params, grads, m, v, step=step, lr=lr, betas=(b1, b2),
                                         eps=eps, weight_decay=wd, decay_names=["w"])
    for k in params:                                     # inputs untouched
        np.testing.assert_array_equal(params[k], snapshot[k])
    for k in ("w", "b"):
        decay = wd if k == "w" else 0.0
        me = b1 * m[k] + (1 - b1) * grads[k]
        ve = b2 * v[k] + (1 - b2) * grads[k] ** 2
        pe = params[k] * (1 - lr * decay) - (lr / (1 - b1 ** step)) * me / (
            np.sqrt(ve) / math.sqrt(1 - b2 ** step) + eps)
        np.testing.assert_allclose(m2[k], me, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(v2[k], ve, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(p2[k], pe, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(p2["frozen"], params["frozen"])
    np.testing.assert_array_equal(m2["frozen"], m["frozen"])
    np.testing.assert_array_equal(v2["frozen"], v["frozen"])
    p32 = {k: a.astype(np.float32) for k, a in params.items()}
    out32 = pt.adamw_reference_step(p32, grads, m, v, step=1, lr=lr, betas=(b1, b2), eps=eps,
                                    weight_decay=wd, decay_names=["w"])[0]
    assert out32["w"].dtype == np.float32


def test_torch_module_matches_functional_oracle():
    cfg, p, ids, targets = _setup(seed=10)
    model = pt.build_torch_model(**cfg, params=p, dtype="float64", lr=1e-2, weight_decay=0.1,
                                 scan="vectorised")
    names = [n for n, _ in model.named_parameters()]
    assert names == list(pt.param_shapes(**cfg))
    kw = dict(n_layers=cfg["n_layers"], d_state=cfg["d_state"], dt_rank=cfg["dt_rank"])
    loss, grads = pt.loss_and_grads(p, ids, targets, **kw)
    l_mod = model.forward_backward(torch.tensor(ids), torch.tensor(targets))
    assert math.isclose(loss, l_mod, rel_tol=1e-13)
    for n, q in model.named_parameters():
        np.testing.assert_allclose(q.grad.numpy(), grads[n], rtol=1e-10, atol=1e-13, err_msg=n)
    # train_step == functional AdamW on the same grads; matrices decay, vectors do not
    zeros = {k: np.zeros_like(a) for k, a in p.items()}
    model2 = pt.build_torch_model(**cfg, params=p, dtype="float64", lr=1e-2, weight_decay=0.1)
    model2.train_step(ids, targets)
    decay = [n for n, a in p.items() if a.ndim >= 2]
    p_ref, _, _ = pt.adamw_reference_step(p, grads, zeros, zeros, step=1, lr=1e-2,
                                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                          decay_names=decay)
    for n, q in model2.named_parameters():
        np.testing.assert_allclose(q.detach().numpy(), p_ref[n], rtol=1e-12, atol=1e-14, err_msg=n)
    # fixed prototypes: a buffer under the same name, no gradient
    model3 = pt.build_torch_model(**cfg, params=p, dtype="float64", learnable_prototypes=False)
    assert "head.prototypes" not in dict(model3.named_parameters())
    assert "head.prototypes" in model3.state_dict()
