"""Heads: what turns the final hidden states z (B*T, D) into a loss and predictions.

A head is an object with
    param_specs() -> list[ParamSpec]      its tensors (placed in the flat buffer with the model's)
    bind(params, grads)                   receives named views of the flat buffers
    init_params(seed, init)               fills its tensors
    forward(z, targets) -> float          mean loss over the B*T tokens (caches what backward needs)
    backward(dz)                          ADDS dloss/dz (B*T, D) into dz, and its own grads into grads
    predict(z) -> int64 (B*T,)            predicted token ids (validation accuracy)
The loss lives in the head, so swapping the head or the loss means overriding
`Trainer.build_head` (see examples/softmax_head.py).
"""
from __future__ import annotations

import numpy as np

from ._kernels import hpn as _hpn
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


class HPNHead(Head):
    """Hyperspherical prototype head (SPEC §2.2).

    cos_i = zhat_i . Pt[y_i] with zhat = z/max(|z|,1e-8) and Pt = P/|P| (normalize_prototypes)
    or raw P (the reference); loss = mean (1 - cos_i)^2; prediction = argmax_k zhat . Pt_k.
    Prototypes are fixed unit vectors by default (learnable_prototypes = false, as in the HPN
    paper); random unit vectors are already well spread when D is large.
    """

    def __init__(self, vocab_size: int, d_model: int, normalize: bool = True, learnable: bool = False,
                 n_threads: int = 1):
        self.V, self.D = vocab_size, d_model
        self.normalize, self.learnable = normalize, learnable
        self.n_threads = n_threads
        self._no_dP = np.zeros((0, d_model), np.float32)

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec("head.prototypes", (self.V, self.D), decay=True, trainable=self.learnable)]

    def init_params(self, seed: int, init: str) -> None:
        rng = np.random.default_rng([seed, 1])
        P = self.p["head.prototypes"]
        if init == "reference":
            P[...] = rng.normal(0.0, 0.02, size=P.shape)        # raw N(0, 0.02^2), as the reference
        else:
            g = rng.normal(size=P.shape)
            P[...] = g / np.linalg.norm(g, axis=1, keepdims=True)  # random unit vectors

    def forward(self, z, targets):
        self.z = z
        self.t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
        if getattr(self, "cos", None) is None or self.cos.shape[0] != self.t.shape[0]:
            self.cos = np.empty(self.t.shape[0], np.float32)
        return _hpn.hpn_forward(self.cos, z, self.p["head.prototypes"], self.t, self.normalize, self.n_threads)

    def backward(self, dz):
        dP = self.g["head.prototypes"] if self.learnable else self._no_dP
        _hpn.hpn_backward(dz, dP, self.z, self.p["head.prototypes"], self.t, self.cos,
                          self.normalize, self.learnable, 1.0, self.n_threads)

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
