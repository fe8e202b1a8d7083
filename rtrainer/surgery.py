"""Gradient surgery: how the Forward-Forward gradient f of a layer's D_skip is combined with the
backprop gradient b of the same tensor on a BP step.

All functions work on flat float64 vectors of one layer (shape (D,)). With eps = max(epsilon, 0):

    conflict   f·b < 0                                    (measured before surgery)
    none       f' = f
    pcgrad     f' = f                          if f·b >= 0
               f' = f - (f·b / (|b|² + eps)) b  otherwise   (project out the conflicting part)
    orthograd  f' = f - (f·b / (|b|² + eps)) b  always      (keep only the part orthogonal to b)
    gradnorm   f' = lam·f,  lam = exp(alpha·| f/(|f|+eps) - b/(|b|+eps) |)   (in [1, e^{2 alpha}];
               amplifies FF when the directions disagree; exact exp, not the reference's fast_exp)
    cagrad     f' = f                          if f·b >= 0
               f' = f - (lambda·f·b / (|b|² + eps)) b otherwise  (lambda = cagrad_lambda >= 0;
               lambda = 1 is pcgrad, lambda < 1 removes only part of the conflict)

The combined gradient of D_skip is b + f' (see rtrainer/staged.py for the weight). None of the rules
keeps state between steps (the reference's GradNorm variant is this closed form, not the
loss-weight learning of Chen et al.), so nothing about surgery needs saving in a checkpoint
beyond the method and its parameters (which come from the run file).
"""
from __future__ import annotations

import math

import numpy as np

METHODS = ("none", "pcgrad", "orthograd", "gradnorm", "cagrad")


def _project_out(f: np.ndarray, b: np.ndarray, dot: float, eps: float, weight: float = 1.0) -> np.ndarray:
    return f - (weight * dot / (float(b @ b) + eps)) * b


def combine(method: str, f: np.ndarray, b: np.ndarray, epsilon: float = 1e-8, gradnorm_alpha: float = 0.2,
            cagrad_lambda: float = 1.0) -> tuple[np.ndarray, bool]:
    """(f', conflict): the surgered FF gradient and whether f and b conflicted (f·b < 0)."""
    f = np.asarray(f, np.float64)
    b = np.asarray(b, np.float64)
    eps = max(float(epsilon), 0.0)
    dot = float(f @ b)
    conflict = dot < 0.0
    if method == "none":
        out = f.copy()
    elif method == "pcgrad":
        out = _project_out(f, b, dot, eps) if conflict else f.copy()
    elif method == "orthograd":
        out = _project_out(f, b, dot, eps)
    elif method == "gradnorm":
        nf, nb = float(np.linalg.norm(f)), float(np.linalg.norm(b))
        diff = f / (nf + eps) - b / (nb + eps)
        out = math.exp(gradnorm_alpha * float(np.linalg.norm(diff))) * f
    elif method == "cagrad":
        out = _project_out(f, b, dot, eps, max(float(cagrad_lambda), 0.0)) if conflict else f.copy()
    else:
        raise ValueError(f"unknown surgery method {method!r}; expected one of {', '.join(METHODS)}")
    return out, conflict
