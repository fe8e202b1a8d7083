"""float64 reference of the whole model: the kernels' references composed exactly as model.py
composes the kernels, with numpy matrix products. Same parameter names as the flat buffer."""
from __future__ import annotations

import numpy as np

from ._ref_layer import conv_backward_ref, conv_forward_ref, scan_backward_ref, scan_forward_ref
from ._ref_misc import (embed_backward_ref, embed_forward_ref, hpn_backward_ref, hpn_forward_ref,
                        layernorm_backward_ref, layernorm_forward_ref)

LN_EPS = 1e-5


def model_loss_and_grads_ref(params, ids, targets, *, n_layers, d_state, dt_rank,
                             normalize_prototypes=True, learnable_prototypes=True, chunk=4):
    """Loss and gradients of the mamba-lite stack + final LayerNorm + HPN head, in float64.

    params: name -> array (see rtrainer.model.layer_param_specs; "embedding", "head.prototypes")
    ids, targets: (B,T) int64. Returns (loss, {name: grad}); head.prototypes only if learnable.
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = ids.shape
    V, D = p["embedding"].shape
    N, R = d_state, dt_rank
    f64 = np.float64
    nc = -(-T // chunk)
    r = [np.zeros((B, T, D), f64)]
    embed_forward_ref(r[0], ids, p["embedding"], 1)
    cache = []
    for i in range(n_layers):
        q = f"layers.{i}."
        pre, u = np.zeros((B, T, D)), np.zeros((B, T, D))
        conv_forward_ref(pre, u, r[i], p[q + "conv_w"], p[q + "conv_b"], 1)
        xdbl = u @ p[q + "x_proj_w"]
        dt = xdbl[..., 2 * N:] @ p[q + "dt_proj_w"]
        y, hs = np.zeros((B, T, D)), np.zeros((B, nc, D, N))
        scan_forward_ref(y, hs, u, dt, p[q + "dt_proj_b"], p[q + "A_log"], xdbl, p[q + "D_skip"], chunk, 1)
        r.append(r[i] + y @ p[q + "out_proj_w"])
        cache.append((pre, u, xdbl, dt, y, hs))
    z, rstd = np.zeros((B * T, D)), np.zeros(B * T)
    layernorm_forward_ref(z, rstd, r[-1].reshape(B * T, D), LN_EPS, 1)
    t = targets.reshape(-1).astype(np.int64)
    cos = np.zeros(B * T)
    P = p["head.prototypes"]
    loss = hpn_forward_ref(cos, z, P, t, normalize_prototypes, 1)

    g = {k: np.zeros_like(v) for k, v in p.items()}
    dz = np.zeros((B * T, D))
    hpn_backward_ref(dz, g["head.prototypes"], z, P, t, cos, normalize_prototypes, True, 1.0, 1)
    dr = np.zeros((B * T, D))
    layernorm_backward_ref(dr, dz, z, rstd, 1)
    dr = dr.reshape(B, T, D)
    for i in reversed(range(n_layers)):
        q = f"layers.{i}."
        pre, u, xdbl, dt, y, hs = cache[i]
        g[q + "out_proj_w"] += y.reshape(-1, D).T @ dr.reshape(-1, D)
        dy = dr @ p[q + "out_proj_w"].T
        du, ddt, dxdbl = np.zeros((B, T, D)), np.zeros((B, T, D)), np.zeros((B, T, 2 * N + R))
        scan_backward_ref(du, ddt, g[q + "dt_proj_b"], g[q + "A_log"], dxdbl, g[q + "D_skip"], dy, u, dt,
                          p[q + "dt_proj_b"], p[q + "A_log"], xdbl, p[q + "D_skip"], hs, chunk, 1)
        g[q + "dt_proj_w"] += xdbl[..., 2 * N:].reshape(-1, R).T @ ddt.reshape(-1, D)
        dxdbl[..., 2 * N:] = ddt @ p[q + "dt_proj_w"].T
        g[q + "x_proj_w"] += u.reshape(-1, D).T @ dxdbl.reshape(-1, 2 * N + R)
        du += dxdbl @ p[q + "x_proj_w"].T
        dx = np.zeros((B, T, D))
        conv_backward_ref(dx, g[q + "conv_w"], g[q + "conv_b"], du, r[i], pre, p[q + "conv_w"], 1)
        dr = dr + dx
    embed_backward_ref(g["embedding"], ids, dr, 1)
    if not learnable_prototypes:
        del g["head.prototypes"]
    return float(loss), g
