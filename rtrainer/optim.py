"""AdamW over the flat parameter buffer, the learning-rate schedule and global-norm clipping.

AdamW: beta1 0.9, beta2 0.999, eps 1e-8, decoupled weight decay 0.01 on matrices by
default (`weight_decay_scope = "all"` decays every tensor, as the reference does). Bias
correction counts optimizer updates that were applied (skipped steps do not count). The update
itself is one fused kernel (rtrainer._kernels.optim.adamw_step) over the trainable ranges.
"""
from __future__ import annotations

import math


from ._kernels import optim as _optim
from .params import FlatParams


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_scale: float) -> float:
    """Learning rate of global step `step` (0-based): linear warmup, then cosine decay to
    min_lr_scale*base_lr over the remaining steps. Keyed to the global step, so a resumed run
    continues the same schedule."""
    floor = min(max(min_lr_scale, 0.0), 1.0) * base_lr
    if warmup_steps > 0 and step < warmup_steps:
        return max(base_lr * (step + 1) / warmup_steps, floor)
    denom = max(total_steps - warmup_steps, 1)
    p = min(max(step - warmup_steps, 0), denom) / denom
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class AdamW:
    """Fused AdamW with global-norm clipping over the trainable ranges of a FlatParams."""

    def __init__(self, flat: FlatParams, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 weight_decay_scope="matrices", grad_clip=0.0, n_threads=1):
        self.flat = flat
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay, self.grad_clip = float(eps), float(weight_decay), float(grad_clip)
        self.segments = flat.segments(weight_decay_scope)
        self.n_threads = n_threads
        self.t = 0  # optimizer updates applied so far (bias correction)

    def state(self) -> dict:
        """What a checkpoint stores besides the moments (those are tensors of the FlatParams)."""
        return {"updates": self.t}

    def load_state(self, st: dict) -> None:
        self.t = int(st["updates"])

    def grad_norm(self) -> float:
        """Global L2 norm of the trainable gradients (deterministic for any thread count).
        Non-finite when any gradient element is."""
        return math.sqrt(_optim.sumsq(self.flat.grad_buf, self.segments, self.n_threads))

    def clip_scale(self, grad_norm: float) -> float:
        if self.grad_clip > 0.0 and grad_norm > self.grad_clip:
            return self.grad_clip / grad_norm
        return 1.0

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.t += 1
        f = self.flat
        _optim.adamw_step(f.param_buf, f.grad_buf, f.m, f.v, self.segments, lr, self.beta1, self.beta2, self.eps,
                          self.weight_decay, self.t, grad_scale, self.n_threads)
