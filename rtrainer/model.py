"""The mamba-lite stack (SPEC §2.1-2.2): embedding, L residual layers, final LayerNorm.

Forward and backward are Python loops over kernel calls (llm.c's gpt2_forward/gpt2_backward);
element-wise work runs in the Cython kernels of rtrainer._kernels, matrix products in numpy's
BLAS writing into preallocated views. One workspace per (B, T) holds every activation the
backward pass needs; it is allocated at the first forward and reused every step.

Store vs recompute, per layer:
  stored     r_l (layer input, the residual stream), pre, u (conv pre-activation / output),
             xdbl = u @ x_proj_w (B,T,2N+R), dt = draw @ dt_proj_w (B,T,D), y (scan output),
             hs: the scan state only at chunk boundaries (B, ceil(T/chunk), D, N)
  recomputed delta = softplus(dt + dt_proj_b) and h inside each chunk, in the scan backward
so activation memory grows as B*T*D (plus B*T*D*N/chunk), never B*T*D*N.

Every gradient is accumulated into the flat gradient buffer (FlatParams.grad), which the
trainer zeroes once per step.
"""
from __future__ import annotations

import math

import numpy as np

from ._kernels import conv as _conv
from ._kernels import embed as _embed
from ._kernels import norm as _norm
from ._kernels import scan as _scan
from .params import ParamSpec

LN_EPS = 1e-5

# per-layer tensor names in their canonical order (also the init draw order)
LAYER_TENSORS = ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w")


def layer_param_specs(i: int, D: int, N: int, K: int, R: int) -> list[ParamSpec]:
    p = f"layers.{i}."
    return [
        ParamSpec(p + "conv_w", (D, K), decay=True),
        ParamSpec(p + "conv_b", (D,)),
        ParamSpec(p + "x_proj_w", (D, 2 * N + R), decay=True),
        ParamSpec(p + "dt_proj_w", (R, D), decay=True),
        ParamSpec(p + "dt_proj_b", (D,)),
        ParamSpec(p + "A_log", (D, N)),
        ParamSpec(p + "D_skip", (D,)),
        ParamSpec(p + "out_proj_w", (D, D), decay=True),
    ]


