"""float64 NumPy references (the oracle) for the mamba-lite layer kernels: conv and scan.

Glossary (SPEC §2.1):
    B  batch size
    T  sequence length (time)
    D  channels (d_model)
    N  state size (d_state)
    K  causal conv taps (d_conv)
    R  dt rank (x_proj emits 2N+R columns: [Bt | Ct | draw])

Each function has the name of its kernel in ``rtrainer._kernels.conv`` / ``rtrainer._kernels.scan``
plus ``_ref`` and exactly the same parameters in the same order. Like the kernels they write into
(forward) or ADD into (backward) the float64 arrays passed in, and accept and ignore ``n_threads``.
Readability over speed: loops over t, vectorised over the other axes. Unlike the kernel, the
reference backward keeps the full state trajectory (B, T+1, D, N) and ignores ``hs`` beyond its
shape.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "sigmoid_ref",
    "silu_ref",
    "softplus_ref",
    "conv_forward_ref",
    "conv_backward_ref",
    "scan_forward_ref",
    "scan_backward_ref",
]

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
    """softplus(x) = x if x > 20 else log1p(exp(x))  (SPEC §2.1)."""
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
