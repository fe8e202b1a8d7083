"""The mamba-lite stack: embedding, L residual layers, final LayerNorm; and the full Mamba stack,
MambaStack, at the end of this file.

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

Every gradient is accumulated into the flat gradient buffer (FlatParams.grad_buf), which the
training step zeroes once per step.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np

from ._kernels import conv as _conv
from ._kernels import embed as _embed
from ._kernels import gate as _gate
from ._kernels import norm as _norm
from ._kernels import rmsnorm as _rmsnorm
from ._kernels import scan as _scan
from .params import ParamSpec

LN_EPS = 1e-5
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


def layer_of(name: str):
    """The layer index of a parameter name ('layers.3.x_proj_w' -> 3), None for the others."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None

# per-layer tensor names in their canonical order (also the init draw order)
LAYER_TENSORS = ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w")


def _ssm_specs(p: str, C: int, N: int, K: int, R: int) -> list[ParamSpec]:
    """conv -> x_proj/dt_proj -> scan over C channels: the tensors both layer kinds share."""
    return [
        ParamSpec(p + "conv_w", (C, K), decay=True),
        ParamSpec(p + "conv_b", (C,)),
        ParamSpec(p + "x_proj_w", (C, 2 * N + R), decay=True),
        ParamSpec(p + "dt_proj_w", (R, C), decay=True),
        ParamSpec(p + "dt_proj_b", (C,)),
        ParamSpec(p + "A_log", (C, N)),
        ParamSpec(p + "D_skip", (C,)),
    ]


def layer_param_specs(i: int, D: int, N: int, K: int, R: int, selective: bool = True) -> list[ParamSpec]:
    p = f"layers.{i}."
    return _lti_specs(_ssm_specs(p, D, N, K, R) + [ParamSpec(p + "out_proj_w", (D, D), decay=True)],
                      N, selective)


def _lti_specs(specs: list[ParamSpec], N: int, selective: bool) -> list[ParamSpec]:
    """selective = false (the LTI ablation): x_proj_w and dt_proj_w are replaced by the learned,
    input-independent B_lti (N,) and C_lti (N,) in their places; delta = softplus(dt_proj_b)."""
    if selective:
        return specs
    out = []
    for s in specs:
        leaf = s.name.rsplit(".", 1)[1]
        if leaf in ("x_proj_w", "dt_proj_w"):
            out.append(ParamSpec(s.name[: -len(leaf)] + ("B_lti" if leaf == "x_proj_w" else "C_lti"), (N,)))
        else:
            out.append(s)
    return out


def _lti_names(names: tuple, selective: bool) -> tuple:
    if selective:
        return names
    return tuple({"x_proj_w": "B_lti", "dt_proj_w": "C_lti"}.get(n, n) for n in names)


