"""Recurrent inference: run a trained model one token at a time.

`InferenceState(net, batch)` carries, per layer, the last K-1 conv inputs and the scan state h of
`batch` sequences decoded together, so `step(token_ids)` costs the same whatever the length of the
context (no window is re-read):

    mamba-lite layer   x = r ; u = silu(conv(x)) ; [Bt|Ct|draw] = u @ x_proj_w ; dt = draw @ dt_proj_w
                       y = scan(u, dt) ; r = x + y @ out_proj_w
    mamba layer        xn = rmsnorm(r) ; [xin|zg] = xn @ in_proj_w ; u = silu(conv(xin)) ; ... ;
                       y = scan(...) ; r = x + (y * silu(zg)) @ out_proj_w
    LTI layers         [Bt|Ct] = [B_lti|C_lti] for every token, dt = 0
    then z = LayerNorm(r) (no affine), the same kernels as the training forward for everything but
    the conv and the scan (kernels/step.pyx). `net` is a Net (rtrainer.net) or a (model, head) pair.

`HeadScorer(head)` turns z into scores over the vocabulary: the softmax head's logits, or the HPN
head's cosines to the prototypes; `sampling_logits` gives what generation samples from.
"""
from __future__ import annotations

import numpy as np

from ._kernels import embed as _embed
from ._kernels import gate as _gate
from ._kernels import norm as _norm
from ._kernels import rmsnorm as _rmsnorm
from ._kernels import step as _step
from .errors import ConfigError
from .model import LN_EPS, RMS_EPS, MambaStack

HPN_TAU = 0.1     # default HPN sampling temperature: p(k) ~ exp(cos_k / tau)


# ============================================================================================ heads

class HeadScorer:
    """The head's scores over the vocabulary, (n, V) float32 for z (n, D): the softmax head's logits
    z @ W^T + b, or the HPN head's cosines zhat . Pt_k (zhat = z/max(|z|, 1e-8), Pt = the unit
    prototypes, or raw P when normalize_prototypes = false) — the quantities each head's loss and
    prediction are built on. The unit prototypes are computed once, at construction."""

    def __init__(self, head):
        self.head = head
        self.softmax = is_softmax(head)
        if not self.softmax:
            P = head.p["head.prototypes"]
            if head.normalize:
                P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), np.float32(1e-8))
            self.PT = np.ascontiguousarray(P.T)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.softmax:
            return self.head._logits(z, np.empty((z.shape[0], self.head.V), np.float32))
        zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), np.float32(1e-8))
        return zn @ self.PT

    def sampling_logits(self, z: np.ndarray, tau: float | None = None) -> np.ndarray:
        """float64 (n, V) logits to sample from: the softmax head's logits, or cos / tau for HPN
        (tau: the head's `temperature` attribute if it has one, else HPN_TAU)."""
        s = self(z).astype(np.float64)
        if self.softmax:
            return s
        if tau is None:
            tau = float(getattr(self.head, "temperature", HPN_TAU))
        if not tau > 0:
            raise ConfigError(f"the HPN temperature tau must be > 0, got {tau}")
        return s / tau


def scores(head, z: np.ndarray) -> np.ndarray:
    """HeadScorer(head)(z): the head's (n, V) scores of z (n, D)."""
    return HeadScorer(head)(z)


def is_softmax(head) -> bool:
    return "head.W" in head.p


# ============================================================================================ stepping

