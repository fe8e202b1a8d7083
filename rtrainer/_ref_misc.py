"""float64 NumPy oracles for the embedding, final LayerNorm, HPN head and optimizer kernels.

Glossary (SPEC notation): B batch, T sequence length, D d_model, V vocab size, n = B*T tokens,
P (optimizer) number of scalars in the flat parameter buffer, S number of segments.
z hidden state after the final LayerNorm, P (HPN) prototypes (V,D), ẑ = z/max(‖z‖, 1e-8),
P̃ = P/max(‖P‖, 1e-8) when prototypes are normalized, else P.

Each function mirrors the kernel of the same name without `_ref` in rtrainer._kernels.{embed, norm,
hpn, optim}: identical parameter names and order, writes into (or, for gradients, ADDS into) the
float64 arrays it is given, returns the same scalar, accepts and ignores n_threads. Plain, literal
NumPy: these are the specification the kernels are tested against, not fast code.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "embed_forward_ref", "embed_backward_ref", "layernorm_forward_ref", "layernorm_backward_ref",
    "hpn_forward_ref", "hpn_backward_ref", "hpn_predict_ref", "sumsq_ref", "adamw_step_ref",
]

NORM_EPS = 1e-8  # floor of ‖z‖ and ‖P‖ in the HPN head (SPEC §2.2)


def _check_ids(ids, V):
    ids = np.asarray(ids)
    bad = np.argwhere((ids < 0) | (ids >= V))
    if len(bad):
        b, t = (int(x) for x in bad[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (b={b}, t={t}) is outside [0, {V})")


def _check_targets(targets, V):
    targets = np.asarray(targets)
    bad = np.flatnonzero((targets < 0) | (targets >= V))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"target {int(targets[i])} at index {i} is outside [0, {V})")


# ------------------------------------------------------------------------------------------ embed

def embed_forward_ref(out, ids, E, n_threads):
    """out (B,T,D) OUT = E[ids];  ids (B,T) int IN;  E (V,D) IN. ValueError on ids outside [0,V)."""
    _check_ids(ids, E.shape[0])
    out[...] = E[ids]


def embed_backward_ref(dE, ids, dout, n_threads):
    """dE (V,D) OUT, +=: dE[ids[b,t]] += dout[b,t];  ids (B,T) IN;  dout (B,T,D) IN."""
    _check_ids(ids, dE.shape[0])
    D = dE.shape[1]
    np.add.at(dE, np.asarray(ids).reshape(-1), dout.reshape(-1, D))


# ------------------------------------------------------------------------------------------- norm

def layernorm_forward_ref(z, rstd, x, eps, n_threads):
    """z (n,D) OUT = (x - mean)·rstd;  rstd (n) OUT = 1/sqrt(var + eps) (biased var);  x (n,D) IN."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    r = 1.0 / np.sqrt(var + eps)
    z[...] = (x - mean) * r
    rstd[...] = r[:, 0]


def layernorm_backward_ref(dx, dz, z, rstd, n_threads):
    """dx (n,D) OUT, += rstd·(dz - mean(dz) - z·mean(dz·z));  dz, z (n,D) IN;  rstd (n) IN."""
    a = dz.mean(axis=1, keepdims=True)
    b = (dz * z).mean(axis=1, keepdims=True)
    dx += rstd[:, None] * (dz - a - z * b)


# -------------------------------------------------------------------------------------------- hpn

def _floored_norm(a):
    """(norm, max(norm, 1e-8)) of the rows of a (m,D)."""
    nrm = np.sqrt((a * a).sum(axis=1))
    return nrm, np.maximum(nrm, NORM_EPS)


def _prototypes(P, normalize):
    """P̃ (V,D), the floored norms (V) (ones if raw) and the raw norms (V)."""
    nrm, nrmc = _floored_norm(P)
    if normalize:
        return P / nrmc[:, None], nrmc, nrm
    return np.array(P, dtype=np.float64), np.ones(len(P)), nrm


def hpn_forward_ref(cos, z, P, targets, normalize, n_threads):
    """cos (n) OUT = ẑ_i·P̃[targets_i];  z (n,D), P (V,D), targets (n) int IN.
    Returns loss = mean_i (1 - cos_i)²."""
    if z.shape[0] == 0:
        raise ValueError(f"hpn_forward: z has shape {z.shape}; need at least one token")
    _check_targets(targets, P.shape[0])
    _, nzc = _floored_norm(z)
    zhat = z / nzc[:, None]
    Pt, _, _ = _prototypes(P, normalize)
    cos[...] = (zhat * Pt[targets]).sum(axis=1)
    return float(np.mean((1.0 - cos) ** 2))