def init_layer(views: dict, i: int, rng: np.random.Generator, init: str, n_layers: int) -> None:
    """Fill layer i's tensors. `views` maps names to float32 views."""
    p = f"layers.{i}."
    D, K = views[p + "conv_w"].shape
    N = views[p + "A_log"].shape[1]
    selective = p + "x_proj_w" in views
    R = views[p + "dt_proj_w"].shape[0] if selective else 0
    if init == "reference":
        # every tensor i.i.d. N(0, 0.02^2), drawn in canonical order
        for name in _lti_names(LAYER_TENSORS, selective):
            v = views[p + name]
            v[...] = rng.normal(0.0, 0.02, size=v.shape)
        return
    if init != "mamba":
        raise ValueError(f"unknown init {init!r}")
    views[p + "conv_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(K), size=(D, K))
    views[p + "conv_b"][...] = 0.0
    if selective:
        views[p + "x_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(D), size=(D, 2 * N + R))
        bound = R ** -0.5
        views[p + "dt_proj_w"][...] = rng.uniform(-bound, bound, size=(R, D))
    else:
        _init_lti(views, p, rng, N)
    # softplus(dt_proj_b) log-uniform in [1e-3, 1e-1]: b = dt + log(-expm1(-dt)) (inverse softplus)
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=D))
    views[p + "dt_proj_b"][...] = dt + np.log(-np.expm1(-dt))
    # S4D-real: A = -(n+1)
    views[p + "A_log"][...] = np.log(np.arange(1, N + 1, dtype=np.float64))[None, :]
    views[p + "D_skip"][...] = 1.0
    # residual-branch output scaled down with depth (mamba_ssm's rescale_prenorm_residual)
    views[p + "out_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(D * n_layers), size=(D, D))


def _init_lti(views: dict, p: str, rng: np.random.Generator, N: int) -> None:
    # B_t = u @ x_proj_w[:, :N] is ~N(0, 1) per entry under the "mamba" init: the fixed B, C too
    views[p + "B_lti"][...] = rng.normal(0.0, 1.0, size=N)
    views[p + "C_lti"][...] = rng.normal(0.0, 1.0, size=N)


def _lti_forward(p: dict, prefix: str, xdbl2: np.ndarray, N: int) -> None:
    """Non-selective layer: every row of xdbl (B*T, 2N) is [B_lti | C_lti] (dt stays 0, so
    delta = softplus(dt_proj_b))."""
    xdbl2[:, :N] = p[prefix + "B_lti"]
    xdbl2[:, N:2 * N] = p[prefix + "C_lti"]


def _lti_backward(g: dict, prefix: str, dxdbl2: np.ndarray, N: int) -> None:
    """dB_lti, dC_lti = the scan's dBt, dCt summed over every token (in float64)."""
    g[prefix + "B_lti"] += dxdbl2[:, :N].sum(axis=0, dtype=np.float64).astype(np.float32)
    g[prefix + "C_lti"] += dxdbl2[:, N:2 * N].sum(axis=0, dtype=np.float64).astype(np.float32)


class _EmbeddedStack:
    """What both stacks share: the embedding, then L layers whose tensors a subclass describes
    (`layer_specs(i)`) and initialises (`layer_init`, a function (views, i, rng, init, n_layers)),
    all bound as views of the flat parameter and gradient buffers.

    Freezing (`freeze(layers, embedding)`): backward still propagates through a frozen layer but
    skips its weight-gradient products; with the embedding frozen too it stops below the lowest
    layer that trains. The caller zeroes the frozen ranges the kernels still accumulate into
    (rtrainer.net.Net does)."""

    layer_init = None
    prenorm = False                 # True: each block normalises its own input (RMSNorm)
    frozen_layers = frozenset()     # backward skips these layers' weight-gradient products
    backward_stop = 0               # with the embedding frozen, backward stops above this layer
    train_embedding = True          # the default of backward(embedding_grad=None)

    layer_of = staticmethod(layer_of)

    @staticmethod
    def layer_prefix(i: int) -> str:
        """The name prefix of layer i's tensors."""
        return f"layers.{i}."

    def layer_input(self, i: int) -> np.ndarray:
        """The input of layer i (the residual stream r_i, (B, T, D)) of the last forward."""
        return self.r[i]

    def freeze(self, layers, embedding: bool) -> None:
        self.frozen_layers = frozenset(layers)
        lead = 0
        while lead in self.frozen_layers:
            lead += 1
        self.train_embedding = not embedding
        self.backward_stop = lead if embedding else 0

    def resized(self, n_layers: int):
        """The same kind of stack with n_layers layers (unbound, nothing frozen)."""
        new = copy.copy(self)
        new.L = n_layers
        new._shape = None
        new.p = new.g = None
        new.frozen_layers, new.backward_stop, new.train_embedding = frozenset(), 0, True
        return new

    def layer_specs(self, i: int) -> list[ParamSpec]:
        raise NotImplementedError

    def param_specs(self) -> list[ParamSpec]:
        specs = [ParamSpec("embedding", (self.V, self.D), decay=True)]
        for i in range(self.L):
            specs += self.layer_specs(i)
        return specs

    def bind(self, params: dict, grads: dict) -> None:
        self.p, self.g = params, grads

    def init_params(self, seed: int, init: str) -> None:
        rng = np.random.default_rng([seed, 0])
        std = 0.02 if init == "reference" else 1.0
        self.p["embedding"][...] = rng.normal(0.0, std, size=(self.V, self.D))
        for i in range(self.L):
            self.layer_init(self.p, i, rng, init, self.L)


class MambaLiteStack(_EmbeddedStack):
    """Embedding -> L x (r += mamba_lite(r)) -> LayerNorm (no affine).

    Shapes: ids (B,T) int64 -> z (B*T, D) float32. Parameters live in the flat buffer
    passed to `bind`; the stack only keeps named views.
    """

    layer_init = staticmethod(init_layer)   # per-layer init, used by layer expansion (rtrainer/staged.py)

    def __init__(self, vocab_size: int, d_model: int, d_state: int, d_conv: int, dt_rank: int,
                 n_layers: int, scan_chunk: int = 64, n_threads: int = 1, selective: bool = True):
        self.V, self.D, self.N, self.K, self.R = vocab_size, d_model, d_state, d_conv, dt_rank
        self.L = n_layers
        self.selective = selective
        if not selective:
            self.R = 0      # no draw columns: xdbl is [B_lti | C_lti] per token
        self.chunk = scan_chunk
        self.n_threads = n_threads
        self._shape = None

    # ----------------------------------------------------------------- parameters
    def layer_specs(self, i: int) -> list[ParamSpec]:
        return layer_param_specs(i, self.D, self.N, self.K, self.R, self.selective)

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
        if self.selective:
            self.dt = [np.empty((B, T, D), f) for _ in range(L)]
        else:   # delta = softplus(0 + dt_proj_b): one shared zero input
            self.dt = [np.zeros((B, T, D), f)] * L
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
        return sum(a.nbytes for a in {id(a): a for a in arrs}.values())

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
            if self.selective:
                np.matmul(u2, self.p[p + "x_proj_w"], out=xdbl2)                    # [Bt|Ct|draw] = u @ x_proj_w
                np.matmul(xdbl2[:, 2 * N:], self.p[p + "dt_proj_w"], out=self.dt[i].reshape(B * T, D))  # draw @ dt_proj_w
            else:
                _lti_forward(self.p, p, xdbl2, N)
            _scan.scan_forward(self.y[i], self.hs[i], self.u[i], self.dt[i], self.p[p + "dt_proj_b"],
                               self.p[p + "A_log"], self.xdbl[i], self.p[p + "D_skip"], self.chunk, nt)
            out = self.r[i + 1].reshape(B * T, D)
            np.matmul(self.y[i].reshape(B * T, D), self.p[p + "out_proj_w"], out=out)   # y @ out_proj_w
            out += x.reshape(B * T, D)                                                  # residual
        _norm.layernorm_forward(self.z, self.rstd, self.r[self.L].reshape(B * T, D), LN_EPS, nt)
        return self.z

    # ----------------------------------------------------------------- backward
    def backward(self, dz: np.ndarray, embedding_grad: bool | None = None) -> None:
        """dz (B*T, D): gradient of the loss w.r.t. z. Accumulates into every parameter gradient
        (embedding_grad None: unless the embedding is frozen)."""
        if embedding_grad is None:
            embedding_grad = self.train_embedding
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
            if not self.selective:
                _lti_backward(self.g, p, dxdbl2, N)
                _conv.conv_backward(dr, self.g[p + "conv_w"], self.g[p + "conv_b"], self.du, self.r[i],
                                    self.pre[i], self.p[p + "conv_w"], nt)
                continue
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


# ================================================================================================
# The full Mamba block
# ================================================================================================
#
# Per layer, x = r_l (B,T,D), C = E*D channels inside the block:
#   xn        = RMSNorm(x) * norm_w                       (eps 1e-5)          rmsnorm kernel
#   [xin | zg] = xn @ in_proj_w                            (D, 2C)             two BLAS products
#   pre, u    = causal depthwise conv(xin) ; silu          (C channels)        conv kernel
#   [Bt|Ct|draw] = u @ x_proj_w ; dt = draw @ dt_proj_w    (C, 2N+R), (R, C)   BLAS
#   y         = selective scan (delta = softplus(dt + dt_proj_b), A = -exp(A_log), D skip)  scan kernel
#   yg        = y * silu(zg)                                                   gate kernel
#   r_{l+1}   = x + yg @ out_proj_w                        (C, D)              BLAS + add
# then z = LayerNorm(r_L) (no affine) as in mamba-lite.
#
# Store vs recompute, per layer:
#   stored     r_l, rstd (B*T), xn (B,T,D), xin, zg, pre, u, dt, y (B,T,C each), xdbl (B,T,2N+R),
#              hs (B, ceil(T/chunk), C, N) (scan state at chunk boundaries only)
#   recomputed yg = y*silu(zg) (written again by gate_backward, in the pass that reads y and zg),
#              delta and h inside each chunk (scan backward)
# Activation memory therefore grows as B*T*(D + 7C) + B*T*C*N/chunk per layer, never B*T*C*N.

MAMBA_LAYER_TENSORS = ("norm_w", "in_proj_w", "conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b",
                       "A_log", "D_skip", "out_proj_w")
RMS_EPS = 1e-5


def resolve_dt_rank(layer: str, d_model: int, dt_rank: int) -> int:
    """model.dt_rank = 0 means auto: 1 for mamba-lite (the reference), ceil(D/16) for mamba."""
    if dt_rank > 0:
        return dt_rank
    return -(-d_model // 16) if layer == "mamba" else 1


def mamba_layer_param_specs(i: int, D: int, N: int, K: int, R: int, E: int,
                            selective: bool = True) -> list[ParamSpec]:
    p = f"layers.{i}."
    C = E * D
    return _lti_specs([ParamSpec(p + "norm_w", (D,)), ParamSpec(p + "in_proj_w", (D, 2 * C), decay=True)]
                      + _ssm_specs(p, C, N, K, R) + [ParamSpec(p + "out_proj_w", (C, D), decay=True)],
                      N, selective)


def init_mamba_layer(views: dict, i: int, rng: np.random.Generator, init: str, n_layers: int) -> None:
    """Fill the `mamba` layer i's tensors. `views` maps names to
    float32 views; the shapes (and whether the layer is selective) are read from them.

    "mamba": norm_w = 1; in_proj_w N(0, 1/D); conv_w N(0, 1/K), conv_b = 0; x_proj_w N(0, 1/C)
    (or B_lti, C_lti N(0, 1)); dt_proj_w U(+-R^-1/2); softplus(dt_proj_b) log-uniform in
    [1e-3, 1e-1]; A_log = log(n+1) (S4D-real); D_skip = 1; out_proj_w N(0, 1/(C*L)) (mamba_ssm's
    rescale of the residual output by depth). "reference": every tensor N(0, 0.02^2) in the order
    of MAMBA_LAYER_TENSORS, as for mamba-lite."""
    p = f"layers.{i}."
    D = views[p + "norm_w"].shape[0]
    C, K = views[p + "conv_w"].shape
    N = views[p + "A_log"].shape[1]
    selective = p + "x_proj_w" in views
    if init == "reference":
        for name in _lti_names(MAMBA_LAYER_TENSORS, selective):
            v = views[p + name]
            v[...] = rng.normal(0.0, 0.02, size=v.shape)
        return
    if init != "mamba":
        raise ValueError(f"unknown init {init!r}")
    views[p + "norm_w"][...] = 1.0
    views[p + "in_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(D), size=(D, 2 * C))
    views[p + "conv_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(K), size=(C, K))
    views[p + "conv_b"][...] = 0.0
    if selective:
        R = views[p + "dt_proj_w"].shape[0]
        views[p + "x_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(C), size=(C, views[p + "x_proj_w"].shape[1]))
        bound = R ** -0.5
        views[p + "dt_proj_w"][...] = rng.uniform(-bound, bound, size=(R, C))
    else:
        _init_lti(views, p, rng, N)
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=C))
    views[p + "dt_proj_b"][...] = dt + np.log(-np.expm1(-dt))        # inverse softplus
    views[p + "A_log"][...] = np.log(np.arange(1, N + 1, dtype=np.float64))[None, :]
    views[p + "D_skip"][...] = 1.0
    views[p + "out_proj_w"][...] = rng.normal(0.0, 1.0 / math.sqrt(C * n_layers), size=(C, D))


class MambaStack(_EmbeddedStack):
    """Embedding -> L x (r += mamba_block(r)) -> LayerNorm (no affine).

    Same interface as MambaLiteStack: ids (B,T) int64 -> z (B*T, D) float32; parameters live in
    the flat buffer passed to `bind`. `selective = False` is the LTI ablation (B, C, delta do not
    depend on the input)."""

    layer_init = staticmethod(init_mamba_layer)   # per-layer init, used by layer expansion (rtrainer/staged.py)
    prenorm = True                                # RMSNorm at every block's input

    def __init__(self, vocab_size: int, d_model: int, d_state: int, d_conv: int, dt_rank: int,
                 n_layers: int, expand: int = 2, scan_chunk: int = 64, n_threads: int = 1,
                 selective: bool = True):
        self.V, self.D, self.N, self.K = vocab_size, d_model, d_state, d_conv
        self.R = dt_rank if selective else 0
        self.E = expand
        self.C = expand * d_model
        self.L = n_layers
        self.chunk = scan_chunk
        self.n_threads = n_threads
        self.selective = selective
        self._shape = None

    # ----------------------------------------------------------------- parameters
    def layer_specs(self, i: int) -> list[ParamSpec]:
        return mamba_layer_param_specs(i, self.D, self.N, self.K, self.R, self.E, self.selective)

    # ----------------------------------------------------------------- workspace
    def _workspace(self, B: int, T: int) -> None:
        if self._shape == (B, T):
            return
        D, C, N, R, L = self.D, self.C, self.N, self.R, self.L
        W = 2 * N + R
        nc = -(-T // self.chunk)
        f = np.float32
        e3 = lambda width: np.empty((B, T, width), f)  # noqa: E731
        self.r = [e3(D) for _ in range(L + 1)]           # residual stream r_0..r_L
        self.rstd = [np.empty(B * T, f) for _ in range(L)]
        self.xn = [e3(D) for _ in range(L)]
        self.xin = [e3(C) for _ in range(L)]
        self.zg = [e3(C) for _ in range(L)]
        self.pre = [e3(C) for _ in range(L)]
        self.u = [e3(C) for _ in range(L)]
        self.xdbl = [e3(W) for _ in range(L)]
        if self.selective:
            self.dt = [e3(C) for _ in range(L)]
        else:   # delta = softplus(0 + dt_proj_b): one shared zero input
            self.dt = [np.zeros((B, T, C), f)] * L
        self.y = [e3(C) for _ in range(L)]
        self.hs = [np.empty((B, nc, C, N), f) for _ in range(L)]
        self.z = np.empty((B * T, D), f)
        self.zrstd = np.empty(B * T, f)
        # scratch shared by all layers: three (B,T,C) buffers, each holding two quantities whose
        # lifetimes within a layer's backward do not overlap; every use goes through the name of
        # the quantity it holds
        s1, s2, s3 = e3(C), e3(C), e3(C)
        self.dyg, self.ddt = s1, s1          # dL/dyg (read by the gate backward); the scan's ddt
        self.yg, self.dxproj = s2, s2        # yg = y*silu(zg) (forward; recomputed in backward);
        #                                      dxdbl @ x_proj_w^T (after d out_proj_w has read yg)
        self.dy, self.dxin = s3, s3          # dL/dy (read by the scan backward); dL/dxin (conv backward)
        self.dzg = e3(C)
        self.du = e3(C)
        self.dr = e3(D)
        self.dxn = e3(D)
        self.tmpD = e3(D)
        self.dxdbl = e3(W)
        self.wbuf = np.empty(max(C * D, C * W, R * C), f)   # weight-gradient scratch
        self._shape = (B, T)

    def activation_bytes(self) -> int:
        """Bytes of the activation workspace (for the memory claims in tests and bench/)."""
        arrs = [self.z, self.zrstd, self.dyg, self.yg, self.dy, self.dzg, self.du, self.dr, self.dxn,
                self.tmpD, self.dxdbl, self.wbuf]
        for lst in (self.r, self.rstd, self.xn, self.xin, self.zg, self.pre, self.u, self.xdbl, self.dt,
                    self.y, self.hs):
            arrs += lst
        return sum(a.nbytes for a in {id(a): a for a in arrs}.values())

    # ----------------------------------------------------------------- forward
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """ids (B,T) int64 -> z (B*T, D): the final LayerNorm output (a view of the workspace)."""
        B, T = ids.shape
        self._workspace(B, T)
        self.ids = ids
        nt, D, C, N = self.n_threads, self.D, self.C, self.N
        BT = B * T
        _embed.embed_forward(self.r[0], ids, self.p["embedding"], nt)
        yg2 = self.yg.reshape(BT, C)
        for i in range(self.L):
            p = f"layers.{i}."
            x2 = self.r[i].reshape(BT, D)
            xn2 = self.xn[i].reshape(BT, D)
            # xn = x * rstd * norm_w
            _rmsnorm.rmsnorm_forward(xn2, self.rstd[i], x2, self.p[p + "norm_w"], RMS_EPS, nt)
            # [xin | zg] = xn @ in_proj_w
            w_in = self.p[p + "in_proj_w"]
            np.matmul(xn2, w_in[:, :C], out=self.xin[i].reshape(BT, C))
            np.matmul(xn2, w_in[:, C:], out=self.zg[i].reshape(BT, C))
            # pre = conv(xin), u = silu(pre)
            _conv.conv_forward(self.pre[i], self.u[i], self.xin[i], self.p[p + "conv_w"], self.p[p + "conv_b"], nt)
            xdbl2 = self.xdbl[i].reshape(BT, -1)
            if self.selective:
                np.matmul(self.u[i].reshape(BT, C), self.p[p + "x_proj_w"], out=xdbl2)   # [Bt|Ct|draw]
                np.matmul(xdbl2[:, 2 * N:], self.p[p + "dt_proj_w"], out=self.dt[i].reshape(BT, C))
            else:
                _lti_forward(self.p, p, xdbl2, N)
            _scan.scan_forward(self.y[i], self.hs[i], self.u[i], self.dt[i], self.p[p + "dt_proj_b"],
                               self.p[p + "A_log"], self.xdbl[i], self.p[p + "D_skip"], self.chunk, nt)
            # yg = y * silu(zg) ; r_{l+1} = x + yg @ out_proj_w
            _gate.gate_forward(yg2, self.y[i].reshape(BT, C), self.zg[i].reshape(BT, C), nt)
            out = self.r[i + 1].reshape(BT, D)
            np.matmul(yg2, self.p[p + "out_proj_w"], out=out)
            out += x2
        _norm.layernorm_forward(self.z, self.zrstd, self.r[self.L].reshape(BT, D), LN_EPS, nt)
        return self.z

    # ----------------------------------------------------------------- backward
    def backward(self, dz: np.ndarray, embedding_grad: bool | None = None) -> None:
        """dz (B*T, D): gradient of the loss w.r.t. z. Accumulates into every parameter gradient
        (embedding_grad None: unless the embedding is frozen). Frozen layers still pass dr down but
        skip their weight-gradient products."""
        if embedding_grad is None:
            embedding_grad = self.train_embedding
        B, T = self.ids.shape
        nt, D, C, N, R = self.n_threads, self.D, self.C, self.N, self.R
        BT = B * T
        g, P = self.g, self.p
        dr2 = self.dr.reshape(BT, D)
        dr2.fill(0.0)
        _norm.layernorm_backward(dr2, dz, self.z, self.zrstd, nt)
        dyg2, ddt2, yg2 = self.dyg.reshape(BT, C), self.ddt.reshape(BT, C), self.yg.reshape(BT, C)
        dy2, dxin2, dxproj2 = self.dy.reshape(BT, C), self.dxin.reshape(BT, C), self.dxproj.reshape(BT, C)
        dzg2, du2 = self.dzg.reshape(BT, C), self.du.reshape(BT, C)
        dxdbl2 = self.dxdbl.reshape(BT, -1)
        for i in reversed(range(0 if embedding_grad else self.backward_stop, self.L)):
            p = f"layers.{i}."
            frozen = i in self.frozen_layers
            y2, zg2 = self.y[i].reshape(BT, C), self.zg[i].reshape(BT, C)
            # out_proj: dyg = dr @ out_proj_w^T (dr: gradient of the residual branch output)
            np.matmul(dr2, P[p + "out_proj_w"].T, out=dyg2)
            # gate: dy = dyg*silu(zg), dzg = dyg*y*silu'(zg); yg recomputed
            dy2.fill(0.0)
            dzg2.fill(0.0)
            _gate.gate_backward(dy2, dzg2, yg2, dyg2, y2, zg2, nt)
            # d out_proj_w += yg^T dr
            if not frozen:
                wt = self.wbuf[:C * D].reshape(C, D)
                np.matmul(yg2.T, dr2, out=wt)
                g[p + "out_proj_w"] += wt
            # scan: du, ddt, dxdbl from dy
            du2.fill(0.0)
            ddt2.fill(0.0)
            dxdbl2.fill(0.0)
            _scan.scan_backward(self.du, self.ddt, g[p + "dt_proj_b"], g[p + "A_log"], self.dxdbl, g[p + "D_skip"],
                                self.dy, self.u[i], self.dt[i], P[p + "dt_proj_b"], P[p + "A_log"], self.xdbl[i],
                                P[p + "D_skip"], self.hs[i], self.chunk, nt)
            u2 = self.u[i].reshape(BT, C)
            if self.selective:
                xdbl2 = self.xdbl[i].reshape(BT, -1)
                # dt = draw @ dt_proj_w -> d dt_proj_w += draw^T ddt ; d draw = ddt dt_proj_w^T
                if not frozen:
                    wt = self.wbuf[:R * C].reshape(R, C)
                    np.matmul(xdbl2[:, 2 * N:].T, ddt2, out=wt)
                    g[p + "dt_proj_w"] += wt
                np.matmul(ddt2, P[p + "dt_proj_w"].T, out=dxdbl2[:, 2 * N:])
                # xdbl = u @ x_proj_w -> d x_proj_w += u^T dxdbl ; du += dxdbl x_proj_w^T
                if not frozen:
                    wt = self.wbuf[:C * (2 * N + R)].reshape(C, 2 * N + R)
                    np.matmul(u2.T, dxdbl2, out=wt)
                    g[p + "x_proj_w"] += wt
                np.matmul(dxdbl2, P[p + "x_proj_w"].T, out=dxproj2)
                du2 += dxproj2
            else:
                _lti_backward(g, p, dxdbl2, N)
            # conv + SiLU: dxin
            dxin2.fill(0.0)
            _conv.conv_backward(self.dxin, g[p + "conv_w"], g[p + "conv_b"], self.du, self.xin[i], self.pre[i],
                                P[p + "conv_w"], nt)
            # in_proj: [xin | zg] = xn @ W -> dW += xn^T [dxin | dzg] ; dxn = dxin Wx^T + dzg Wz^T
            xn2 = self.xn[i].reshape(BT, D)
            w_in = P[p + "in_proj_w"]
            if not frozen:
                wt = self.wbuf[:D * C].reshape(D, C)
                np.matmul(xn2.T, dxin2, out=wt)
                g[p + "in_proj_w"][:, :C] += wt
                np.matmul(xn2.T, dzg2, out=wt)
                g[p + "in_proj_w"][:, C:] += wt
            dxn2 = self.dxn.reshape(BT, D)
            np.matmul(dxin2, w_in[:, :C].T, out=dxn2)
            np.matmul(dzg2, w_in[:, C:].T, out=self.tmpD.reshape(BT, D))
            dxn2 += self.tmpD.reshape(BT, D)
            # RMSNorm: adds the block's path into dr, which already carries the residual identity
            _rmsnorm.rmsnorm_backward(dr2, g[p + "norm_w"], dxn2, self.r[i].reshape(BT, D), self.rstd[i],
                                      P[p + "norm_w"], nt)
        if embedding_grad:
            _embed.embed_backward(g["embedding"], self.ids, self.dr, nt)
