"""The kernels the `mamba` block adds (RMSNorm with a weight, the y*silu(z) gate) vs their float64
references: forward, backward with a random cotangent onto non-zero buffers (backward must
accumulate), the references vs 4th-order central finite differences, awkward shapes, n_threads in
{1, 2, 3}, shape errors, and bitwise independence of the thread count."""
import numpy as np
import pytest

from rtrainer.testing import reference as ref
from rtrainer._kernels import gate, rmsnorm

THREADS = (1, 2, 3)
SHAPES = [(1, 1), (1, 7), (5, 1), (9, 33), (64, 130)]


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def assert_close(name, got, want, atol, rtol=0.0):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    tol = atol + rtol * np.abs(want)
    assert np.all(err <= tol), f"{name}: max abs diff {err.max():.3e} (atol {atol:g}, rtol {rtol:g})"


def fd4(f, x, idx, h=1e-4):
    x0 = x[idx]
    vals = []
    for k in (2, 1, -1, -2):
        x[idx] = x0 + k * h
        vals.append(f())
    x[idx] = x0
    return (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)


# ---------------------------------------------------------------------------------------- rmsnorm

@pytest.mark.parametrize("n,D", SHAPES)
@pytest.mark.parametrize("n_threads", THREADS)
def test_rmsnorm_vs_ref(n, D, n_threads):
    rng = np.random.default_rng([n, D, n_threads])
    x = f32(rng.normal(0.5, 2.0, (n, D)))
    w = f32(rng.normal(1.0, 0.5, D))
    out = np.full((n, D), np.nan, np.float32)
    rstd = np.full(n, np.nan, np.float32)
    rmsnorm.rmsnorm_forward(out, rstd, x, w, 1e-5, n_threads)
    out_r, rstd_r = np.zeros((n, D)), np.zeros(n)
    ref.rmsnorm_forward_ref(out_r, rstd_r, x.astype(np.float64), w.astype(np.float64), 1e-5, n_threads)
    assert_close("out", out, out_r, atol=1e-6, rtol=1e-6)
    assert_close("rstd", rstd, rstd_r, atol=0, rtol=1e-6)

    dout = f32(rng.normal(size=(n, D)))
    dx0, dw0 = f32(rng.normal(size=(n, D))), f32(rng.normal(size=D))
    dx, dw = dx0.copy(), dw0.copy()
    rmsnorm.rmsnorm_backward(dx, dw, dout, x, rstd, w, n_threads)
    dx_r, dw_r = dx0.astype(np.float64), dw0.astype(np.float64)
    ref.rmsnorm_backward_ref(dx_r, dw_r, dout.astype(np.float64), x.astype(np.float64),
                             rstd.astype(np.float64), w.astype(np.float64), n_threads)
    assert_close("dx", dx, dx_r, atol=2e-6, rtol=2e-5)
    assert_close("dw", dw, dw_r, atol=2e-5 * max(1, n) ** 0.5, rtol=2e-5)


@pytest.mark.parametrize("n,D", [(1, 1), (3, 5), (4, 2)])
def test_rmsnorm_ref_vs_finite_differences(n, D):
    rng = np.random.default_rng([n, D])
    x, w = rng.normal(0.3, 1.5, (n, D)), rng.normal(1.0, 0.5, D)
    c = rng.normal(size=(n, D))                      # fake loss sum(out * c)

    def loss():
        out, rstd = np.zeros((n, D)), np.zeros(n)
        ref.rmsnorm_forward_ref(out, rstd, x, w, 1e-5, 1)
        return float((out * c).sum())

    out, rstd = np.zeros((n, D)), np.zeros(n)
    ref.rmsnorm_forward_ref(out, rstd, x, w, 1e-5, 1)
    dx, dw = np.zeros((n, D)), np.zeros(D)
    ref.rmsnorm_backward_ref(dx, dw, c, x, rstd, w, 1)
    for idx in np.ndindex(x.shape):
        fd = fd4(loss, x, idx)
        assert abs(fd - dx[idx]) <= 1e-8 + 1e-6 * abs(fd), (idx, fd, dx[idx])
    for j in range(D):
        fd = fd4(loss, w, (j,))
        assert abs(fd - dw[j]) <= 1e-8 + 1e-6 * abs(fd), (j, fd, dw[j])


def test_rmsnorm_threads_bitwise_identical():
    rng = np.random.default_rng(5)
    x, w = f32(rng.normal(size=(37, 200))), f32(rng.normal(size=200))
    dout = f32(rng.normal(size=(37, 200)))
    res = []
    for nt in THREADS:
        out, rstd = np.empty_like(x), np.empty(37, np.float32)
        rmsnorm.rmsnorm_forward(out, rstd, x, w, 1e-5, nt)
        dx, dw = np.zeros_like(x), np.zeros_like(w)
        rmsnorm.rmsnorm_backward(dx, dw, dout, x, rstd, w, nt)
        res.append((out, rstd, dx, dw))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert np.array_equal(a, b)


