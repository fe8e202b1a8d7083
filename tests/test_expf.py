"""The kernels' vectorised float32 exp (kernels/_common.pxd rt_expf): relative error <= 2e-7
against float64 exp wherever the result is a normal float, and the right special values.
(The reference trainer's 0.2.0 'fast' exp was wrong by 2.5x near -2: this is the guard.)"""
import numpy as np

from rtrainer._kernels import info

TINY = np.finfo(np.float32).tiny


def vexp(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    info.vexp(out, x)
    return out


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
