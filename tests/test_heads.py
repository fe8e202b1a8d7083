"""HPNHead.predict (a BLAS product) against the float64 reference hpn_predict_ref, and its
consistency with the loss kernel."""
import numpy as np
import pytest

from rtrainer._kernels import hpn
from rtrainer.heads import HPNHead
from rtrainer.params import FlatParams
from rtrainer.testing.reference import hpn_predict_ref


def head_with(P, normalize):
    h = HPNHead(P.shape[0], P.shape[1], normalize=normalize, learnable=False)
    flat = FlatParams(h.param_specs())
    h.bind(flat.params, flat.grads)
    flat.params["head.prototypes"][...] = P
    return h


@pytest.mark.parametrize("n,V,D", [(1, 1, 3), (5, 3, 1), (37, 20, 16), (2500, 50, 8)])
@pytest.mark.parametrize("normalize", [True, False])
def test_predict_matches_reference_and_the_loss(n, V, D, normalize):
    rng = np.random.default_rng([n, V, D, normalize])
    P = (rng.normal(size=(V, D)) * rng.uniform(0.5, 2.0, size=(V, 1))).astype(np.float32)
    k = rng.integers(0, V, size=n)     # tokens near a known prototype, away from ties
    z = (P[k] / np.linalg.norm(P[k], axis=1, keepdims=True) * rng.uniform(0.5, 3.0, size=(n, 1))
         + 0.05 * rng.normal(size=(n, D))).astype(np.float32)
    pred = head_with(P, normalize).predict(z, block=1000)   # several blocks for n = 2500
    want = np.empty(n, np.int64)
    hpn_predict_ref(want, z.astype(np.float64), P.astype(np.float64), normalize, 1)
    np.testing.assert_array_equal(pred, want)
    # the predicted prototype has the highest cosine as the loss kernel computes it
    cos = np.empty(n, np.float32)
    hpn.hpn_forward(cos, z, P, pred, normalize, 1)
    for kk in range(V):
        other = np.empty(n, np.float32)
        hpn.hpn_forward(other, z, P, np.full(n, kk, np.int64), normalize, 1)
        assert np.all(other <= cos + 1e-6)


def test_predict_first_max_wins():
    P = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]], np.float32)
    z = np.array([[3.0, 0.0], [0.0, 0.0], [0.0, 2.0]], np.float32)
    for normalize, first in ((True, 1), (False, 2)):
        np.testing.assert_array_equal(head_with(P, normalize).predict(z), [first, 0, 0])
        want = np.empty(3, np.int64)
        hpn_predict_ref(want, z.astype(np.float64), P.astype(np.float64), normalize, 1)
        np.testing.assert_array_equal(want, [first, 0, 0])