def test_rmsnorm_shape_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="rmsnorm_forward: w has shape"):
        rmsnorm.rmsnorm_forward(np.zeros_like(x), np.zeros(3, np.float32), x, np.zeros(5, np.float32), 1e-5, 1)
    with pytest.raises(ValueError, match="rmsnorm_forward: rstd"):
        rmsnorm.rmsnorm_forward(np.zeros_like(x), np.zeros(2, np.float32), x, np.zeros(4, np.float32), 1e-5, 1)
    with pytest.raises(ValueError, match="rmsnorm_backward: dw has shape"):
        rmsnorm.rmsnorm_backward(np.zeros_like(x), np.zeros(3, np.float32), x, x, np.ones(3, np.float32),
                                 np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="n_threads"):
        rmsnorm.rmsnorm_forward(np.zeros_like(x), np.zeros(3, np.float32), x, np.zeros(4, np.float32), 1e-5, 0)


# ------------------------------------------------------------------------------------------- gate

@pytest.mark.parametrize("n,C", SHAPES)
@pytest.mark.parametrize("n_threads", THREADS)
def test_gate_vs_ref(n, C, n_threads):
    rng = np.random.default_rng([n, C, n_threads, 1])
    y = f32(rng.normal(size=(n, C)))
    z = f32(rng.normal(0, 4.0, (n, C)))               # both tails of the sigmoid
    out = np.full((n, C), np.nan, np.float32)
    gate.gate_forward(out, y, z, n_threads)
    out_r = np.zeros((n, C))
    ref.gate_forward_ref(out_r, y.astype(np.float64), z.astype(np.float64), n_threads)
    assert_close("out", out, out_r, atol=1e-6, rtol=1e-6)

    dout = f32(rng.normal(size=(n, C)))
    dy0, dz0 = f32(rng.normal(size=(n, C))), f32(rng.normal(size=(n, C)))
    dy, dz = dy0.copy(), dz0.copy()
    out2 = np.full((n, C), np.nan, np.float32)
    gate.gate_backward(dy, dz, out2, dout, y, z, n_threads)
    dy_r, dz_r, out2_r = dy0.astype(np.float64), dz0.astype(np.float64), np.zeros((n, C))
    ref.gate_backward_ref(dy_r, dz_r, out2_r, dout.astype(np.float64), y.astype(np.float64),
                          z.astype(np.float64), n_threads)
    assert_close("dy", dy, dy_r, atol=2e-6, rtol=1e-5)
    assert_close("dz", dz, dz_r, atol=2e-6, rtol=1e-5)
    assert np.array_equal(out2, out), "the recomputed output must be bitwise the forward's"


def test_gate_ref_vs_finite_differences():
    rng = np.random.default_rng(11)
    n, C = 3, 4
    y, z = rng.normal(size=(n, C)), rng.normal(0, 3.0, (n, C))
    c = rng.normal(size=(n, C))

    def loss():
        out = np.zeros((n, C))
        ref.gate_forward_ref(out, y, z, 1)
        return float((out * c).sum())

    dy, dz, out = np.zeros((n, C)), np.zeros((n, C)), np.zeros((n, C))
    ref.gate_backward_ref(dy, dz, out, c, y, z, 1)
    for idx in np.ndindex(y.shape):
        fd = fd4(loss, y, idx)
        assert abs(fd - dy[idx]) <= 1e-8 + 1e-6 * abs(fd), (idx, fd, dy[idx])
        fd = fd4(loss, z, idx)
        assert abs(fd - dz[idx]) <= 1e-8 + 1e-6 * abs(fd), (idx, fd, dz[idx])


def test_gate_threads_bitwise_identical_and_shape_errors():
    rng = np.random.default_rng(2)
    y, z, dout = (f32(rng.normal(size=(29, 70))) for _ in range(3))
    res = []
    for nt in THREADS:
        out = np.empty_like(y)
        gate.gate_forward(out, y, z, nt)
        dy, dz, o2 = np.zeros_like(y), np.zeros_like(y), np.empty_like(y)
        gate.gate_backward(dy, dz, o2, dout, y, z, nt)
        res.append((out, dy, dz))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="gate_forward: z has shape"):
        gate.gate_forward(np.empty_like(y), y, z[:, :3].copy(), 1)
    with pytest.raises(ValueError, match="gate_backward: dz has shape"):
        gate.gate_backward(np.empty_like(y), np.empty((2, 2), np.float32), np.empty_like(y), dout, y, z, 1)
