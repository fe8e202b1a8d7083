"""rtrainer.step.train_step: the one training step. It is the hand-written sequence (zero grad,
forward, loss, backward, norm, clip, AdamW) bit for bit; a non-finite loss or gradient skips the
update on every kind of step (plain, frozen, Forward-Forward with and without backprop); the
accumulation / all-reduce seams see the gradient before the norm."""
import math

import numpy as np
import pytest

from conftest import tiny_config
from rtrainer.config import load_config
from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack
from rtrainer.net import Net
from rtrainer.optim import AdamW
from rtrainer.params import FlatParams
from rtrainer.staged import Staged
from rtrainer.step import NoFaults, StepResult, train_step

V, D = 13, 8


def _net():
    net = Net(MambaLiteStack(V, D, 4, 3, 1, 2, scan_chunk=4), HPNHead(V, D, learnable=True))
    net.init(4, "mamba")
    return net


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(2, 9)), rng.integers(0, V, size=(2, 9))


def test_train_step_is_the_hand_written_step_bitwise():
    net = _net()
    opt = AdamW(net.flat, grad_clip=0.5)
    # the same pieces assembled and stepped by hand
    model, head = MambaLiteStack(V, D, 4, 3, 1, 2, scan_chunk=4), HPNHead(V, D, learnable=True)
    flat = FlatParams(model.param_specs() + head.param_specs())
    model.bind(flat.params, flat.grads)
    head.bind(flat.params, flat.grads)
    model.init_params(4, "mamba")
    head.init_params(4, "mamba")
    hand = AdamW(flat, grad_clip=0.5)
    dz = np.empty((18, D), np.float32)
    clipped_any = False
    for i in range(4):
        ids, targets = _batch(i)
        r = train_step(net, opt, ids, targets, 1e-2, faults=NoFaults())
        assert isinstance(r, StepResult) and r.finite and r.extra == {}
        flat.zero_grad()
        loss = head.forward(model.forward(ids), targets)
        dz.fill(0.0)
        head.backward(dz)
        model.backward(dz)
        gn = hand.grad_norm()
        scale = hand.clip_scale(gn)
        hand.step(1e-2, scale)
        assert r.loss == loss and r.grad_norm == gn and r.clipped == (scale < 1.0)
        clipped_any |= r.clipped
    assert clipped_any and opt.t == hand.t == 4
    assert np.array_equal(net.flat.param_buf, flat.param_buf) and np.array_equal(net.flat.v, flat.v)


class _NanAt:
    """Faults on one step: a NaN loss or a NaN gradient of one tensor."""

    def __init__(self, step, loss=False, tensor=None):
        self.step, self.nan_loss, self.tensor = step, loss, tensor

    def loss(self, step, loss):
        return math.nan if self.nan_loss and step == self.step else loss

    def grads(self, step, grads):
        if self.tensor and step == self.step:
            if self.tensor not in grads:
                return False
            grads[self.tensor][...] = np.nan
        return True


def _staged_policy(tmp_path, *sets):
    cfg = load_config(tiny_config(tmp_path), ["train.ff=true", "train.bp_cadence=2", "train.ff_margin=50.0",
                                              'train.freeze="first:1"', *sets])
    net = Net.build(cfg, V, model=MambaLiteStack(V, D, 4, 3, 1, 2, scan_chunk=4), head=HPNHead(V, D))
    net.init(2, "mamba")
    return net, Staged(cfg)


@pytest.mark.parametrize("kind", ["plain", "ff-only", "ff+bp"])
@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_a_non_finite_step_changes_nothing_on_every_kind_of_step(tmp_path, kind, fault):
    if kind == "plain":
        net, policy, step = _net(), None, 0
    else:
        net, policy = _staged_policy(tmp_path)
        step = 0 if kind == "ff-only" else 1       # bp_cadence 2: step index 1 backpropagates
    opt = AdamW(net.flat)
    before = [b.copy() for b in (net.flat.param_buf, net.flat.m, net.flat.v)]
    faults = _NanAt(step, loss=fault == "loss", tensor="layers.1.D_skip" if fault == "grad" else None)
    ids, targets = _batch(0)
    r = train_step(net, opt, ids, targets, 1e-2, policy, step=step, faults=faults)
    assert not r.finite and opt.t == 0
    for a, b in zip(before, (net.flat.param_buf, net.flat.m, net.flat.v)):
        assert np.array_equal(a, b)
    if policy is not None:
        assert r.extra["bp_applied"] is (kind == "ff+bp") and policy.bp_steps == policy.ff_steps == 0
        # the same step without the fault is applied and counted
        r = train_step(net, opt, ids, targets, 1e-2, policy, step=step, faults=NoFaults())
        assert r.finite and (policy.bp_steps, policy.ff_steps) == ((1, 0) if kind == "ff+bp" else (0, 1))
        assert not np.array_equal(before[0], net.flat.param_buf)


def test_env_faults_reach_a_staged_step(tmp_path, monkeypatch):
    """RTRAINER_FAULT (the default faults) on a Forward-Forward-only step: step N is 1-based."""
    net, policy = _staged_policy(tmp_path)
    opt = AdamW(net.flat)
    ids, targets = _batch(0)
    monkeypatch.setenv("RTRAINER_FAULT", "nan_grad_at_step=1:layers.1.D_skip")
    r = train_step(net, opt, ids, targets, 1e-2, policy, step=0)
    assert not r.finite and not r.extra["bp_applied"] and math.isnan(r.grad_norm)
    monkeypatch.setenv("RTRAINER_FAULT", "nan_loss_at_step=2")
    r = train_step(net, opt, ids, targets, 1e-2, policy, step=1)
    assert not r.finite and r.extra["bp_applied"] and opt.t == 0
    r = train_step(net, opt, ids, targets, 1e-2, policy, step=3)     # another step: not affected
    assert r.finite and opt.t == 1


def test_grad_hook_and_loss_hook_are_the_reduction_seams():
    net = _net()
    opt = AdamW(net.flat)
    ids, targets = _batch(0)
    targets[0, :4] = -1
    seen = {}

    def grad_hook(buf):     # an all-reduce would average buf over workers in place
        seen["buf"] = buf
        seen["norm_before"] = float(np.sqrt(np.sum(buf.astype(np.float64) ** 2)))
        buf *= 0.5

    def loss_hook(loss, n_scored):
        seen["n"] = n_scored
        return loss * 2.0

    loss = net.loss(ids, targets)
    r = train_step(net, opt, ids, targets, 1e-2, faults=NoFaults(), grad_hook=grad_hook, loss_hook=loss_hook)
    assert seen["buf"] is net.flat.grad_buf and seen["n"] == targets.size - 4
    assert r.loss == 2.0 * loss
    assert r.grad_norm == pytest.approx(0.5 * seen["norm_before"], rel=1e-5)
