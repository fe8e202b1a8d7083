"""float64 NumPy reference of every kernel and of the whole model: the oracle of the tests.

Glossary (notation):
    B  batch size                      T  sequence length (time)
    D  channels (d_model)              N  state size (d_state)
    K  causal conv taps (d_conv)       R  dt rank (x_proj emits 2N+R columns: [Bt | Ct | draw])
    V  vocabulary size                 n  tokens in a batch (B*T)

Each kernel `rtrainer._kernels.<module>.<name>` has a reference `<name>_ref` here with exactly
the same parameters in the same order (tests/test_reference_api.py checks this). Like the kernels
they write into (forward) or ADD into (backward) the float64 arrays passed in, and accept and
ignore `n_threads`. Readability over speed: plain loops over t, vectorised over the other axes.
Unlike the kernels, the scan reference keeps the full state trajectory (B, T+1, D, N).

`model_loss_and_grads_ref` composes them exactly as rtrainer.model composes the kernels.
"""
from __future__ import annotations

import numpy as np


# ============================================================ layer: conv, scan

SOFTPLUS_THRESHOLD = 20.0


def sigmoid_ref(x):
    """1/(1+exp(-x)), elementwise, without overflow warnings."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu_ref(p):
    """silu(p) = p * sigmoid(p)."""
    p = np.asarray(p, dtype=np.float64)
    return p * sigmoid_ref(p)


def softplus_ref(x):
    """softplus(x) = x if x > 20 else log1p(exp(x))."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))


def _shifted(x, s):
    """x[:, t-s, :] with zeros for t < s.  x: (B,T,D)."""
    out = np.zeros_like(x)
    if s < x.shape[1]:
        out[:, s:] = x[:, : x.shape[1] - s]
    return out


# ------------------------------------------------------------------------------------------------
# conv
# ------------------------------------------------------------------------------------------------

def conv_forward_ref(pre, u, x, conv_w, conv_b, n_threads):
    """Causal depthwise conv + SiLU.

    pre    (B,T,D) OUT  pre[b,t,d] = conv_b[d] + sum_k conv_w[d,k] * x[b, t+k-(K-1), d]  (zero pad)
    u      (B,T,D) OUT  u = silu(pre)
    x      (B,T,D) IN
    conv_w (D,K)   IN
    conv_b (D,)    IN
    """
    K = conv_w.shape[1]
    acc = np.broadcast_to(np.asarray(conv_b, np.float64), x.shape).copy()
    for k in range(K):
        acc += conv_w[:, k] * _shifted(np.asarray(x, np.float64), K - 1 - k)
    pre[...] = acc
    u[...] = silu_ref(acc)


def conv_backward_ref(dx, dconv_w, dconv_b, du, x, pre, conv_w, n_threads):
    """Backward of conv_forward_ref; ADDS into dx (B,T,D), dconv_w (D,K), dconv_b (D,).

    du (B,T,D) IN dL/du;  x, pre (B,T,D) IN;  conv_w (D,K) IN.
    dpre = du * s*(1 + pre*(1-s)), s = sigmoid(pre).
    """
    K = conv_w.shape[1]
    T = x.shape[1]
    p = np.asarray(pre, np.float64)
    s = sigmoid_ref(p)
    dpre = du * s * (1.0 + p * (1.0 - s))
    dconv_b += dpre.sum(axis=(0, 1))
    for k in range(K):
        sh = K - 1 - k                       # tap k reads x[t - sh]
        dconv_w[:, k] += (dpre * _shifted(np.asarray(x, np.float64), sh)).sum(axis=(0, 1))
        if sh < T:
            dx[:, : T - sh] += dpre[:, sh:] * conv_w[:, k]


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------

def _trajectory(u, dt, dt_bias, A_log, xdbl):
    """Full float64 trajectory. Returns delta (B,T,D), A (D,N), E (B,T,D,N) = exp(delta*A),
    H (B,T+1,D,N) with H[:, t+1] = h_t and H[:, 0] = h_{-1} = 0."""
    u = np.asarray(u, np.float64)
    N = A_log.shape[1]
    Bt = np.asarray(xdbl[..., :N], np.float64)
    delta = softplus_ref(np.asarray(dt, np.float64) + dt_bias)
    A = -np.exp(np.asarray(A_log, np.float64))
    Bsz, T, D = u.shape
    E = np.exp(delta[..., None] * A)                               # (B,T,D,N)
    H = np.zeros((Bsz, T + 1, D, N))
    for t in range(T):
        # h_t = exp(delta_t*A) * h_{t-1} + (delta_t*u_t) (x) Bt_t
        H[:, t + 1] = E[:, t] * H[:, t] + (delta[:, t] * u[:, t])[:, :, None] * Bt[:, t, None, :]
    return delta, A, E, H