class InferenceState:
    """Per-layer recurrent state of `batch` sequences decoded together (see the module docstring).

    `prefill(ids)` (B, T) feeds a prompt token by token and returns z of its last token;
    `step(token_ids)` (B,) feeds one token per sequence and returns z (B, D) (a view, overwritten
    by the next call); `reset()` forgets everything. `outputs(z)` gives the head's scores.
    The parameters are read from the model's bound views at every step, except exp(A_log) and the
    unit HPN prototypes, which are computed once here: make a new state after changing those."""

    def __init__(self, net, batch: int = 1):
        model, head = (net.model, net.head) if hasattr(net, "model") else net
        self.model, self.head = model, head
        self.B = int(batch)
        if self.B < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        m = model
        self.full = isinstance(m, MambaStack)
        self.C = m.C if self.full else m.D
        B, D, C, N, K = self.B, m.D, self.C, m.N, m.K
        W = 2 * N + m.R
        f = np.float32
        nt = m.n_threads
        self.negA = []
        for i in range(m.L):
            a = np.empty((N, C), f)
            _step.neg_exp_t(a, m.p[f"layers.{i}.A_log"], nt)
            self.negA.append(a)
        self.conv_state = [np.zeros((B, K - 1, C), f) for _ in range(m.L)]
        self.h = [np.zeros((B, N, C), f) for _ in range(m.L)]
        self.r = np.empty((B, 1, D), f)
        self.r2 = self.r.reshape(B, D)
        self.rn = np.empty((B, D), f)
        self.pre = np.empty((B, C), f)
        self.u = np.empty((B, C), f)
        self.xdbl = np.empty((B, W), f)
        self.dt = np.zeros((B, C), f)
        self.y = np.empty((B, C), f)
        self.z = np.empty((B, D), f)
        self.rstd = np.empty(B, f)
        if self.full:
            self.xn = np.empty((B, D), f)
            self.xin = np.empty((B, C), f)
            self.zg = np.empty((B, C), f)
            self.yg = np.empty((B, C), f)
        self.ids = np.empty((B, 1), np.int64)
        self.position = 0
        self.scorer = HeadScorer(head)

    def reset(self) -> None:
        for a in self.conv_state + self.h:
            a.fill(0.0)
        self.position = 0

    def step(self, token_ids) -> np.ndarray:
        """One token per sequence: token_ids (B,) ints in [0, V) -> z (B, D) float32."""
        m, p, nt = self.model, self.model.p, self.model.n_threads
        B, D, C, N = self.B, m.D, self.C, m.N
        self.ids[:, 0] = np.asarray(token_ids, np.int64).reshape(B)
        if self.ids.min() < 0 or self.ids.max() >= m.V:
            raise ValueError(f"token ids must be in [0, {m.V}), got {self.ids.min()}..{self.ids.max()}")
        _embed.embed_forward(self.r, self.ids, p["embedding"], nt)
        x = self.r2
        for i in range(m.L):
            q = f"layers.{i}."
            if self.full:
                _rmsnorm.rmsnorm_forward(self.xn, self.rstd, x, p[q + "norm_w"], RMS_EPS, nt)
                w_in = p[q + "in_proj_w"]
                np.matmul(self.xn, w_in[:, :C], out=self.xin)
                np.matmul(self.xn, w_in[:, C:], out=self.zg)
                cin = self.xin
            else:
                cin = x
            _step.conv_step(self.pre, self.u, self.conv_state[i], cin, p[q + "conv_w"], p[q + "conv_b"], nt)
            if m.selective:
                np.matmul(self.u, p[q + "x_proj_w"], out=self.xdbl)
                np.matmul(self.xdbl[:, 2 * N:], p[q + "dt_proj_w"], out=self.dt)
            else:
                self.xdbl[:, :N] = p[q + "B_lti"]
                self.xdbl[:, N:2 * N] = p[q + "C_lti"]
            _step.scan_step(self.y, self.h[i], self.u, self.dt, p[q + "dt_proj_b"], self.negA[i], self.xdbl,
                            p[q + "D_skip"], nt)
            if self.full:
                _gate.gate_forward(self.yg, self.y, self.zg, nt)
                np.matmul(self.yg, p[q + "out_proj_w"], out=self.rn)
            else:
                np.matmul(self.y, p[q + "out_proj_w"], out=self.rn)
            self.rn += x
            x[...] = self.rn
        _norm.layernorm_forward(self.z, self.rstd, x, LN_EPS, nt)
        self.position += 1
        return self.z

    def prefill(self, ids) -> np.ndarray:
        """Feed (B, T) prompt tokens (T >= 1) in order; returns z of the last token (B, D)."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim == 1:
            ids = np.broadcast_to(ids, (self.B, ids.shape[0]))
        if ids.shape[0] != self.B or ids.shape[1] < 1:
            raise ValueError(f"prefill: ids have shape {ids.shape}, expected ({self.B}, T >= 1)")
        z = None
        for t in range(ids.shape[1]):
            z = self.step(ids[:, t])
        return z

    def broadcast_from(self, other: "InferenceState", row: int = 0) -> np.ndarray:
        """Make every sequence of this state a copy of `other`'s sequence `row` (e.g. one prompt
        prefilled once, then sampled several ways); returns z (B, D)."""
        for mine, theirs in zip(self.conv_state + self.h, other.conv_state + other.h):
            mine[...] = theirs[row]
        self.z[...] = other.z[row]
        self.position = other.position
        return self.z

    def outputs(self, z: np.ndarray | None = None) -> np.ndarray:
        """The head's scores (B, V) of z (default: the last step's)."""
        return self.scorer(self.z if z is None else z)
