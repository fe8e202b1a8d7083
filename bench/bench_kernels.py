"""Kernel throughput at the reference baseline shape, plus machine and framework references.

One benchmark per kernel forward and backward (rtrainer._kernels.*; a module that is not built yet
is skipped), numpy's float32 1024^3 GEMM as the machine reference (GFLOP/s), the numpy matmuls of
one mamba-lite layer (the model's projection route), and the PyTorch eager forward+backward (and
train step) of the same L-layer stack (rtrainer/testing/parity_torch.py) when torch is installed.

Timing: pytest-benchmark pedantic mode, 1 call per round, 2 warm-up rounds, --rounds timed rounds,
median reported. Backward kernels accumulate (+=), so their gradient buffers are zeroed in the
per-round setup, which is NOT timed (the model zeroes the whole flat gradient buffer once per
step; that memset is not part of any kernel). Forward kernels overwrite their outputs.
Each forward output is checked against a numpy reference after timing, so a broken kernel
cannot post a number.
"""
from __future__ import annotations

import math

import numpy as np
import pytest


def _kernel(name: str):
    return pytest.importorskip(f"rtrainer._kernels.{name}",
                               reason=f"kernel module rtrainer._kernels.{name} not built")


def _zero(*arrays):
    def setup():
        for a in arrays:
            a.fill(0.0)
    return setup


def _close(got, ref, tol, what):
    err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol * scale, f"{what}: max abs diff {err:.3e} vs reference"


# ----------------------------------------------------------------------------- embed

def test_embed_forward(bench, shape, inputs, n_threads):
    k = _kernel("embed")
    out = np.empty((shape.B, shape.T, shape.D), np.float32)
    bench(lambda: k.embed_forward(out, inputs["ids"], inputs["E"], n_threads), threads=n_threads)
    np.testing.assert_array_equal(out, inputs["E"][inputs["ids"]])


def test_embed_backward(bench, shape, inputs, n_threads):
    k = _kernel("embed")
    dE = np.zeros((shape.V, shape.D), np.float32)
    bench(lambda: k.embed_backward(dE, inputs["ids"], inputs["dout"], n_threads),
          setup=_zero(dE), threads=n_threads)
    ref = np.zeros((shape.V, shape.D))
    np.add.at(ref, inputs["ids"].ravel(), inputs["dout"].reshape(-1, shape.D).astype(np.float64))
    _close(dE, ref, 1e-5, "embed_backward")


# ----------------------------------------------------------------------------- conv

def test_conv_forward(bench, shape, inputs, n_threads):
    k = _kernel("conv")
    pre = np.empty((shape.B, shape.T, shape.D), np.float32)
    u = np.empty_like(pre)
    bench(lambda: k.conv_forward(pre, u, inputs["x"], inputs["conv_w"], inputs["conv_b"],
                                 n_threads), threads=n_threads)
    _close(pre, inputs["pre"].astype(np.float64), 1e-5, "conv_forward pre")
    _close(u, inputs["u_conv"].astype(np.float64), 1e-5, "conv_forward u")


def test_conv_backward(bench, shape, inputs, n_threads):
    k = _kernel("conv")
    dx = np.zeros((shape.B, shape.T, shape.D), np.float32)
    dconv_w = np.zeros((shape.D, shape.K), np.float32)
    dconv_b = np.zeros(shape.D, np.float32)
    bench(lambda: k.conv_backward(dx, dconv_w, dconv_b, inputs["du"], inputs["x"], inputs["pre"],
                                  inputs["conv_w"], n_threads),
          setup=_zero(dx, dconv_w, dconv_b), threads=n_threads)


# ----------------------------------------------------------------------------- scan

def _scan_forward_ref(inp, s):
    """float64 numpy y (B,T,D), vectorised over (B,D,N), loop over T (hs is not checked)."""
    u = inp["u"].astype(np.float64)
    xdbl = inp["xdbl"].astype(np.float64)
    raw = inp["dt"].astype(np.float64) + inp["dt_bias"]
    delta = np.where(raw > 20.0, raw, np.log1p(np.exp(np.minimum(raw, 20.0))))
    A = -np.exp(inp["A_log"].astype(np.float64))
    Bt, Ct = xdbl[..., :s.N], xdbl[..., s.N:2 * s.N]
    h = np.zeros((s.B, s.D, s.N))
    y = np.empty_like(u)
    for t in range(s.T):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bt[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, Ct[:, t]) + inp["D_skip"] * u[:, t]
    return y