def scan_forward_ref(y, hs, u, dt, dt_bias, A_log, xdbl, D_skip, chunk, n_threads):
    """Selective scan forward.

    y       (B,T,D)                OUT  y_t = h_t . Ct_t + D_skip * u_t
    hs      (B,ceil(T/chunk),D,N)  OUT  hs[:, c] = h before step t = c*chunk (hs[:, 0] = 0)
    u       (B,T,D)     IN
    dt      (B,T,D)     IN  pre-bias; delta = softplus(dt + dt_bias)
    dt_bias (D,)        IN
    A_log   (D,N)       IN  A = -exp(A_log)
    xdbl    (B,T,2N+R)  IN  [Bt | Ct | draw]; draw is not read
    D_skip  (D,)        IN
    chunk   int >= 1
    """
    N = A_log.shape[1]
    T = u.shape[1]
    n_chunks = -(-T // chunk)
    if hs.shape != (u.shape[0], n_chunks, u.shape[2], N):
        raise ValueError(f"hs has shape {hs.shape}, expected {(u.shape[0], n_chunks, u.shape[2], N)}")
    Ct = np.asarray(xdbl[..., N:2 * N], np.float64)
    _, _, _, H = _trajectory(u, dt, dt_bias, A_log, xdbl)
    hs[...] = H[:, 0:T:chunk]
    y[...] = np.einsum("btdn,btn->btd", H[:, 1:], Ct) + D_skip * np.asarray(u, np.float64)


def scan_backward_ref(du, ddt, ddt_bias, dA_log, dxdbl, dD_skip, dy, u, dt, dt_bias, A_log,
                      xdbl, D_skip, hs, chunk, n_threads):
    """Backward of scan_forward_ref; ADDS into every gradient.

    du       (B,T,D)     dL/du
    ddt      (B,T,D)     dL/d(pre-bias dt) = ddelta * sigmoid(dt + dt_bias)
    ddt_bias (D,)        sum over b,t of ddt
    dA_log   (D,N)       dL/dA * A
    dxdbl    (B,T,2N+R)  [dBt | dCt | untouched]
    dD_skip  (D,)
    dy (B,T,D) IN dL/dy; the other inputs as scan_forward_ref; hs is only shape-checked (the
    reference recomputes and keeps the whole trajectory).
    """
    N = A_log.shape[1]
    Bsz, T, D = u.shape
    n_chunks = -(-T // chunk)
    if hs.shape != (Bsz, n_chunks, D, N):
        raise ValueError(f"hs has shape {hs.shape}, expected {(Bsz, n_chunks, D, N)}")
    u = np.asarray(u, np.float64)
    dy = np.asarray(dy, np.float64)
    Bt = np.asarray(xdbl[..., :N], np.float64)
    Ct = np.asarray(xdbl[..., N:2 * N], np.float64)
    delta, A, E, H = _trajectory(u, dt, dt_bias, A_log, xdbl)
    x = np.asarray(dt, np.float64) + dt_bias
    sg = sigmoid_ref(x)

    g = np.zeros((Bsz, D, N))                       # dL/dh_t
    dA = np.zeros((D, N))
    for t in range(T - 1, -1, -1):
        # y_t = h_t . Ct_t + D_skip*u_t
        g += dy[:, t, :, None] * Ct[:, t, None, :]
        dxdbl[:, t, N:2 * N] += np.einsum("bd,bdn->bn", dy[:, t], H[:, t + 1])
        du[:, t] += dy[:, t] * D_skip
        dD_skip += (dy[:, t] * u[:, t]).sum(axis=0)
        # h_t = E_t * h_{t-1} + delta_t*u_t*Bt_t
        dxdbl[:, t, :N] += np.einsum("bdn,bd->bn", g, delta[:, t] * u[:, t])
        gB = np.einsum("bdn,bn->bd", g, Bt[:, t])
        du[:, t] += delta[:, t] * gB
        q = g * E[:, t] * H[:, t]                      # dL/dE * E
        ddelta = np.einsum("bdn,dn->bd", q, A) + u[:, t] * gB
        dA += (delta[:, t, :, None] * q).sum(axis=0)
        ddt[:, t] += ddelta * sg[:, t]
        ddt_bias += (ddelta * sg[:, t]).sum(axis=0)
        g = g * E[:, t]
    dA_log += dA * A


# ============================================================ embedding, LayerNorm, HPN head, AdamW

NORM_EPS = 1e-8  # floor of ‖z‖ and ‖P‖ in the HPN head
IGNORE = -1      # targets equal to IGNORE are not scored (synthetic tasks score only their answers)


def _check_ids(ids, V):
    ids = np.asarray(ids)
    bad = np.argwhere((ids < 0) | (ids >= V))
    if len(bad):
        b, t = (int(x) for x in bad[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (b={b}, t={t}) is outside [0, {V})")


def _check_targets(targets, V, allow_ignore=False):
    targets = np.asarray(targets)
    neg = (targets < 0) & (targets != IGNORE) if allow_ignore else targets < 0
    bad = np.flatnonzero(neg | (targets >= V))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"target {int(targets[i])} at index {i} is outside [0, {V})"
                         + (" (and is not the ignore index -1)" if allow_ignore else ""))


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
    """cos (n) OUT = ẑ_i·P̃[targets_i] (0 where targets_i = -1);  z (n,D), P (V,D), targets (n)
    int in [0, V) or -1 (ignored) IN. Returns loss = mean over the scored tokens of (1 - cos_i)²
    (0 when no token is scored)."""
    if z.shape[0] == 0:
        raise ValueError(f"hpn_forward: z has shape {z.shape}; need at least one token")
    _check_targets(targets, P.shape[0], allow_ignore=True)
    keep = np.asarray(targets) != IGNORE
    _, nzc = _floored_norm(z)
    zhat = z / nzc[:, None]
    Pt, _, _ = _prototypes(P, normalize)
    cos[...] = np.where(keep, (zhat * Pt[np.where(keep, targets, 0)]).sum(axis=1), 0.0)
    return float(np.mean((1.0 - cos[keep]) ** 2)) if keep.any() else 0.0


def hpn_backward_ref(dz, dP, z, P, targets, cos, normalize, learnable, scale, n_threads):
    """Gradients of scale·loss, ADDED into dz (n,D) and, only if learnable, dP (V,D) (else dP is not
    touched and may be (0,D)).  z (n,D), P (V,D), targets (n), cos (n) from the forward, all IN.

        c_i = -2·scale·(1 - cos_i)/m ;  dẑ_i = c_i·P̃[t_i]      (m scored tokens; ignored: c_i = 0)
        dz_i += (dẑ_i - (dẑ_i·ẑ_i) ẑ_i)/max(‖z_i‖, 1e-8)        (dẑ_i/1e-8 if ‖z_i‖ < 1e-8)
        g_k = Σ_{i: t_i = k} c_i ẑ_i
        dP_k += (g_k - (g_k·P̃_k) P̃_k)/max(‖P_k‖, 1e-8)         (normalize; g_k/1e-8 if ‖P_k‖ < 1e-8)
        dP_k += g_k                                              (raw prototypes)
    """
    n = z.shape[0]
    if n == 0:
        raise ValueError(f"hpn_backward: z has shape {z.shape}; need at least one token")
    _check_targets(targets, P.shape[0], allow_ignore=True)
    keep = np.asarray(targets) != IGNORE
    if not keep.any():
        return
    # ignored tokens (target -1): c_i = 0 and the mean is over the m scored tokens
    z, targets, cos = z[keep], np.asarray(targets)[keep], np.asarray(cos)[keep]
    dz_all, dz = dz, np.zeros(z.shape)
    nz, nzc = _floored_norm(z)
    zhat = z / nzc[:, None]
    Pt, _, _ = _prototypes(P, normalize)
    c = -2.0 * scale * (1.0 - np.asarray(cos, dtype=np.float64)) / len(targets)
    dzhat = c[:, None] * Pt[targets]
    proj = (dzhat * zhat).sum(axis=1)
    grad_z = np.where((nz >= NORM_EPS)[:, None], dzhat - proj[:, None] * zhat, dzhat)
    dz += grad_z / nzc[:, None]
    dz_all[keep] += dz
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


# ============================================================ the whole model

LN_EPS = 1e-5


def model_loss_and_grads_ref(params, ids, targets, *, n_layers, d_state, dt_rank,
                             normalize_prototypes=True, learnable_prototypes=True, chunk=4,
                             selective=True):
    """Loss and gradients of the mamba-lite stack + final LayerNorm + HPN head, in float64.

    params: name -> array (see rtrainer.model.layer_param_specs; "embedding", "head.prototypes")
    ids, targets: (B,T) int64. Returns (loss, {name: grad}); head.prototypes only if learnable.
    selective=False: the LTI ablation (B_lti, C_lti (N,) instead of x_proj_w, dt_proj_w; dt = 0).
    dt_rank is implied by x_proj_w's shape (kept in the signature for the callers).
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = ids.shape
    V, D = p["embedding"].shape
    N = d_state
    nc = -(-T // chunk)
    r = [np.zeros((B, T, D))]
    embed_forward_ref(r[0], ids, p["embedding"], 1)
    cache = []
    for i in range(n_layers):
        q = f"layers.{i}."
        pre, u = np.zeros((B, T, D)), np.zeros((B, T, D))
        conv_forward_ref(pre, u, r[i], p[q + "conv_w"], p[q + "conv_b"], 1)
        xdbl, dt = _ssm_in_forward(p, q, u, N, selective)       # [Bt | Ct | draw] = u @ x_proj_w, ...
        y, hs = np.zeros((B, T, D)), np.zeros((B, nc, D, N))
        scan_forward_ref(y, hs, u, dt, p[q + "dt_proj_b"], p[q + "A_log"], xdbl, p[q + "D_skip"], chunk, 1)
        r.append(r[i] + y @ p[q + "out_proj_w"])
        cache.append((pre, u, xdbl, dt, y, hs))
    g = {k: np.zeros_like(v) for k, v in p.items()}
    loss, dr = _head_and_final_norm(p, g, r[-1], targets, normalize_prototypes)
    for i in reversed(range(n_layers)):
        q = f"layers.{i}."
        pre, u, xdbl, dt, y, hs = cache[i]
        g[q + "out_proj_w"] += y.reshape(-1, D).T @ dr.reshape(-1, D)
        dy = dr @ p[q + "out_proj_w"].T
        du, ddt, dxdbl = np.zeros((B, T, D)), np.zeros((B, T, D)), np.zeros(xdbl.shape)
        scan_backward_ref(du, ddt, g[q + "dt_proj_b"], g[q + "A_log"], dxdbl, g[q + "D_skip"], dy, u, dt,
                          p[q + "dt_proj_b"], p[q + "A_log"], xdbl, p[q + "D_skip"], hs, chunk, 1)
        _ssm_in_backward(p, g, q, u, xdbl, dxdbl, ddt, du, N, selective)
        dx = np.zeros((B, T, D))
        conv_backward_ref(dx, g[q + "conv_w"], g[q + "conv_b"], du, r[i], pre, p[q + "conv_w"], 1)
        dr = dr + dx
    embed_backward_ref(g["embedding"], ids, dr, 1)
    if not learnable_prototypes:
        del g["head.prototypes"]
    return float(loss), g


# ------------------------------------------------------------------------------------ softmax head

def softmax_xent_ref(logits, targets, scale, n_threads):
    """logits (n,V) IN, OVERWRITTEN with d(scale·loss)/dlogits; targets (n) in [0, V) or -1 (ignored).
    Returns loss = mean over the scored rows of logsumexp(logits_i) - logits_i[y_i] (0 if none).

        dlogits_i = (scale/m)(softmax(logits_i) - onehot(y_i)) for scored rows, 0 for ignored rows."""
    n, V = logits.shape
    if n == 0 or V == 0:
        raise ValueError(f"softmax_xent: logits has shape {logits.shape}; need at least one row and column")
    _check_targets(targets, V, allow_ignore=True)
    t = np.asarray(targets)
    keep = t != IGNORE
    m = int(keep.sum())
    x = np.asarray(logits, dtype=np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True)))[:, 0]
    rows = np.flatnonzero(keep)
    loss = float((lse[rows] - x[rows, t[rows]]).sum() / m) if m else 0.0
    d = np.zeros_like(x)
    if m:
        d[rows] = np.exp(x[rows] - lse[rows, None])
        d[rows, t[rows]] -= 1.0
        d *= scale / m
    logits[...] = d
    return loss


# ============================================================ the `mamba` block: RMSNorm, gate

def rmsnorm_forward_ref(out, rstd, x, w, eps, n_threads):
    """out (n,D) OUT = x·rstd·w;  rstd (n) OUT = 1/sqrt(mean(x²) + eps);  x (n,D), w (D) IN."""
    x = np.asarray(x, np.float64)
    r = 1.0 / np.sqrt((x * x).mean(axis=1) + eps)
    rstd[...] = r
    out[...] = x * r[:, None] * w


def rmsnorm_backward_ref(dx, dw, dout, x, rstd, w, n_threads):
    """Backward of rmsnorm_forward_ref; ADDS into dx (n,D) and dw (D).

        dx += rstd·w·dout - x·rstd³·Σ_j(dout·w·x)/D ;  dw += Σ_i dout·x·rstd
    dout, x (n,D), rstd (n), w (D) IN.
    """
    x = np.asarray(x, np.float64)
    r = np.asarray(rstd, np.float64)[:, None]
    D = x.shape[1]
    s = (dout * w * x).sum(axis=1, keepdims=True)
    dx += r * w * dout - x * r ** 3 * s / D
    dw += (dout * x * r).sum(axis=0)


def gate_forward_ref(out, y, z, n_threads):
    """out (n,C) OUT = y·silu(z);  y, z (n,C) IN."""
    out[...] = np.asarray(y, np.float64) * silu_ref(z)


def gate_backward_ref(dy, dz, out, dout, y, z, n_threads):
    """Backward of gate_forward_ref: ADDS dout·silu(z) into dy and dout·y·silu'(z) into dz (n,C);
    writes out = y·silu(z) again (the kernel recomputes it for the out_proj weight gradient).
    silu'(z) = s·(1 + z·(1-s)), s = sigmoid(z).  dout, y, z (n,C) IN."""
    z = np.asarray(z, np.float64)
    s = sigmoid_ref(z)
    dy += dout * z * s
    dz += dout * y * s * (1.0 + z * (1.0 - s))
    out[...] = y * z * s


# ============================================================ the whole `mamba` model (the full Mamba block)

RMS_EPS = 1e-5


def _ssm_in_forward(p, q, u, N, selective):
    """(xdbl (B,T,2N+R), dt (B,T,C)) of layer prefix q from u (B,T,C)."""
    if selective:
        xdbl = u @ p[q + "x_proj_w"]
        return xdbl, xdbl[..., 2 * N:] @ p[q + "dt_proj_w"]
    Bsz, T, C = u.shape
    xdbl = np.concatenate([np.broadcast_to(p[q + "B_lti"], (Bsz, T, N)),
                           np.broadcast_to(p[q + "C_lti"], (Bsz, T, N))], axis=-1)
    return xdbl, np.zeros((Bsz, T, C))


def _ssm_in_backward(p, g, q, u, xdbl, dxdbl, ddt, du, N, selective):
    """Gradients of _ssm_in_forward: adds into g[...] and du; dxdbl (B,T,2N+R) holds [dBt | dCt | .]."""
    if not selective:
        g[q + "B_lti"] += dxdbl[..., :N].sum(axis=(0, 1))
        g[q + "C_lti"] += dxdbl[..., N:2 * N].sum(axis=(0, 1))
        return
    C = u.shape[-1]
    W = xdbl.shape[-1]
    R = W - 2 * N
    g[q + "dt_proj_w"] += xdbl[..., 2 * N:].reshape(-1, R).T @ ddt.reshape(-1, C)
    dxdbl[..., 2 * N:] = ddt @ p[q + "dt_proj_w"].T
    g[q + "x_proj_w"] += u.reshape(-1, C).T @ dxdbl.reshape(-1, W)
    du += dxdbl @ p[q + "x_proj_w"].T


def _head_and_final_norm(p, g, r_last, targets, normalize_prototypes):
    """LayerNorm + HPN head: (loss, dL/dr_last (B,T,D)); adds dP into g["head.prototypes"]."""
    B, T, D = r_last.shape
    z, rstd = np.zeros((B * T, D)), np.zeros(B * T)
    layernorm_forward_ref(z, rstd, r_last.reshape(B * T, D), LN_EPS, 1)
    t = targets.reshape(-1).astype(np.int64)
    cos = np.zeros(B * T)
    P = p["head.prototypes"]
    loss = hpn_forward_ref(cos, z, P, t, normalize_prototypes, 1)
    dz = np.zeros((B * T, D))
    hpn_backward_ref(dz, g["head.prototypes"], z, P, t, cos, normalize_prototypes, True, 1.0, 1)
    dr = np.zeros((B * T, D))
    layernorm_backward_ref(dr, dz, z, rstd, 1)
    return loss, dr.reshape(B, T, D)


def mamba_model_loss_and_grads_ref(params, ids, targets, *, n_layers, d_state,
                                   normalize_prototypes=True, learnable_prototypes=True, chunk=4,
                                   selective=True):
    """Loss and gradients of the `mamba` stack + final LayerNorm + HPN head, in float64.

    Per layer (C = E*D; shapes are read from params, see rtrainer.model.mamba_layer_param_specs):
        xn = x·rstd·norm_w ; [xin | zg] = xn @ in_proj_w ; pre, u = conv(xin), silu
        [Bt|Ct|draw] = u @ x_proj_w ; dt = draw @ dt_proj_w ; y = scan(...)
        r += (y·silu(zg)) @ out_proj_w
    selective=False: B_lti, C_lti (N,) replace x_proj_w, dt_proj_w and dt = 0.
    Returns (loss, {name: grad}); head.prototypes only if learnable.
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = ids.shape
    V, D = p["embedding"].shape
    N = d_state
    nc = -(-T // chunk)
    BT = B * T
    r = [np.zeros((B, T, D))]
    embed_forward_ref(r[0], ids, p["embedding"], 1)
    cache = []
    for i in range(n_layers):
        q = f"layers.{i}."
        C = p[q + "conv_w"].shape[0]
        xn, rstd = np.zeros((BT, D)), np.zeros(BT)
        rmsnorm_forward_ref(xn, rstd, r[i].reshape(BT, D), p[q + "norm_w"], RMS_EPS, 1)
        xz = (xn @ p[q + "in_proj_w"]).reshape(B, T, 2 * C)
        xin, zg = xz[..., :C], xz[..., C:]
        pre, u = np.zeros((B, T, C)), np.zeros((B, T, C))
        conv_forward_ref(pre, u, xin, p[q + "conv_w"], p[q + "conv_b"], 1)
        xdbl, dt = _ssm_in_forward(p, q, u, N, selective)
        y, hs = np.zeros((B, T, C)), np.zeros((B, nc, C, N))
        scan_forward_ref(y, hs, u, dt, p[q + "dt_proj_b"], p[q + "A_log"], xdbl, p[q + "D_skip"], chunk, 1)
        yg = np.zeros((BT, C))
        gate_forward_ref(yg, y.reshape(BT, C), zg.reshape(BT, C), 1)
        r.append(r[i] + (yg @ p[q + "out_proj_w"]).reshape(B, T, D))
        cache.append((xn, rstd, xin, zg, pre, u, xdbl, dt, y, hs))
    g = {k: np.zeros_like(v) for k, v in p.items()}
    loss, dr = _head_and_final_norm(p, g, r[-1], targets, normalize_prototypes)
    for i in reversed(range(n_layers)):
        q = f"layers.{i}."
        xn, rstd, xin, zg, pre, u, xdbl, dt, y, hs = cache[i]
        C = u.shape[-1]
        dr2 = dr.reshape(BT, D)
        dyg = dr2 @ p[q + "out_proj_w"].T
        dy, dzg, yg = np.zeros((BT, C)), np.zeros((BT, C)), np.zeros((BT, C))
        gate_backward_ref(dy, dzg, yg, dyg, y.reshape(BT, C), zg.reshape(BT, C), 1)
        g[q + "out_proj_w"] += yg.T @ dr2
        du, ddt, dxdbl = np.zeros((B, T, C)), np.zeros((B, T, C)), np.zeros(xdbl.shape)
        scan_backward_ref(du, ddt, g[q + "dt_proj_b"], g[q + "A_log"], dxdbl, g[q + "D_skip"],
                          dy.reshape(B, T, C), u, dt, p[q + "dt_proj_b"], p[q + "A_log"], xdbl,
                          p[q + "D_skip"], hs, chunk, 1)
        _ssm_in_backward(p, g, q, u, xdbl, dxdbl, ddt, du, N, selective)
        dxin = np.zeros((B, T, C))
        conv_backward_ref(dxin, g[q + "conv_w"], g[q + "conv_b"], du, xin, pre, p[q + "conv_w"], 1)
        dxz = np.concatenate([dxin.reshape(BT, C), dzg], axis=1)
        g[q + "in_proj_w"] += xn.T @ dxz
        dxn = dxz @ p[q + "in_proj_w"].T
        dx = np.zeros((BT, D))
        rmsnorm_backward_ref(dx, g[q + "norm_w"], dxn, r[i].reshape(BT, D), rstd, p[q + "norm_w"], 1)
        dr = dr + dx.reshape(B, T, D)
    embed_backward_ref(g["embedding"], ids, dr, 1)
    if not learnable_prototypes:
        del g["head.prototypes"]
    return float(loss), g


# ============================================================ single-token steps (recurrent inference)

def conv_step_ref(pre, u, state, x, conv_w, conv_b, n_threads):
    """One token of the causal conv + SiLU; advances state.

    pre, u (B,C)     OUT  pre = conv_b + sum_{k<K-1} conv_w[:,k]*state[:,k] + conv_w[:,K-1]*x ; u = silu(pre)
    state  (B,K-1,C) IN/OUT  the last K-1 conv inputs, oldest first (zeros before the start);
                     afterwards state[:, k] = old state[:, k+1], state[:, K-2] = x
    x      (B,C)     IN
    conv_w (C,K), conv_b (C,) IN
    """
    K = conv_w.shape[1]
    w = np.asarray(conv_w, np.float64)
    acc = np.asarray(conv_b, np.float64) + w[:, K - 1] * np.asarray(x, np.float64)
    for k in range(K - 1):
        acc = acc + w[:, k] * np.asarray(state[:, k], np.float64)
    pre[...] = acc
    u[...] = silu_ref(acc)
    if K > 1:
        state[:, :-1] = state[:, 1:].copy()
        state[:, -1] = x


def neg_exp_t_ref(negA, A_log, n_threads):
    """negA (N,C) OUT = -exp(A_log).T;  A_log (C,N) IN."""
    negA[...] = -np.exp(np.asarray(A_log, np.float64)).T


def scan_step_ref(y, h, u, dt, dt_bias, negA, xdbl, D_skip, n_threads):
    """One token of the selective scan; advances h.

    y      (B,C)   OUT  y = sum_n h[:,n,:]*Ct[:,n] + D_skip*u
    h      (B,N,C) IN/OUT  h[:,n,d] = exp(delta*negA[n,d]) * h[:,n,d] + delta*u*Bt[:,n]
    u, dt  (B,C)   IN   delta = softplus(dt + dt_bias)
    dt_bias, D_skip (C,) IN;  negA (N,C) IN = -exp(A_log).T;  xdbl (B,>=2N) IN [Bt | Ct | ...]
    """
    N = negA.shape[0]
    u = np.asarray(u, np.float64)
    Bt = np.asarray(xdbl[:, :N], np.float64)
    Ct = np.asarray(xdbl[:, N:2 * N], np.float64)
    delta = softplus_ref(np.asarray(dt, np.float64) + dt_bias)                 # (B,C)
    hn = np.exp(delta[:, None, :] * np.asarray(negA, np.float64)) * np.asarray(h, np.float64) \
        + (delta * u)[:, None, :] * Bt[:, :, None]
    h[...] = hn
    y[...] = np.einsum("bnc,bn->bc", hn, Ct) + np.asarray(D_skip, np.float64) * u
