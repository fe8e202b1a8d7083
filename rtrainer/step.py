"""The training step: one function for every kind of step (plain, frozen layers, Forward-Forward,
backprop cadence, surgery), used by the Trainer, the parity probe, bench/ and the tests.

    r = train_step(net, optimizer, ids, targets, lr, policy, step=i)    # -> StepResult

In order:
  1. gradients: zero, forward, head loss, backward (Net.forward_backward); frozen ranges are zeroed.
     Accumulation seam: more micro-batches would add into the same flat gradient buffer here
     (forward_backward zeroes it, so the first micro-batch calls it and later ones add).
     forward_backward(ids, targets) -> loss replaces net.forward_backward: gradient accumulation over
     micro-batches and the per-rank weighting of a data-parallel run (rtrainer.distributed).
  2. loss_hook(loss, n_scored) -> loss: the seam where a data-parallel run reduces the loss over
     workers (weighted by the scored-token count); None = the local loss.
  3. policy.after_backward(...): what a training policy adds to the gradient (rtrainer.staged:
     Forward-Forward gradients combined by surgery).
  4. faults (RTRAINER_FAULT nan_loss_at_step / nan_grad_at_step) on this step.
  5. grad_hook(buffer): the seam where a data-parallel run all-reduces the flat gradient buffer
     in place (called once per step, after accumulation and the policy, before the norm); None =
     nothing.
  6. the global gradient norm; a non-finite loss or norm skips the step (no parameter, moment or
     step-count change); otherwise clip and update (AdamW).

A policy may turn a step into a local one (no backprop: policy.backprop(step) is False): then it
provides the gradients (policy.local_grads) and the update (policy.local_update) itself, and the
same faults, grad_hook (once per local gradient array), norm and skip rules apply.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import faults as faults_mod


@dataclasses.dataclass
class StepResult:
    loss: float               # the head loss (nan on a step without backprop)
    grad_norm: float          # global L2 norm of the gradient that was (or would have been) applied
    clipped: bool             # the update was scaled down by train.grad_clip
    finite: bool              # False: non-finite loss or gradient, the step was skipped
    extra: dict = dataclasses.field(default_factory=dict)   # the policy's metrics (e.g. ff_loss)


class EnvFaults:
    """The transient step faults of rtrainer.faults (RTRAINER_FAULT), on 1-based step N only:
    nan_loss_at_step=N makes the step's deciding loss NaN, nan_grad_at_step=N:TENSOR fills that
    tensor's gradient with NaN (a tensor that has no gradient on that step makes the norm NaN)."""

    def _match(self, step: int, kinds: tuple):
        kind, n, arg = faults_mod.parse()
        if kind in kinds and n.isdigit() and int(n) == step + 1:
            return kind, arg
        return None, None

    def loss(self, step: int, loss: float) -> float:
        kind, _ = self._match(step, ("nan_loss_at_step",))
        return math.nan if kind else loss

    def grads(self, step: int, grads: dict) -> bool:
        """Fill the named gradient with NaN; False when the step has no gradient of that tensor."""
        kind, arg = self._match(step, ("nan_grad_at_step",))
        if not kind:
            return True
        if arg in grads:
            grads[arg][...] = np.nan
            return True
        return False


class NoFaults:
    def loss(self, step: int, loss: float) -> float:
        return loss

    def grads(self, step: int, grads: dict) -> bool:
        return True


def train_step(net, optimizer, ids: np.ndarray, targets: np.ndarray, lr: float, policy=None, *, step: int = 0,
               faults=None, grad_hook=None, loss_hook=None, forward_backward=None) -> StepResult:
    """One optimisation step on the batch (ids, targets) at learning rate lr; `step` is the 0-based
    index of this step in the run (the policy's cadence and the faults are keyed to it). faults=None
    reads RTRAINER_FAULT (a no-op when it is unset); pass NoFaults() to ignore it."""
    faults = EnvFaults() if faults is None else faults
    if policy is not None and not policy.backprop(step):
        return _local_step(net, ids, step, policy, faults, grad_hook)
    loss = (forward_backward or net.forward_backward)(ids, targets)
    if loss_hook is not None:
        loss = loss_hook(loss, int(np.count_nonzero(np.asarray(targets) != -1)))
    extra, aux_finite = policy.after_backward(net, step) if policy is not None else ({}, True)
    loss = faults.loss(step, loss)
    has_grad = faults.grads(step, net.flat.grads)
    if grad_hook is not None:
        grad_hook(net.flat.grad_buf)
    gnorm = optimizer.grad_norm() if has_grad else math.nan
    finite = aux_finite and math.isfinite(loss) and math.isfinite(gnorm)
    clipped = False
    if finite:
        scale = optimizer.clip_scale(gnorm)
        clipped = scale < 1.0
        optimizer.step(lr, scale)
    r = StepResult(loss, gnorm, clipped, finite, extra)
    if policy is not None:
        policy.after_step(r)
    return r


def _local_step(net, ids, step, policy, faults, grad_hook) -> StepResult:
    net.forward(ids)
    aux_loss, grads, extra = policy.local_grads(net, step)
    aux_loss = faults.loss(step, aux_loss)
    has_grad = faults.grads(step, grads)
    if grad_hook is not None:
        for g in grads.values():
            grad_hook(g)
    gnorm = math.sqrt(sum(float(g @ g) for g in grads.values())) if has_grad else math.nan
    finite = math.isfinite(aux_loss) and math.isfinite(gnorm)
    if finite:
        policy.local_update(net, grads)
    extra = {**extra, policy.local_loss_key: aux_loss}
    r = StepResult(math.nan, gnorm, False, finite, extra)
    policy.after_step(r)
    return r