_SCAN_STATE: dict = {}


def _scan_forward_outputs(k, s, inp):
    """(y, hs) from one untimed scan_forward, shared by the backward benchmark."""
    if "hs" not in _SCAN_STATE:
        y = np.empty((s.B, s.T, s.D), np.float32)
        hs = np.zeros((s.B, s.n_chunks, s.D, s.N), np.float32)
        k.scan_forward(y, hs, inp["u"], inp["dt"], inp["dt_bias"], inp["A_log"], inp["xdbl"],
                       inp["D_skip"], s.chunk, 1)
        _SCAN_STATE.update(y=y, hs=hs)
    return _SCAN_STATE["y"], _SCAN_STATE["hs"]


def test_scan_forward(bench, shape, inputs, n_threads):
    k = _kernel("scan")
    s = shape
    y = np.empty((s.B, s.T, s.D), np.float32)
    hs = np.zeros((s.B, s.n_chunks, s.D, s.N), np.float32)
    bench(lambda: k.scan_forward(y, hs, inputs["u"], inputs["dt"], inputs["dt_bias"],
                                 inputs["A_log"], inputs["xdbl"], inputs["D_skip"], s.chunk,
                                 n_threads), threads=n_threads)
    _close(y, _scan_forward_ref(inputs, s), 1e-4, "scan_forward y")


def test_scan_backward(bench, shape, inputs, n_threads):
    k = _kernel("scan")
    s = shape
    _, hs = _scan_forward_outputs(k, s, inputs)
    du = np.zeros((s.B, s.T, s.D), np.float32)
    ddt = np.zeros_like(du)
    ddt_bias = np.zeros(s.D, np.float32)
    dA_log = np.zeros((s.D, s.N), np.float32)
    dxdbl = np.zeros((s.B, s.T, 2 * s.N + s.R), np.float32)
    dD_skip = np.zeros(s.D, np.float32)
    bench(lambda: k.scan_backward(du, ddt, ddt_bias, dA_log, dxdbl, dD_skip, inputs["dy"],
                                  inputs["u"], inputs["dt"], inputs["dt_bias"], inputs["A_log"],
                                  inputs["xdbl"], inputs["D_skip"], hs, s.chunk, n_threads),
          setup=_zero(du, ddt, ddt_bias, dA_log, dxdbl, dD_skip), threads=n_threads)


# ----------------------------------------------------------------------------- layernorm

def test_layernorm_forward(bench, shape, inputs, n_threads):
    k = _kernel("norm")
    n = shape.tokens
    z = np.empty((n, shape.D), np.float32)
    rstd = np.empty(n, np.float32)
    bench(lambda: k.layernorm_forward(z, rstd, inputs["r"], 1e-5, n_threads), threads=n_threads)
    _close(z, inputs["z"].astype(np.float64), 1e-4, "layernorm_forward z")


def test_layernorm_backward(bench, shape, inputs, n_threads):
    k = _kernel("norm")
    n = shape.tokens
    dx = np.zeros((n, shape.D), np.float32)
    dz = inputs["dz_ln"].reshape(n, shape.D)
    bench(lambda: k.layernorm_backward(dx, dz, inputs["z"], inputs["rstd"], n_threads),
          setup=_zero(dx), threads=n_threads)


# ----------------------------------------------------------------------------- HPN head

def test_hpn_forward(bench, shape, inputs, n_threads):
    k = _kernel("hpn")
    n = shape.tokens
    cos = np.empty(n, np.float32)
    tg = inputs["targets"].reshape(-1)
    loss = bench(lambda: k.hpn_forward(cos, inputs["z"], inputs["P"], tg, True, n_threads),
                 threads=n_threads)
    z = inputs["z"].astype(np.float64)
    zhat = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
    P = inputs["P"].astype(np.float64)[tg]
    ref_cos = (zhat * P / np.linalg.norm(P, axis=1, keepdims=True)).sum(1)
    _close(cos, ref_cos, 1e-5, "hpn_forward cos")
    assert loss is None or math.isclose(loss, np.mean((1 - ref_cos) ** 2), rel_tol=1e-4)


