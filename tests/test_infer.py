"""Recurrent inference: the single-token kernels vs their float64 references, and the step mode vs the
training forward at every position (both layer kinds, selective and LTI, both heads, batch > 1,
sequences longer than the scan chunk)."""
import numpy as np
import pytest

from rtrainer import Net
from rtrainer._kernels import conv, scan, step
from rtrainer.infer import HeadScorer, InferenceState
from rtrainer.testing import reference as ref

THREADS = (1, 2, 3)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("B,C,K", [(1, 1, 1), (1, 3, 2), (3, 70, 4), (2, 130, 5)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_conv_step_vs_ref_and_window_forward(B, C, K, n_threads):
    """Stepping T tokens through conv_step equals the float64 step reference, the float64 window
    reference (conv_forward_ref) and the window kernel conv_forward, and leaves the last K-1 inputs."""
    rng = np.random.default_rng([B, C, K, n_threads])
    T = 9
    x = f32(rng.normal(size=(B, T, C)))
    w = f32(rng.normal(size=(C, K)))
    b = f32(rng.normal(size=C))
    st = np.zeros((B, K - 1, C), np.float32)
    st64 = np.zeros((B, K - 1, C))
    pre = np.empty((B, T, C), np.float32)
    u = np.empty((B, T, C), np.float32)
    pre64, u64 = np.empty((B, T, C)), np.empty((B, T, C))
    for t in range(T):
        p1, u1 = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
        step.conv_step(p1, u1, st, np.ascontiguousarray(x[:, t]), w, b, n_threads)
        pre[:, t], u[:, t] = p1, u1
        ref.conv_step_ref(pre64[:, t], u64[:, t], st64, x[:, t].astype(np.float64), w.astype(np.float64),
                          b.astype(np.float64), n_threads)
    assert np.isfinite(pre).all() and np.isfinite(u).all()
    np.testing.assert_allclose(pre, pre64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u, u64, rtol=1e-5, atol=1e-5)
    wp, wu = np.empty((B, T, C)), np.empty((B, T, C))
    ref.conv_forward_ref(wp, wu, x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1)
    np.testing.assert_allclose(pre64, wp, rtol=1e-12, atol=1e-12)      # the two references agree
    kp, ku = np.empty((B, T, C), np.float32), np.empty((B, T, C), np.float32)
    conv.conv_forward(kp, ku, x, w, b, n_threads)
    np.testing.assert_allclose(pre, kp, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(u, ku, rtol=1e-6, atol=1e-6)
    if K > 1:
        np.testing.assert_array_equal(st, x[:, T - (K - 1):] if T >= K - 1 else st)


@pytest.mark.parametrize("B,C,N,R", [(1, 1, 1, 0), (2, 7, 3, 1), (3, 70, 16, 2), (2, 130, 5, 0)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_scan_step_vs_ref_and_window_forward(B, C, N, R, n_threads):
    rng = np.random.default_rng([B, C, N, R, n_threads, 7])
    T = 11
    u = f32(rng.normal(size=(B, T, C)))
    dt = f32(rng.normal(size=(B, T, C)))
    dt_bias = f32(rng.normal(size=C) - 1.0)
    A_log = f32(rng.normal(size=(C, N)) * 0.5)
    xdbl = f32(rng.normal(size=(B, T, 2 * N + R)))
    Dsk = f32(rng.normal(size=C))
    negA = np.empty((N, C), np.float32)
    step.neg_exp_t(negA, A_log, n_threads)
    negA64 = np.empty((N, C))
    ref.neg_exp_t_ref(negA64, A_log.astype(np.float64), n_threads)
    np.testing.assert_allclose(negA, negA64, rtol=1e-6)
    h = np.zeros((B, N, C), np.float32)
    h64 = np.zeros((B, N, C))
    y = np.empty((B, T, C), np.float32)
    y64 = np.empty((B, T, C))
    for t in range(T):
        y1 = np.empty((B, C), np.float32)
        step.scan_step(y1, h, np.ascontiguousarray(u[:, t]), np.ascontiguousarray(dt[:, t]), dt_bias, negA,
                       np.ascontiguousarray(xdbl[:, t]), Dsk, n_threads)
        y[:, t] = y1
        ref.scan_step_ref(y64[:, t], h64, u[:, t].astype(np.float64), dt[:, t].astype(np.float64),
                          dt_bias.astype(np.float64), negA64, xdbl[:, t].astype(np.float64),
                          Dsk.astype(np.float64), n_threads)
    assert np.isfinite(y).all() and np.isfinite(h).all()
    np.testing.assert_allclose(y, y64, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h, h64, rtol=2e-5, atol=2e-5)
    # the window references and kernel: same y, and h_T equals the trajectory's last state
    chunk = 4
    nc = -(-T // chunk)
    wy, whs = np.empty((B, T, C)), np.empty((B, nc, C, N))
    ref.scan_forward_ref(wy, whs, u.astype(np.float64), dt.astype(np.float64), dt_bias.astype(np.float64),
                         A_log.astype(np.float64), xdbl.astype(np.float64), Dsk.astype(np.float64), chunk, 1)
    np.testing.assert_allclose(y64, wy, rtol=1e-10, atol=1e-10)
    ky, khs = np.empty((B, T, C), np.float32), np.empty((B, nc, C, N), np.float32)
    scan.scan_forward(ky, khs, u, dt, dt_bias, A_log, xdbl, Dsk, chunk, n_threads)
    # the window kernel's exp and softplus are polynomial (<= 2e-7 / 4e-7 relative, tests/test_expf.py),
    # the step kernel's are libm's: a few float32 ulps apart after T steps, both within 2e-5 of float64
    np.testing.assert_allclose(y, ky, rtol=5e-6, atol=5e-6)


def test_step_kernels_check_shapes():
    with pytest.raises(ValueError, match="conv_step: state"):
        step.conv_step(np.empty((2, 3), np.float32), np.empty((2, 3), np.float32), np.zeros((2, 2, 3), np.float32),
                       np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32), np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="scan_step: h"):
        step.scan_step(np.empty((2, 3), np.float32), np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.float32),
                       np.zeros((2, 3), np.float32), np.zeros(3, np.float32), np.zeros((4, 3), np.float32),
                       np.zeros((2, 8), np.float32), np.zeros(3, np.float32), 1)


# ------------------------------------------------------------------------------------------ model

def _model(layer, selective, head, V=23, D=16, L=2, chunk=8, threads=1, seed=3):
    cfg = {"model": {"layer": layer, "d_model": D, "d_state": 4, "d_conv": 4, "dt_rank": 2 if selective else 0,
                     "base_layers": L, "target_layers": L, "vocab_size": V, "scan_chunk": chunk,
                     "selective": selective, "expand": 2},
           "head": {"kind": head}}
    net = Net.build(cfg, n_threads=threads)
    net.init(seed, "mamba")
    rng = np.random.default_rng(seed)
    # move every tensor off its init so no path is trivially zero (conv_b, biases, norm weights)
    for name, v in net.params.items():
        v += f32(rng.normal(0.0, 0.1, size=v.shape))
    return net.model, net.head


@pytest.mark.parametrize("layer", ["mamba-lite", "mamba"])
@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("head", ["hpn", "softmax"])
@pytest.mark.parametrize("threads", [1, 2])
def test_step_mode_reproduces_the_training_forward(layer, selective, head, threads):
    """z and the head's scores at every position of B=3 sequences of T=37 > scan_chunk=8 tokens."""
    model, hd = _model(layer, selective, head, threads=threads)
    B, T = 3, 37
    rng = np.random.default_rng(11)
    ids = rng.integers(0, model.V, size=(B, T))
    z_full = model.forward(ids).reshape(B, T, -1).copy()
    s_full = HeadScorer(hd)(z_full.reshape(B * T, -1)).reshape(B, T, -1)
    st = InferenceState((model, hd), batch=B)
    z_step = np.empty_like(z_full)
    s_step = np.empty_like(s_full)
    for t in range(T):
        z = st.step(ids[:, t])
        z_step[:, t] = z
        s_step[:, t] = st.outputs()
    assert np.isfinite(z_step).all()
    np.testing.assert_allclose(z_step, z_full, rtol=0, atol=5e-6)
    np.testing.assert_allclose(s_step, s_full, rtol=0, atol=5e-6 * max(1.0, np.abs(s_full).max()))
    # the scores are what the head's loss and prediction use: the predicted ids agree too
    # (up to near-ties), and for HPN the cosine at the target equals the training kernel's
    pred = hd.predict(z_full.reshape(B * T, -1))
    agree = np.mean(pred == np.argmax(s_step.reshape(B * T, -1), axis=1))
    assert agree > 0.97, agree
    if head == "hpn":
        targets = rng.integers(0, model.V, size=(B, T))
        hd.forward(np.ascontiguousarray(z_full.reshape(B * T, -1)), targets)
        np.testing.assert_allclose(s_step.reshape(B * T, -1)[np.arange(B * T), targets.reshape(-1)], hd.cos,
                                   atol=3e-5)
    else:
        targets = rng.integers(0, model.V, size=(B, T))
        loss = hd.forward(np.ascontiguousarray(z_full.reshape(B * T, -1)), targets)
        s = s_step.reshape(B * T, -1).astype(np.float64)
        m = s.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]
        want = float(np.mean(lse - s[np.arange(B * T), targets.reshape(-1)]))
        assert abs(loss - want) < 1e-4 * max(1.0, abs(want))


def test_prefill_then_step_equals_stepping_and_reset_forgets():
    model, hd = _model("mamba", True, "softmax")
    ids = np.random.default_rng(5).integers(0, model.V, size=(2, 20))
    a = InferenceState((model, hd), batch=2)
    za = a.prefill(ids).copy()
    b = InferenceState((model, hd), batch=2)
    for t in range(20):
        zb = b.step(ids[:, t])
    np.testing.assert_array_equal(za, zb)
    a.reset()
    np.testing.assert_array_equal(a.prefill(ids), zb)
    with pytest.raises(ValueError, match="token ids"):
        a.step([model.V, 0])


def test_step_cost_does_not_depend_on_the_context():
    """Only the per-layer state is carried: the arrays the state holds do not grow with positions."""
    model, hd = _model("mamba-lite", True, "hpn")
    st = InferenceState((model, hd), batch=2)
    sizes = sum(a.nbytes for a in st.h + st.conv_state)
    st.prefill(np.zeros((2, 300), np.int64))
    assert sum(a.nbytes for a in st.h + st.conv_state) == sizes
    assert st.position == 300


def test_broadcast_from_copies_one_prefilled_sequence():
    model, hd = _model("mamba", False, "hpn")
    ids = np.random.default_rng(9).integers(0, model.V, size=(1, 15))
    one = InferenceState((model, hd), batch=1)
    one.prefill(ids)
    many = InferenceState((model, hd), batch=3)
    z = many.broadcast_from(one)
    ref_state = InferenceState((model, hd), batch=3)
    zr = ref_state.prefill(np.repeat(ids, 3, axis=0))
    np.testing.assert_allclose(z, zr, atol=1e-6)
    nxt = np.array([1, 2, 3])
    np.testing.assert_allclose(many.step(nxt), ref_state.step(nxt), atol=1e-6)
    assert many.position == 16
