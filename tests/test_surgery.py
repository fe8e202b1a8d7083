"""Each gradient-surgery rule against its formula (docs/staged-training.md) on hand-made vectors: aligned,
conflicting, orthogonal and zero; the projecting rules remove the conflict where they should."""
import math

import numpy as np
import pytest

from rtrainer.surgery import METHODS, combine

EPS = 1e-8
F = np.array([1.0, 0.0, 0.0])
ALIGNED = np.array([1.0, 1.0, 0.0])        # f·b = 1 > 0
CONFLICT = np.array([-1.0, 1.0, 0.0])      # f·b = -1 < 0
ORTHO = np.array([0.0, 1.0, 0.0])          # f·b = 0
ZERO = np.zeros(3)


def proj(f, b, w=1.0):
    return f - w * (f @ b) / (b @ b + EPS) * b


def gn_scale(f, b, alpha):
    return math.exp(alpha * np.linalg.norm(f / (np.linalg.norm(f) + EPS) - b / (np.linalg.norm(b) + EPS)))


@pytest.mark.parametrize("b", [ALIGNED, CONFLICT, ORTHO, ZERO], ids=["aligned", "conflict", "ortho", "zero"])
def test_each_rule_matches_its_formula(b):
    conflict = F @ b < 0
    expect = {
        "none": F,
        "pcgrad": proj(F, b) if conflict else F,
        "orthograd": proj(F, b),
        "gradnorm": gn_scale(F, b, 0.3) * F,
        "cagrad": proj(F, b, 0.5) if conflict else F,
    }
    for m in METHODS:
        out, c = combine(m, F, b, EPS, gradnorm_alpha=0.3, cagrad_lambda=0.5)
        assert c == conflict, m
        np.testing.assert_allclose(out, expect[m], rtol=1e-12, atol=1e-15, err_msg=m)


def test_hand_computed_values():
    # conflicting: f - (f·b/|b|²) b = [1,0,0] + 0.5 [-1,1,0]
    np.testing.assert_allclose(combine("pcgrad", F, CONFLICT)[0], [0.5, 0.5, 0.0], atol=1e-8)
    np.testing.assert_allclose(combine("cagrad", F, CONFLICT, cagrad_lambda=0.5)[0], [0.75, 0.25, 0.0], atol=1e-8)
    # aligned: pcgrad keeps f bitwise, orthograd keeps only the orthogonal part
    assert np.array_equal(combine("pcgrad", F, ALIGNED)[0], F)
    np.testing.assert_allclose(combine("orthograd", F, ALIGNED)[0], [0.5, -0.5, 0.0], atol=1e-8)
    # gradnorm: |[1,0,0] - [0,1,0]| = sqrt 2
    np.testing.assert_allclose(combine("gradnorm", F, ORTHO, gradnorm_alpha=0.2)[0], math.exp(0.2 * math.sqrt(2)) * F)
    # orthogonal and zero b: the projections change nothing
    for m in ("pcgrad", "orthograd", "cagrad"):
        assert np.array_equal(combine(m, F, ORTHO)[0], F), m
        assert np.array_equal(combine(m, F, ZERO)[0], F), m
    # zero f stays zero under every rule
    for m in METHODS:
        assert not np.any(combine(m, ZERO, CONFLICT)[0]), m


def test_projection_removes_conflict_on_random_vectors():
    rng = np.random.default_rng(0)
    n_conf = 0
    for _ in range(200):
        f, b = rng.normal(size=16), rng.normal(size=16)
        for m in ("pcgrad", "orthograd"):
            out, c = combine(m, f, b)
            assert out @ b >= -1e-9 * np.linalg.norm(f) * np.linalg.norm(b), m
        out, c = combine("cagrad", f, b, cagrad_lambda=0.5)
        if c:
            n_conf += 1
            assert f @ b < out @ b < 0          # half the conflict removed
        out, _ = combine("gradnorm", f, b, gradnorm_alpha=0.2)
        s = np.linalg.norm(out) / np.linalg.norm(f)
        assert 1.0 <= s <= math.exp(0.4) + 1e-12
    assert n_conf > 50


def test_gradnorm_scale_grows_with_disagreement():
    s = [np.linalg.norm(combine("gradnorm", F, b)[0]) for b in (F, ALIGNED, ORTHO, CONFLICT, -F)]
    assert s == sorted(s) and s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(math.exp(0.4))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown surgery method 'cagradstep'"):
        combine("cagradstep", F, F)