def hpn_backward_ref(dz, dP, z, P, targets, cos, normalize, learnable, scale, n_threads):
    """Gradients of scale·loss, ADDED into dz (n,D) and, only if learnable, dP (V,D) (else dP is not
    touched and may be (0,D)).  z (n,D), P (V,D), targets (n), cos (n) from the forward, all IN.

        c_i = -2·scale·(1 - cos_i)/n ;  dẑ_i = c_i·P̃[t_i]
        dz_i += (dẑ_i - (dẑ_i·ẑ_i) ẑ_i)/max(‖z_i‖, 1e-8)        (dẑ_i/1e-8 if ‖z_i‖ < 1e-8)
        g_k = Σ_{i: t_i = k} c_i ẑ_i
        dP_k += (g_k - (g_k·P̃_k) P̃_k)/max(‖P_k‖, 1e-8)         (normalize; g_k/1e-8 if ‖P_k‖ < 1e-8)
        dP_k += g_k                                              (raw prototypes)
    """
    n = z.shape[0]
    if n == 0:
        raise ValueError(f"hpn_backward: z has shape {z.shape}; need at least one token")
    _check_targets(targets, P.shape[0])
    nz, nzc = _floored_norm(z)
    zhat = z / nzc[:, None]
    Pt, _, _ = _prototypes(P, normalize)
    c = -2.0 * scale * (1.0 - np.asarray(cos, dtype=np.float64)) / n
    dzhat = c[:, None] * Pt[targets]
    proj = (dzhat * zhat).sum(axis=1)
    grad_z = np.where((nz >= NORM_EPS)[:, None], dzhat - proj[:, None] * zhat, dzhat)
    dz += grad_z / nzc[:, None]
    if not learnable:
        return
    g = np.zeros(P.shape, dtype=np.float64)
    np.add.at(g, np.asarray(targets), c[:, None] * zhat)
    if normalize:
        npn, npc = _floored_norm(P)
        gp = (g * Pt).sum(axis=1)
        grad_P = np.where((npn >= NORM_EPS)[:, None], g - gp[:, None] * Pt, g)
        dP += grad_P / npc[:, None]
    else:
        dP += g


def hpn_predict_ref(pred, z, P, normalize, n_threads):
    """pred (n) int OUT = argmax_k ẑ_i·P̃_k (first max wins);  z (n,D), P (V,D) IN."""
    _, nzc = _floored_norm(z)
    Pt, _, _ = _prototypes(P, normalize)
    pred[...] = np.argmax((z / nzc[:, None]) @ Pt.T, axis=1)


# ------------------------------------------------------------------------------------------ optim

def _segments(segments, P, disjoint=False):
    """[(start, end, flag)] from segments (S,3), validated like the kernels do."""
    segments = np.asarray(segments).reshape(-1, 3)
    for s, (lo, hi, _) in enumerate(segments):
        if lo < 0 or hi < lo or hi > P:
            raise ValueError(f"segment {s} = [{lo}, {hi}) is not a range inside [0, {P})")
    if disjoint:
        ranges = sorted((int(lo), int(hi), s) for s, (lo, hi, _) in enumerate(segments) if hi > lo)
        for (lo0, hi0, s0), (lo1, hi1, s1) in zip(ranges, ranges[1:]):
            if lo1 < hi0:
                raise ValueError(f"segments {s0} = [{lo0}, {hi0}) and {s1} = [{lo1}, {hi1}) overlap")
    return [(int(lo), int(hi), bool(flag)) for lo, hi, flag in segments]


def sumsq_ref(g, segments, n_threads):
    """Σ g_i² over every [start, end) row of segments (S,3) (start, end, flag);  g (P) IN."""
    g = np.asarray(g, dtype=np.float64)
    return float(sum(np.sum(g[lo:hi] ** 2) for lo, hi, _ in _segments(segments, len(g))))


def adamw_step_ref(p, g, m, v, segments, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                   n_threads):
    """One PyTorch-style AdamW update, in place on p, m, v (P) OUT, from g (P) IN, on the
    [start, end) rows of segments (S,3) (start, end, decay_flag); step >= 1 counts updates.

        gs = g·grad_scale ; m = β1·m + (1-β1)·gs ; v = β2·v + (1-β2)·gs²
        bc1 = 1 - β1^step ; bc2 = 1 - β2^step
        p = p·(1 - lr·wd) if decay_flag ;  p = p - (lr/bc1)·m/(sqrt(v)/sqrt(bc2) + eps)
    """
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1 (number of this update), got {step}")
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    for lo, hi, decay in _segments(segments, len(p), disjoint=True):
        sl = slice(lo, hi)
        gs = g[sl] * grad_scale
        m[sl] = beta1 * m[sl] + (1.0 - beta1) * gs
        v[sl] = beta2 * v[sl] + (1.0 - beta2) * gs * gs
        if decay:
            p[sl] = p[sl] * (1.0 - lr * weight_decay)
        p[sl] = p[sl] - (lr / bc1) * m[sl] / (np.sqrt(v[sl]) / np.sqrt(bc2) + eps)