def test_hpn_backward(bench, shape, inputs, n_threads):
    """normalize=True, learnable=True (the reference's setting; includes the dP scatter)."""
    k = _kernel("hpn")
    n = shape.tokens
    tg = inputs["targets"].reshape(-1)
    cos = np.empty(n, np.float32)
    k.hpn_forward(cos, inputs["z"], inputs["P"], tg, True, 1)
    dz = np.zeros((n, shape.D), np.float32)
    dP = np.zeros((shape.V, shape.D), np.float32)
    bench(lambda: k.hpn_backward(dz, dP, inputs["z"], inputs["P"], tg, cos, True, True, 1.0,
                                 n_threads), setup=_zero(dz, dP), threads=n_threads)


def _softmax_case(shape, inputs):
    n = shape.tokens
    logits = np.ascontiguousarray(inputs["z"] @ inputs["E"].T)          # (n, V) float32
    return logits, np.empty_like(logits), inputs["targets"].reshape(-1)


def test_softmax_xent(bench, shape, inputs, n_threads):
    """The softmax head's fused row kernel (loss + dlogits in place) on (B*T, V) logits; the copy of
    the logits into its buffer is per-round setup, not timed."""
    k = _kernel("xent")
    logits, buf, tg = _softmax_case(shape, inputs)
    loss = bench(lambda: k.softmax_xent(buf, tg, 1.0, n_threads),
                 setup=lambda: np.copyto(buf, logits), threads=n_threads)
    x = logits.astype(np.float64)
    lse = x.max(1) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1))
    assert loss is None or math.isclose(loss, float(np.mean(lse - x[np.arange(len(tg)), tg])), rel_tol=1e-5)


def test_softmax_xent_numpy(bench, shape, inputs, n_threads):
    """The same loss + dlogits in numpy float32 (max shift, exp, sum, divide, one-hot): the peer
    the fused kernel is measured against."""
    logits, _, tg = _softmax_case(shape, inputs)
    rows = np.arange(len(tg))

    def numpy_xent():
        x = logits - logits.max(1, keepdims=True)
        e = np.exp(x)
        s = e.sum(1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) - x[rows, tg]))
        e /= s
        e[rows, tg] -= 1.0
        e /= len(tg)
        return loss

    bench(numpy_xent, threads=n_threads)


# ----------------------------------------------------------------------------- optimizer

def _flat_layout(s):
    """(P, segments (S,3) int64 [start, end, decay]) of the full L-layer model in contract order."""
    shapes = [(s.V, s.D)]
    for _ in range(s.L):
        shapes += [(s.D, s.K), (s.D,), (s.D, 2 * s.N + s.R), (s.R, s.D), (s.D,), (s.D, s.N),
                   (s.D,), (s.D, s.D)]
    shapes.append((s.V, s.D))
    segs, off = [], 0
    for shp in shapes:
        size = int(np.prod(shp))
        segs.append((off, off + size, 1 if len(shp) >= 2 else 0))
        off += size
    return off, np.asarray(segs, dtype=np.int64)


@pytest.fixture(scope="module")
def flat(shape):
    P, segs = _flat_layout(shape)
    rng = np.random.default_rng(5)
    return dict(p=rng.standard_normal(P, dtype=np.float32) * 0.02,
                g=rng.standard_normal(P, dtype=np.float32) * 1e-3,
                m=np.zeros(P, np.float32), v=np.zeros(P, np.float32), segments=segs)


def test_optim_sumsq(bench, flat, n_threads):
    k = _kernel("optim")
    got = bench(lambda: k.sumsq(flat["g"], flat["segments"], n_threads), threads=n_threads)
    ref = float(np.sum(flat["g"].astype(np.float64) ** 2))
    assert got is None or math.isclose(got, ref, rel_tol=1e-9)


