"""The kernels' vectorised float32 exp (kernels/_common.pxd rt_expf): relative error <= 2e-7
against float64 exp wherever the result is a normal float, and the right special values.
(The reference trainer's 0.2.0 'fast' exp was wrong by 2.5x near -2: this is the guard.)
Also the scan's shorter exp (rt_expf_fast, same bound on [-87, 88], no denormals) and the
branch-free softplus (rt_softplusf, <= 4e-7)."""
import numpy as np

from rtrainer._kernels import info

TINY = np.finfo(np.float32).tiny


def _apply(fn, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    fn(out, x)
    return out


def vexp(x):
    return _apply(info.vexp, x)


def test_relative_error_bound_over_the_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(-103.97, 88.7228, 4_000_001, dtype=np.float32),   # every region, dense
        rng.uniform(-20, 1, 2_000_000).astype(np.float32),           # where the scan lives (delta*A <= 0)
        (rng.standard_normal(500_000) * 1e-3).astype(np.float32),    # around 0
        np.float32(np.log(2)) * np.arange(-149, 128, dtype=np.float32),  # range-reduction boundaries
    ])
    y = vexp(x).astype(np.float64)
    t = np.exp(x.astype(np.float64))
    normal = t >= TINY
    rel = np.abs(y[normal] / t[normal] - 1.0)
    worst = int(rel.argmax())
    assert rel.max() <= 2e-7, f"max relative error {rel.max():.3e} at x = {x[normal][worst]!r}"
    # below the normal range the result is a denormal or 0: absolute error below one denormal step
    assert np.abs(y[~normal] - t[~normal]).max() <= 1.5e-45


def test_points_where_the_reference_polynomial_failed():
    x = np.array([-2.0, -1.0, -0.693, 1.0, 2.0, -1.999, -2.001], np.float32)
    np.testing.assert_allclose(vexp(x), np.exp(x.astype(np.float64)), rtol=2e-7)


def test_special_values():
    x = np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, 89.0, 1000.0, -104.0, -1000.0], np.float32)
    y = vexp(x)
    assert np.isnan(y[0])
    assert y[1] == 0.0 and y[2] == np.inf
    assert y[3] == 1.0 and y[4] == 1.0
    assert y[5] == np.inf and y[6] == np.inf
    assert y[7] == 0.0 and y[8] == 0.0


def test_monotone_on_a_fine_grid():
    x = np.linspace(-30, 10, 1_000_001, dtype=np.float32)
    y = vexp(x)
    assert np.all(np.diff(y) >= 0)


# ---------------------------------------------------------------------------------------------
# softplus (kernels/_common.pxd rt_softplusf): the scan's delta = softplus(dt + dt_bias)

def vsoftplus(x):
    return _apply(info.vsoftplus, x)


def softplus64(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 20, x, np.logaddexp(0.0, x))      # the model's threshold: x above 20


def test_softplus_relative_error_bound():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        np.linspace(-100, 25, 4_000_001, dtype=np.float32),
        rng.uniform(-10, 10, 2_000_000).astype(np.float32),          # where dt + dt_bias lives
        (rng.standard_normal(500_000) * 1e-3).astype(np.float32),
        np.float32([19.999, 20.0, 20.001, 0.34657, -0.34657, 0.8814, -0.8814]),  # u = 1+e near sqrt 2
    ])
    y = vsoftplus(x).astype(np.float64)
    t = softplus64(x)
    normal = t >= TINY
    rel = np.abs(y[normal] / t[normal] - 1.0)
    worst = int(rel.argmax())
    assert rel.max() <= 4e-7, f"max relative error {rel.max():.3e} at x = {x[normal][worst]!r}"
    assert np.abs(y[~normal] - t[~normal]).max() <= 1.5e-45


def test_softplus_threshold_and_special_values():
    x = np.array([20.0, 20.5, 1000.0, np.inf, -np.inf, np.nan, 0.0, -0.0, -1000.0], np.float32)
    y = vsoftplus(x)
    assert y[0] == np.float32(np.log1p(np.exp(20.0)))     # 20 itself is below the threshold
    assert y[1] == np.float32(20.5) and y[2] == np.float32(1000.0) and y[3] == np.inf
    assert y[4] == 0.0 and np.isnan(y[5]) and y[8] == 0.0
    np.testing.assert_allclose(y[6:8], np.log(2.0), rtol=1e-7)


def test_softplus_monotone_on_a_fine_grid():
    x = np.linspace(-30, 30, 1_000_001, dtype=np.float32)
    assert np.all(np.diff(vsoftplus(x)) >= 0)


# ---------------------------------------------------------------------------------------------
# the scan's shorter exp (kernels/_common.pxd rt_expf_fast): no denormal results

def vexp_fast(x):
    return _apply(info.vexp_fast, x)


def test_fast_exp_relative_error_bound():
    rng = np.random.default_rng(2)
    x = np.concatenate([
        np.linspace(-87, 88, 4_000_001, dtype=np.float32),
        rng.uniform(-20, 0, 2_000_000).astype(np.float32),            # delta*A <= 0 in the scan
        (rng.standard_normal(500_000) * 1e-3).astype(np.float32),
        np.float32(np.log(2)) * np.arange(-125, 127, dtype=np.float32),
    ])
    x = x[(x >= -87) & (x <= 88)]
    rel = np.abs(vexp_fast(x).astype(np.float64) / np.exp(x.astype(np.float64)) - 1.0)
    worst = int(rel.argmax())
    assert rel.max() <= 2e-7, f"max relative error {rel.max():.3e} at x = {x[worst]!r}"


def test_fast_exp_special_values_and_flush():
    x = np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, -87.0, -87.01, -104.0, 88.01, 1000.0], np.float32)
    y = vexp_fast(x)
    assert np.isnan(y[0]) and y[1] == 0.0 and y[2] == np.inf
    assert y[3] == 1.0 and y[4] == 1.0
    assert y[5] >= TINY                      # exp(-87) is still a normal float
    assert y[6] == 0.0 and y[7] == 0.0       # below -87: flushed to 0 (never a denormal)
    assert y[8] == np.inf and y[9] == np.inf


def test_fast_exp_monotone_on_a_fine_grid():
    x = np.linspace(-30, 10, 1_000_001, dtype=np.float32)
    assert np.all(np.diff(vexp_fast(x)) >= 0)


def test_fast_exp_without_upper_clamp_is_bitwise_the_same_up_to_88():
    """rt_expf_fast_le88 (the scan's exp(delta*A), delta*A <= 0) drops only the clamp above 88."""
    rng = np.random.default_rng(3)
    x = np.concatenate([
        np.linspace(-120, 88, 2_000_001, dtype=np.float32),
        rng.uniform(-20, 0, 1_000_000).astype(np.float32),
        np.float32([-np.inf, np.nan, -0.0, 0.0, -87.0, -87.00001, 88.0, -1e-45, 1e-45]),
    ])
    a, b = vexp_fast(x), _apply(info.vexp_fast_le88, x)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
