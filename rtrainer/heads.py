"""Heads: what turns the final hidden states z (B*T, D) into a loss and predictions.

A head is an object with
    param_specs() -> list[ParamSpec]      its tensors (placed in the flat buffer with the model's)
    bind(params, grads)                   receives named views of the flat buffers
    init_params(seed, init)               fills its tensors
    forward(z, targets) -> float          mean loss over the scored tokens (caches what backward needs);
                                          a target of -1 (IGNORE) is not scored: no loss, no gradient
    backward(dz)                          ADDS dloss/dz (B*T, D) into dz, and its own grads into grads
    predict(z) -> int64 (B*T,)            predicted token ids (validation accuracy)
    detached()                            an unbound copy with the same hyperparameters (for a
                                          second buffer, e.g. the base model of an expansion)
The loss lives in the head, so swapping the head or the loss means overriding
`Trainer.build_head` (see examples/softmax_head.py).

Built in: HPNHead (head.kind = "hpn") and SoftmaxHead (head.kind = "softmax").
spread_prototypes() places fixed HPN prototypes before training (HPN paper, Mettes et al. 2019).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from ._kernels import hpn as _hpn
from ._kernels import xent as _xent
from .params import ParamSpec


class Head:
    """Base class of heads; see the module docstring for the contract."""

    n_threads = 1

    def param_specs(self) -> list[ParamSpec]:
        return []

    def bind(self, params: dict, grads: dict) -> None:
        self.p, self.g = params, grads

    def init_params(self, seed: int, init: str) -> None:
        pass

    def forward(self, z: np.ndarray, targets: np.ndarray) -> float:
        raise NotImplementedError

    def backward(self, dz: np.ndarray) -> None:
        raise NotImplementedError

    def predict(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def detached(self):
        new = copy.copy(self)
        new.p = new.g = None
        return new


class HPNHead(Head):
    """Hyperspherical prototype head.

    cos_i = zhat_i . Pt[y_i] with zhat = z/max(|z|,1e-8) and Pt = P/|P| (normalize_prototypes)
    or raw P (the reference); loss = mean (1 - cos_i)^2; prediction = argmax_k zhat . Pt_k.
    Prototypes are fixed unit vectors by default (learnable_prototypes = false, as in the HPN
    paper), placed before training by spread_prototypes() (prototype_init = "spread": a regular
    simplex when D >= V-1, else optimised for separation) or random unit vectors ("random").
    They are parameters, so they are saved in every checkpoint.

    separation > 0 (learnable prototypes only) adds separation · max_{k≠l} cos(P_k, P_l) to the loss
    (the loss itself never pushes prototypes apart, so learnable ones can collapse). The
    largest cosine is found with blocked BLAS products (max_cosine: 2·V²·D flops a step, no (V, V)
    matrix); its (sub)gradient reaches only the two prototypes of that pair.
    """

    def __init__(self, vocab_size: int, d_model: int, normalize: bool = True, learnable: bool = False,
                 n_threads: int = 1, prototype_init: str = "spread", separation: float = 0.0):
        self.V, self.D = vocab_size, d_model
        self.normalize, self.learnable = normalize, learnable
        self.prototype_init = prototype_init
        self.separation = float(separation)
        if self.separation > 0 and not learnable:
            raise ValueError("a prototype separation penalty needs learnable prototypes")
        self.n_threads = n_threads
        self._no_dP = np.zeros((0, d_model), np.float32)

    def detached(self):
        new = super().detached()
        new.cos = None
        return new

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec("head.prototypes", (self.V, self.D), decay=True, trainable=self.learnable)]

    def init_params(self, seed: int, init: str) -> None:
        rng = np.random.default_rng([seed, 1])
        P = self.p["head.prototypes"]
        if init == "reference":
            P[...] = rng.normal(0.0, 0.02, size=P.shape)        # raw N(0, 0.02^2), as the reference
        elif self.prototype_init == "spread":
            P[...] = spread_prototypes(self.V, self.D, seed)
        else:
            g = rng.normal(size=P.shape)
            P[...] = g / np.linalg.norm(g, axis=1, keepdims=True)  # random unit vectors

    def forward(self, z, targets):
        self.z = z
        self.t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
        if getattr(self, "cos", None) is None or self.cos.shape[0] != self.t.shape[0]:
            self.cos = np.empty(self.t.shape[0], np.float32)
        loss = _hpn.hpn_forward(self.cos, z, self.p["head.prototypes"], self.t, self.normalize, self.n_threads)
        if self.separation > 0:
            loss += self.separation * self._largest_cosine()
        return loss

    def _largest_cosine(self) -> float:
        """max_{k≠l} cos(P_k, P_l); remembers the pair (k, l) for backward. The pair is found in
        float32 (BLAS), its cosine recomputed in float64."""
        P = self.p["head.prototypes"]
        if self.V < 2:
            self._pair = None
            return 0.0
        Pn = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), np.float32(1e-8))
        _, nn, mx = max_cosine(Pn)
        k = int(np.argmax(mx))
        l = int(nn[k])
        pk, pl = P[k].astype(np.float64), P[l].astype(np.float64)
        nk, nl = max(np.linalg.norm(pk), 1e-8), max(np.linalg.norm(pl), 1e-8)
        c = float(pk @ pl / (nk * nl))
        self._pair = (k, l, pk, pl, nk, nl, c)
        return c

    def backward(self, dz):
        dP = self.g["head.prototypes"] if self.learnable else self._no_dP
        _hpn.hpn_backward(dz, dP, self.z, self.p["head.prototypes"], self.t, self.cos,
                          self.normalize, self.learnable, 1.0, self.n_threads)
        if self.separation > 0 and self._pair is not None:
            # d cos(p_k, p_l)/d p_k = (p̂_l - cos·p̂_k)/‖p_k‖, and symmetrically for p_l
            k, l, pk, pl, nk, nl, c = self._pair
            dP[k] += self.separation * (pl / nl - c * pk / nk) / nk
            dP[l] += self.separation * (pk / nk - c * pl / nl) / nl

    def predict(self, z, block: int = 1024):
        """argmax_k zhat_i . Pt_k as BLAS products over blocks of `block` tokens (no (n, V) matrix
        larger than block x V). The positive row scale of zhat does not change the argmax, so z is
        used as it is; ties go to the lowest k."""
        P = self.p["head.prototypes"]
        if self.normalize:
            P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), np.float32(1e-8))
        pred = np.empty(z.shape[0], np.int64)
        for i in range(0, z.shape[0], block):
            np.argmax(z[i:i + block] @ P.T, axis=1, out=pred[i:i + block])
        return pred


class SoftmaxHead(Head):
    """Softmax cross-entropy head (head.kind = "softmax").

    logits = z @ W^T (+ b), W (V, D) learnable (weight decay), b (V) optional;
    loss = mean over the scored tokens of logsumexp(logits_i) - logits_i[y_i] (nats/token);
    prediction = argmax_k logits_ik (first max wins).
    The logits are one BLAS product into a reused (n, V) buffer; the fused row kernel
    xent.softmax_xent (stable log-softmax, exact exp, sum in double) returns the loss and turns the
    buffer into dloss/dlogits in place; backward is two BLAS products (+ a column sum for b).
    """

    def __init__(self, vocab_size: int, d_model: int, bias: bool = True, n_threads: int = 1):
        self.V, self.D, self.bias = vocab_size, d_model, bias
        self.n_threads = n_threads
        self._buf = None

    def detached(self):
        new = super().detached()
        new._buf = None
        return new

    def param_specs(self) -> list[ParamSpec]:
        specs = [ParamSpec("head.W", (self.V, self.D), decay=True)]
        if self.bias:
            specs.append(ParamSpec("head.b", (self.V,)))
        return specs

    def init_params(self, seed: int, init: str) -> None:
        rng = np.random.default_rng([seed, 1])
        self.p["head.W"][...] = rng.normal(0.0, 0.02, size=(self.V, self.D))   # GPT-2's output init
        if self.bias:
            self.p["head.b"][...] = 0.0

    def _logits(self, z: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.matmul(z, self.p["head.W"].T, out=out)                 # logits = z @ W^T
        if self.bias:
            out += self.p["head.b"]
        return out

    def forward(self, z, targets):
        self.z = z
        self.t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
        n = self.t.shape[0]
        if self._buf is None or self._buf.shape[0] != n:
            self._buf = np.empty((n, self.V), np.float32)          # logits, then dloss/dlogits
            self._dz = np.empty((n, self.D), np.float32)
            self._dW = np.empty((self.V, self.D), np.float32)
        self._logits(z, self._buf)
        return _xent.softmax_xent(self._buf, self.t, 1.0, self.n_threads)

    def backward(self, dz):
        dl = self._buf                                              # (n, V) dloss/dlogits
        np.matmul(dl, self.p["head.W"], out=self._dz)               # dz += dl @ W
        dz += self._dz
        np.matmul(dl.T, self.z, out=self._dW)                       # dW += dl^T @ z
        self.g["head.W"] += self._dW
        if self.bias:
            self.g["head.b"] += dl.sum(axis=0)

    def predict(self, z, block: int = 1024):
        pred = np.empty(z.shape[0], np.int64)
        for i in range(0, z.shape[0], block):
            zb = z[i:i + block]
            np.argmax(self._logits(zb, np.empty((zb.shape[0], self.V), np.float32)), axis=1, out=pred[i:i + block])
        return pred


# ------------------------------------------------------------------------------ prototype placement

def simplex_prototypes(V: int, D: int, seed: int = 0) -> np.ndarray:
    """V unit vectors in R^D (D >= V-1) with every pairwise cosine exactly -1/(V-1): the vertices of
    a regular simplex, centred and normalised, embedded by a seeded random orthonormal map. float64."""
    if D < V - 1:
        raise ValueError(f"a regular simplex of {V} vertices needs D >= {V - 1}, got D = {D}")
    if V == 1:
        g = np.random.default_rng([seed, 5]).normal(size=(1, D))
        return g / np.linalg.norm(g)
    n = V - 1
    # e_1 … e_n and a·(1, …, 1) with a = (1 - sqrt(n+1))/n are n+1 points at equal distance sqrt(2)
    S = np.zeros((V, n))
    S[:n] = np.eye(n)
    S[n] = (1.0 - math.sqrt(n + 1)) / n
    S -= S.mean(axis=0)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    # (n) -> (D): Q (D, n) with orthonormal columns, from a seeded Gaussian
    Q, _ = np.linalg.qr(np.random.default_rng([seed, 5]).normal(size=(D, n)))
    P = S @ Q.T
    return P / np.linalg.norm(P, axis=1, keepdims=True)


def max_cosine(P: np.ndarray, block: int = 1024) -> tuple[float, np.ndarray, np.ndarray]:
    """(largest cosine between two different rows, each row's nearest other row (V,), its cosine (V,)).
    Rows must be unit vectors. Blocks of `block` rows: no (V, V) matrix."""
    V = P.shape[0]
    nn = np.zeros(V, np.int64)
    mx = np.full(V, -1.0, P.dtype)
    if V < 2:
        return -1.0, nn, mx
    for i in range(0, V, block):
        C = P[i:i + block] @ P.T                                    # (blk, V) cosines
        r = np.arange(C.shape[0])
        C[r, i + r] = -np.inf
        np.argmax(C, axis=1, out=nn[i:i + block])
        mx[i:i + block] = C[r, nn[i:i + block]]
    return float(mx.max()), nn, mx


def spread_prototypes(V: int, D: int, seed: int, steps: int | None = None, lr: float = 0.005,
                      momentum: float = 0.9) -> np.ndarray:
    """V unit prototypes in R^D spread over the hypersphere before training (HPN paper, §3.1),
    float64 (V, D), deterministic for a seed (and BLAS thread count).

    D >= V-1: the regular simplex (simplex_prototypes), optimal: every cosine is -1/(V-1).
    D <  V-1: start from seeded random unit vectors and minimise the HPN paper's separation loss
    (1/V) Σ_i max_{j≠i} cos(p_i, p_j) by projected gradient descent with momentum on the sphere,
    keeping the iterate with the smallest LARGEST cosine. The gradient only involves each row's
    nearest neighbour, so a step costs one blocked (V, V, D) product plus O(V·D):
    2·V²·D flops. steps defaults to a fixed budget of ~2e11 flops, clamped to [10, 300]
    (V 8192, D 512: 10 steps, 5.6–23 s on 2 shared cores, largest cosine 0.247 -> 0.135;
    V 1000, D 32: 300 steps, largest cosine 0.739 -> 0.32)."""
    if V < 1 or D < 1:
        raise ValueError(f"need V >= 1 and D >= 1, got V = {V}, D = {D}")
    if D >= V - 1:
        return simplex_prototypes(V, D, seed)
    rng = np.random.default_rng([seed, 5])
    g = rng.normal(size=(V, D))
    P = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    if steps is None:
        steps = int(min(300, max(10, math.ceil(2e11 / (2.0 * V * V * D)))))
    mom = np.zeros_like(P)
    best, best_P = math.inf, P
    for step in range(steps + 1):
        m, nn, _ = max_cosine(P)
        if m < best:
            best, best_P = m, P.copy()
        if step == steps:
            break
        G = P[nn]                                  # d cos(p_i, p_nn(i)) / d p_i  (fancy index: a copy)
        np.add.at(G, nn, P)                        # ... and / d p_nn(i)
        G -= (G * P).sum(axis=1, keepdims=True) * P   # tangent to the sphere
        mom *= momentum
        mom += G
        P = P - lr * mom
        P /= np.linalg.norm(P, axis=1, keepdims=True)
    P = best_P.astype(np.float64)
    return P / np.linalg.norm(P, axis=1, keepdims=True)