def test_optim_adamw_step(bench, flat, n_threads):
    """Whole-model AdamW (all tensors trainable); moments evolve across rounds (no reset)."""
    k = _kernel("optim")
    f = flat
    state = {"step": 0}

    def run():
        state["step"] += 1
        k.adamw_step(f["p"], f["g"], f["m"], f["v"], f["segments"], 1e-4, 0.9, 0.999, 1e-8,
                     0.01, state["step"], 1.0, n_threads)

    bench(run, threads=n_threads)


# ----------------------------------------------------------------------------- references

def _blas_limits(n_threads):
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=n_threads, user_api="blas")


def test_numpy_gemm_1024(bench, n_threads):
    """Machine reference: float32 (1024x1024) @ (1024x1024), BLAS capped at n_threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    b = rng.standard_normal((1024, 1024), dtype=np.float32)
    c = np.empty_like(a)
    flops = 2.0 * 1024 ** 3
    with _blas_limits(n_threads):
        bench(lambda: np.matmul(a, b, out=c), threads=n_threads, tokens=0,
              note_fn=lambda med: f"{flops / med / 1e9:.1f} GFLOP/s")


def test_numpy_layer_matmuls_forward(bench, shape, inputs, n_threads):
    """One layer's projections via np.matmul(out=): [Bt|Ct|draw] = u@x_proj_w, draw@dt_proj_w,
    y@out_proj_w (the mamba-lite layer's x/dt projections and its output projection)."""
    s, n = shape, shape.tokens
    u = inputs["u"].reshape(n, s.D)
    xdbl = np.empty((n, 2 * s.N + s.R), np.float32)
    dt = np.empty((n, s.D), np.float32)
    out = np.empty((n, s.D), np.float32)
    y = inputs["dy"].reshape(n, s.D)
    Wx, Wdt, Wo = inputs["x_proj_w"], inputs["dt_proj_w"], inputs["out_proj_w"]

    def run():
        np.matmul(u, Wx, out=xdbl)
        np.matmul(xdbl[:, 2 * s.N:], Wdt, out=dt)
        np.matmul(y, Wo, out=out)

    with _blas_limits(n_threads):
        bench(run, threads=n_threads)


def test_numpy_layer_matmuls_backward(bench, shape, inputs, n_threads):
    """The six backward GEMMs of one layer: weight grads (into scratch, then +=) and input grads."""
    s, n = shape, shape.tokens
    u = inputs["u"].reshape(n, s.D)
    y = inputs["dy"].reshape(n, s.D)
    dout = inputs["dout"].reshape(n, s.D)
    dxdbl = inputs["dxdbl"].reshape(n, 2 * s.N + s.R)
    ddt = inputs["du"].reshape(n, s.D)
    draw = inputs["xdbl"].reshape(n, -1)[:, 2 * s.N:]
    Wx, Wdt, Wo = inputs["x_proj_w"], inputs["dt_proj_w"], inputs["out_proj_w"]
    dWo, tWo = np.zeros_like(Wo), np.empty_like(Wo)
    dWx, tWx = np.zeros_like(Wx), np.empty_like(Wx)
    dWdt, tWdt = np.zeros_like(Wdt), np.empty_like(Wdt)
    dy, du = np.empty((n, s.D), np.float32), np.empty((n, s.D), np.float32)
    ddraw = np.empty((n, s.R), np.float32)

    def run():
        np.matmul(y.T, dout, out=tWo); np.add(dWo, tWo, out=dWo)
        np.matmul(dout, Wo.T, out=dy)
        np.matmul(draw.T, ddt, out=tWdt); np.add(dWdt, tWdt, out=dWdt)
        np.matmul(ddt, Wdt.T, out=ddraw)
        np.matmul(u.T, dxdbl, out=tWx); np.add(dWx, tWx, out=dWx)
        np.matmul(dxdbl, Wx.T, out=du)

    with _blas_limits(n_threads):
        bench(run, setup=_zero(dWo, dWx, dWdt), threads=n_threads)


# ----------------------------------------------------------------------------- torch

@pytest.fixture(scope="module")
def torch_setup(shape):
    torch = pytest.importorskip("torch")
    pt = pytest.importorskip("rtrainer.testing.parity_torch")
    s = shape
    kw = dict(vocab_size=s.V, d_model=s.D, n_layers=s.L, d_state=s.N, d_conv=s.K, dt_rank=s.R)
    params = pt.init_params(**kw, seed=0, dtype="float32")
    rng = np.random.default_rng(3)
    ids = torch.from_numpy(rng.integers(0, s.V, (s.B, s.T), dtype=np.int64))
    tg = torch.from_numpy(rng.integers(0, s.V, (s.B, s.T), dtype=np.int64))
    return torch, pt, kw, params, ids, tg


class _TorchThreads:
    def __init__(self, torch, n):
        self.torch, self.n = torch, n

    def __enter__(self):
        self.old = self.torch.get_num_threads()
        self.torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.old)