def init_layer(views: dict, i: int, rng: np.random.Generator, init: str, n_layers: int) -> None:
    """Fill layer i's tensors (SPEC §2.3). `views` maps names to float32 views."""
    p = f"layers.{i}."
    D, K = views[p + "conv_w"].shape
    N = views[p + "A_log"].shape[1]
    R = views[p + "dt_proj_w"].shape[0]
    if init == "reference":
        # every tensor i.i.d. N(0, 0.02^2), drawn in canonical order (reference §1.2)
        for name in LAYER_TENSORS:
            v = views[p + name]
            v[...] = rng.normal(0.0, 0.02, size=v.shape)
        return
    if init != "mamba":
        raise ValueError(f"unknown init {init!r}")
    views[p + "conv_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(K), size=(D, K))
    views[p + "conv_b"][...] = 0.0
    views[p + "x_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(D), size=(D, 2 * N + R))
    bound = R ** -0.5
    views[p + "dt_proj_w"][...] = rng.uniform(-bound, bound, size=(R, D))
    # softplus(dt_proj_b) log-uniform in [1e-3, 1e-1]: b = dt + log(-expm1(-dt)) (inverse softplus)
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=D))
    views[p + "dt_proj_b"][...] = dt + np.log(-np.expm1(-dt))
    # S4D-real: A = -(n+1)
    views[p + "A_log"][...] = np.log(np.arange(1, N + 1, dtype=np.float64))[None, :]
    views[p + "D_skip"][...] = 1.0
    # residual-branch output scaled down with depth (mamba_ssm's rescale_prenorm_residual)
    views[p + "out_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(D * n_layers), size=(D, D))


class MambaLiteStack:
    """Embedding -> L x (r += mamba_lite(r)) -> LayerNorm (no affine).

    Shapes: ids (B,T) int64 -> z (B*T, D) float32. Parameters live in the flat buffer
    passed to `bind`; the stack only keeps named views.
    """

    layer_init = staticmethod(init_layer)   # per-layer init, used by layer expansion (rtrainer/staged.py)
    frozen_layers = frozenset()             # backward skips these layers' weight-gradient products
    backward_stop = 0                       # with embedding_grad=False, backward stops above this layer

    def __init__(self, vocab_size: int, d_model: int, d_state: int, d_conv: int, dt_rank: int,
                 n_layers: int, scan_chunk: int = 64, n_threads: int = 1):
        self.V, self.D, self.N, self.K, self.R = vocab_size, d_model, d_state, d_conv, dt_rank
        self.L = n_layers
        self.chunk = scan_chunk
        self.n_threads = n_threads
        self._shape = None

    # ----------------------------------------------------------------- parameters
    def param_specs(self) -> list[ParamSpec]:
        specs = [ParamSpec("embedding", (self.V, self.D), decay=True)]
        for i in range(self.L):
            specs += layer_param_specs(i, self.D, self.N, self.K, self.R)
        return specs

    def bind(self, params: dict, grads: dict) -> None:
        self.p, self.g = params, grads

    def init_params(self, seed: int, init: str) -> None:
        rng = np.random.default_rng([seed, 0])
        std = 0.02 if init == "reference" else 1.0
        self.p["embedding"][...] = rng.normal(0.0, std, size=(self.V, self.D))
        for i in range(self.L):
            init_layer(self.p, i, rng, init, self.L)

    # ----------------------------------------------------------------- workspace
    def _workspace(self, B: int, T: int) -> None:
        if self._shape == (B, T):
            return
        D, N, R, L = self.D, self.N, self.R, self.L
        nc = -(-T // self.chunk)
        f = np.float32
        self.r = [np.empty((B, T, D), f) for _ in range(L + 1)]     # residual stream r_0..r_L
        self.pre = [np.empty((B, T, D), f) for _ in range(L)]
        self.u = [np.empty((B, T, D), f) for _ in range(L)]
        self.xdbl = [np.empty((B, T, 2 * N + R), f) for _ in range(L)]
        self.dt = [np.empty((B, T, D), f) for _ in range(L)]
        self.y = [np.empty((B, T, D), f) for _ in range(L)]
        self.hs = [np.empty((B, nc, D, N), f) for _ in range(L)]
        self.z = np.empty((B * T, D), f)
        self.rstd = np.empty(B * T, f)
        # backward scratch, shared by all layers
        self.dr = np.empty((B, T, D), f)
        self.dy = np.empty((B, T, D), f)
        self.du = np.empty((B, T, D), f)
        self.ddt = np.empty((B, T, D), f)
        self.tmp = np.empty((B, T, D), f)
        self.dxdbl = np.empty((B, T, 2 * N + R), f)
        self.wbuf = np.empty(D * max(D, 2 * N + R), f)                # weight-gradient scratch
        self._shape = (B, T)

    def activation_bytes(self) -> int:
        """Bytes of the activation workspace (for the memory claims in bench/)."""
        arrs = [self.z, self.rstd, self.dr, self.dy, self.du, self.ddt, self.tmp, self.dxdbl]
        for lst in (self.r, self.pre, self.u, self.xdbl, self.dt, self.y, self.hs):
            arrs += lst
        return sum(a.nbytes for a in arrs)

    # ----------------------------------------------------------------- forward
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """ids (B,T) int64 -> z (B*T, D): the final LayerNorm output (a view of the workspace)."""
        B, T = ids.shape
        self._workspace(B, T)
        self.ids = ids
        nt, D, N = self.n_threads, self.D, self.N
        _embed.embed_forward(self.r[0], ids, self.p["embedding"], nt)
        for i in range(self.L):
            p = f"layers.{i}."
            x = self.r[i]
            _conv.conv_forward(self.pre[i], self.u[i], x, self.p[p + "conv_w"], self.p[p + "conv_b"], nt)
            u2 = self.u[i].reshape(B * T, D)
            xdbl2 = self.xdbl[i].reshape(B * T, -1)
            np.matmul(u2, self.p[p + "x_proj_w"], out=xdbl2)                        # [Bt|Ct|draw] = u @ x_proj_w
            np.matmul(xdbl2[:, 2 * N:], self.p[p + "dt_proj_w"], out=self.dt[i].reshape(B * T, D))  # draw @ dt_proj_w
            _scan.scan_forward(self.y[i], self.hs[i], self.u[i], self.dt[i], self.p[p + "dt_proj_b"],
                               self.p[p + "A_log"], self.xdbl[i], self.p[p + "D_skip"], self.chunk, nt)
            out = self.r[i + 1].reshape(B * T, D)
            np.matmul(self.y[i].reshape(B * T, D), self.p[p + "out_proj_w"], out=out)   # y @ out_proj_w
            out += x.reshape(B * T, D)                                                  # residual
        _norm.layernorm_forward(self.z, self.rstd, self.r[self.L].reshape(B * T, D), LN_EPS, nt)
        return self.z

    # ----------------------------------------------------------------- backward
    def backward(self, dz: np.ndarray, embedding_grad: bool = True) -> None:
        """dz (B*T, D): gradient of the loss w.r.t. z. Accumulates into every parameter gradient."""
        B, T = self.ids.shape
        nt, D, N = self.n_threads, self.D, self.N
        BT = B * T
        dr = self.dr
        dr.fill(0.0)
        _norm.layernorm_backward(dr.reshape(BT, D), dz, self.z, self.rstd, nt)
        dr2 = dr.reshape(BT, D)
        for i in reversed(range(0 if embedding_grad else self.backward_stop, self.L)):
            p = f"layers.{i}."
            frozen = i in self.frozen_layers   # still propagates dr, skips its weight gradients
            # out_proj: o = y @ W  ->  dW += y^T do ; dy = do W^T   (do = dr: the residual branch output)
            wt = self.wbuf[:D * D].reshape(D, D)
            if not frozen:
                np.matmul(self.y[i].reshape(BT, D).T, dr2, out=wt)
                self.g[p + "out_proj_w"] += wt
            np.matmul(dr2, self.p[p + "out_proj_w"].T, out=self.dy.reshape(BT, D))
            self.du.fill(0.0)
            self.ddt.fill(0.0)
            self.dxdbl.fill(0.0)
            _scan.scan_backward(self.du, self.ddt, self.g[p + "dt_proj_b"], self.g[p + "A_log"], self.dxdbl,
                                self.g[p + "D_skip"], self.dy, self.u[i], self.dt[i], self.p[p + "dt_proj_b"],
                                self.p[p + "A_log"], self.xdbl[i], self.p[p + "D_skip"], self.hs[i], self.chunk, nt)
            xdbl2 = self.xdbl[i].reshape(BT, -1)
            dxdbl2 = self.dxdbl.reshape(BT, -1)
            ddt2 = self.ddt.reshape(BT, D)
            # dt = draw @ dt_proj_w  ->  d dt_proj_w += draw^T ddt ; d draw = ddt dt_proj_w^T
            R = self.R
            wt = self.wbuf[:R * D].reshape(R, D)
            if not frozen:
                np.matmul(xdbl2[:, 2 * N:].T, ddt2, out=wt)
                self.g[p + "dt_proj_w"] += wt
            np.matmul(ddt2, self.p[p + "dt_proj_w"].T, out=dxdbl2[:, 2 * N:])
            # xdbl = u @ x_proj_w  ->  d x_proj_w += u^T dxdbl ; du += dxdbl x_proj_w^T
            u2 = self.u[i].reshape(BT, D)
            wt = self.wbuf[:D * (2 * N + R)].reshape(D, 2 * N + R)
            if not frozen:
                np.matmul(u2.T, dxdbl2, out=wt)
                self.g[p + "x_proj_w"] += wt
            tmp2 = self.tmp.reshape(BT, D)
            np.matmul(dxdbl2, self.p[p + "x_proj_w"].T, out=tmp2)
            self.du += self.tmp
            # conv + SiLU; adds the conv path into dr, which already carries the residual identity
            _conv.conv_backward(dr, self.g[p + "conv_w"], self.g[p + "conv_b"], self.du, self.r[i],
                                self.pre[i], self.p[p + "conv_w"], nt)
        if embedding_grad:
            _embed.embed_backward(self.g["embedding"], self.ids, dr, nt)
