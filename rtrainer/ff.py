"""Forward-Forward (FF) local objective on a layer's D_skip (with the true gradient).

For a layer with input X (B,T,D) (the residual stream before the layer) and theta = D_skip (D,):

    h+[d] = mean_{b,t} X[b,t,d]
    h-[d] = mean_{b,t} X[b,(t+1) mod T,d] * m(t,d),   m(t,d) = +1 if t+d is even else -1
    s(h)  = sqrt(mean_i (h_i - mean(h))²) + 1e-5        (population std + eps; h is not centred)
    n(th) = |theta|_2 + 1e-5
    a     = h+/s(h+) - h-/s(h-)
    G     = a·theta / n(theta)                            (= goodness(h+) - goodness(h-))
    L     = max(0, margin - G)                            (reference margin: 1)

True gradient (the reference drops the second term, and so is 1e5 x too large at theta = 0):

    dL/dtheta = -( a/n - (a·theta) theta / (|theta| n²) )    if L > 0, else 0

At theta = 0 the direction theta/|theta| is taken as 0 (the one-sided derivative of |theta| has no
direction), so the gradient is -a/1e-5 there; rtrainer's `mamba` init starts D_skip at 1, and
new expansion layers keep their normally initialised D_skip, so that point is not met in practice.

The FF loss does not depend on the layer's other parameters (h+ and h- are of the layer INPUT):
it is a local objective on D_skip only, as in the reference. Computed in float64.
"""
from __future__ import annotations

import numpy as np

STD_EPS = 1e-5
NORM_EPS = 1e-5


def ff_vectors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (B,T,D) -> (h+, h-) (D,) float64."""
    B, T, D = x.shape
    S = x.sum(axis=0, dtype=np.float64)                       # (T, D): sum over the batch
    t = np.arange(T)[:, None]
    d = np.arange(D)[None, :]
    mask = np.where((t + d) % 2 == 0, 1.0, -1.0)
    h_pos = S.sum(axis=0) / (B * T)
    h_neg = (np.roll(S, -1, axis=0) * mask).sum(axis=0) / (B * T)   # row t holds x[(t+1) mod T]
    return h_pos, h_neg


def _scaled(h: np.ndarray) -> np.ndarray:
    return h / (np.sqrt(np.mean((h - h.mean()) ** 2)) + STD_EPS)


def ff_loss(theta: np.ndarray, h_pos: np.ndarray, h_neg: np.ndarray, margin: float = 1.0) -> float:
    theta = np.asarray(theta, np.float64)
    a = _scaled(h_pos) - _scaled(h_neg)
    G = float(a @ theta) / (float(np.linalg.norm(theta)) + NORM_EPS)
    return max(0.0, margin - G)


def ff_loss_grad(theta: np.ndarray, h_pos: np.ndarray, h_neg: np.ndarray,
                 margin: float = 1.0) -> tuple[float, np.ndarray]:
    """(L, dL/dtheta) for one layer, float64."""
    theta = np.asarray(theta, np.float64)
    a = _scaled(h_pos) - _scaled(h_neg)
    norm = float(np.linalg.norm(theta))
    n = norm + NORM_EPS
    at = float(a @ theta)
    L = margin - at / n
    if L <= 0.0:
        return 0.0, np.zeros_like(theta)
    dG = a / n
    if norm > 0.0:
        dG = dG - (at / (norm * n * n)) * theta
    return L, -dG