def test_torch_eager_forward_backward(bench, torch_setup, n_threads):
    """L-layer stack + HPN head (normalised, learnable prototypes), loss.backward(); grads are
    set to None inside the timed call (torch's default zero_grad). scan="vectorised" (the
    "chunked" variant measured 3-7x slower at this shape, "loop" recomputes exp per step)."""
    torch, pt, kw, params, ids, tg = torch_setup
    model = pt.build_torch_model(**kw, params=params, scan="vectorised")
    with _TorchThreads(torch, n_threads):
        bench(lambda: model.forward_backward(ids, tg), threads=n_threads, rounds=10, warmup=2)


def test_torch_eager_train_step(bench, torch_setup, n_threads):
    """forward + backward + torch.optim.AdamW (foreach=False), scan="vectorised"."""
    torch, pt, kw, params, ids, tg = torch_setup
    model = pt.build_torch_model(**kw, params=params, scan="vectorised")
    with _TorchThreads(torch, n_threads):
        bench(lambda: model.train_step(ids, tg), threads=n_threads, rounds=10, warmup=2)


def test_torch_compile_forward_backward(bench, torch_setup, n_threads, request):
    if not request.config.getoption("--torch-compile"):
        pytest.skip("pass --torch-compile to benchmark torch.compile (slow first call)")
    torch, pt, kw, params, ids, tg = torch_setup
    model = pt.build_torch_model(**kw, params=params, scan="vectorised", compile=True)
    with _TorchThreads(torch, n_threads):
        model.forward_backward(ids, tg)  # compile outside the timed region
        bench(lambda: model.forward_backward(ids, tg), threads=n_threads, rounds=10, warmup=2)


# ----------------------------------------------------------------------------- the `mamba` block
# The kernels only the full block uses (pre-norm RMSNorm with a weight, the y*silu(z) gate) and the
# scan at the block's C = E*D channels (E = 2), at the same B, T, N.

E_MAMBA = 2


@pytest.fixture(scope="module")
def mamba_inputs(shape):
    s = shape
    C = E_MAMBA * s.D
    n = s.B * s.T
    rng = np.random.default_rng(99)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    d = dict(C=C, n=n)
    d["x"] = f32(rng.standard_normal((n, s.D)) * 2.0 + 0.3)
    d["w"] = f32(1.0 + 0.1 * rng.standard_normal(s.D))
    d["dout_d"] = f32(0.01 * rng.standard_normal((n, s.D)))
    d["y"], d["zg"] = f32(rng.standard_normal((n, C))), f32(2.0 * rng.standard_normal((n, C)))
    d["dout_c"] = f32(0.01 * rng.standard_normal((n, C)))
    d["u"] = f32(rng.standard_normal((s.B, s.T, C)))
    d["dt_bias"] = f32(np.log(np.expm1(np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), C)))))
    d["A_log"] = f32(np.broadcast_to(np.log(np.arange(1, s.N + 1)), (C, s.N)))
    d["D_skip"] = f32(np.ones(C))
    R = -(-s.D // 16)
    xdbl = rng.standard_normal((s.B, s.T, 2 * s.N + R))
    d["xdbl"] = f32(xdbl)
    d["dt"] = f32(xdbl[..., 2 * s.N:] @ (0.1 * rng.standard_normal((R, C)) / math.sqrt(R)))
    d["dy"] = f32(0.01 * rng.standard_normal((s.B, s.T, C)))
    return d


def test_rmsnorm_forward(bench, shape, mamba_inputs, n_threads):
    k = _kernel("rmsnorm")
    m = mamba_inputs
    out = np.empty_like(m["x"])
    rstd = np.empty(m["n"], np.float32)
    bench(lambda: k.rmsnorm_forward(out, rstd, m["x"], m["w"], 1e-5, n_threads), threads=n_threads)
    x = m["x"].astype(np.float64)
    _close(out, x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-5) * m["w"], 1e-5, "rmsnorm_forward")


def test_rmsnorm_backward(bench, shape, mamba_inputs, n_threads):
    k = _kernel("rmsnorm")
    m = mamba_inputs
    out = np.empty_like(m["x"])
    rstd = np.empty(m["n"], np.float32)
    k.rmsnorm_forward(out, rstd, m["x"], m["w"], 1e-5, 1)
    dx, dw = np.zeros_like(m["x"]), np.zeros_like(m["w"])
    bench(lambda: k.rmsnorm_backward(dx, dw, m["dout_d"], m["x"], rstd, m["w"], n_threads),
          setup=_zero(dx, dw), threads=n_threads)
    x, r = m["x"].astype(np.float64), rstd.astype(np.float64)[:, None]
    _close(dw, (m["dout_d"] * x * r).sum(0), 1e-4, "rmsnorm_backward dw")


def test_gate_forward(bench, shape, mamba_inputs, n_threads):
    k = _kernel("gate")
    m = mamba_inputs
    out = np.empty_like(m["y"])
    bench(lambda: k.gate_forward(out, m["y"], m["zg"], n_threads), threads=n_threads)
    z = m["zg"].astype(np.float64)
    _close(out, m["y"] * z / (1 + np.exp(-z)), 1e-5, "gate_forward")


def test_gate_backward(bench, shape, mamba_inputs, n_threads):
    k = _kernel("gate")
    m = mamba_inputs
    dy, dz, out = np.zeros_like(m["y"]), np.zeros_like(m["y"]), np.empty_like(m["y"])
    bench(lambda: k.gate_backward(dy, dz, out, m["dout_c"], m["y"], m["zg"], n_threads),
          setup=_zero(dy, dz), threads=n_threads)
    z = m["zg"].astype(np.float64)
    _close(dy, m["dout_c"] * z / (1 + np.exp(-z)), 1e-5, "gate_backward dy")


def test_mamba_scan_forward(bench, shape, mamba_inputs, n_threads):
    """The existing scan kernel at the block's E*D channels."""
    k = _kernel("scan")
    m, s = mamba_inputs, shape
    y = np.empty((s.B, s.T, m["C"]), np.float32)
    hs = np.empty((s.B, s.n_chunks, m["C"], s.N), np.float32)
    bench(lambda: k.scan_forward(y, hs, m["u"], m["dt"], m["dt_bias"], m["A_log"], m["xdbl"], m["D_skip"],
                                 s.chunk, n_threads), threads=n_threads)
    assert np.isfinite(y).all()


def test_mamba_scan_backward(bench, shape, mamba_inputs, n_threads):
    k = _kernel("scan")
    m, s = mamba_inputs, shape
    C = m["C"]
    y = np.empty((s.B, s.T, C), np.float32)
    hs = np.empty((s.B, s.n_chunks, C, s.N), np.float32)
    k.scan_forward(y, hs, m["u"], m["dt"], m["dt_bias"], m["A_log"], m["xdbl"], m["D_skip"], s.chunk, 1)
    du, ddt = np.zeros_like(m["u"]), np.zeros_like(m["u"])
    ddt_bias, dA_log, dD = np.zeros(C, np.float32), np.zeros((C, s.N), np.float32), np.zeros(C, np.float32)
    dxdbl = np.zeros_like(m["xdbl"])
    bench(lambda: k.scan_backward(du, ddt, ddt_bias, dA_log, dxdbl, dD, m["dy"], m["u"], m["dt"], m["dt_bias"],
                                  m["A_log"], m["xdbl"], m["D_skip"], hs, s.chunk, n_threads),
          setup=_zero(du, ddt, ddt_bias, dA_log, dxdbl, dD), threads=n_threads)
    assert np.isfinite(du).all()
