"""Staged training: layer expansion, freezing, Forward-Forward local learning on D_skip, the BP
cadence and gradient surgery, as a training policy over a Net (rtrainer.net) for
rtrainer.step.train_step. It never sees the Trainer.

Parsing of model.placement and train.freeze lives in rtrainer.grammar (re-exported here):
    expansion_layout(placement, base, target) -> list: entry j of the expanded stack is the index of
        the base layer that goes there, or None for a new layer.
    frozen_layers(freeze, n_layers) -> sorted tuple of frozen layer indices.

Expansion is generic over layer kinds: a layer is the group of tensors named `layers.{i}.*`, moved
by renaming; a new layer is filled by the layer kind's init function (`model.layer_init`, e.g.
rtrainer.model.init_layer) and then its `out_proj_w` is zeroed, so it is an identity block in the
residual stream whose other tensors are random: its out_proj_w gets a non-zero gradient at once
and the block learns (zeroing every tensor instead gives a stationary point it never leaves).

Freezing is the Net's (a mask over flat ranges that both layer kinds honour); `Staged` adds the
Forward-Forward objective, the backprop cadence and surgery to the step, and keeps the counters a
checkpoint stores (state() / load_state()).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from . import ff as ff_mod
from . import runstate
from . import surgery as surgery_mod
from .errors import CheckpointError, ConfigError
from .grammar import expansion_layout, frozen_layers
from .model import layer_of
from .params import FlatParams

__all__ = ["expansion_layout", "frozen_layers", "layer_of", "count_layers", "expand_state", "peek", "Staged"]


# ------------------------------------------------------------------------------------ expansion
def count_layers(names) -> int:
    """Number of layers in a set of parameter names (layers.0 .. layers.{L-1} must all be present)."""
    idx = {layer_of(n) for n in names} - {None}
    return max(idx) + 1 if idx else 0


def _leaf(name: str) -> str:
    return name.split(".", 2)[2]


def expand_state(flat: FlatParams, base: dict, layout: list, new_layer_init, rng_seed: int, init: str,
                 source: str) -> None:
    """Fill flat (the expanded model) from `base` = {"param/<name>", "adam_m/<name>", "adam_v/<name>"}
    of the base model (a checkpoint's tensors or a freshly initialised base model): base tensors are
    moved to their new layer index with their moments; new layers (layout[j] is None) are
    initialised by new_layer_init(views, j, rng, init, n_layers), get out_proj_w = 0 and zero moments."""
    target = len(layout)
    for buf, prefix in ((flat.param_buf, "param"), (flat.m, "adam_m"), (flat.v, "adam_v")):
        views = flat.views(buf)
        for name, view in views.items():
            j = layer_of(name)
            if j is not None and layout[j] is None:
                view[...] = 0.0
                continue
            src = name if j is None else f"layers.{layout[j]}.{_leaf(name)}"
            key = f"{prefix}/{src}"
            if key not in base:
                raise CheckpointError(f"{source}: tensor '{key}' is missing (needed for '{name}')")
            t = base[key]
            if tuple(t.shape) != tuple(view.shape):
                raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(view.shape)} for '{name}'")
            view[...] = t
    for j, b in enumerate(layout):
        if b is None:
            new_layer_init(flat.params, j, np.random.default_rng([rng_seed, 7, j]), init, target)
            for name, view in flat.params.items():
                if layer_of(name) == j and _leaf(name) == "out_proj_w":
                    view[...] = 0.0


def peek(stream):
    """A function that returns one batch's ids of `stream` without moving the stream."""
    def batch():
        st = stream.state()
        ids, _ = stream.next_batch()
        stream.set_state(st)
        return ids
    return batch


# ------------------------------------------------------------------------------------ the policy
class Staged:
    """Forward-Forward, BP cadence and surgery for one run, and the expansion of a fresh run.

    Built from the resolved Config: `Staged(cfg)`. `active` is False when the run has none of
    freezing / FF (then the Trainer passes no policy and the step is the plain one)."""

    local_loss_key = "ff_loss"   # the loss that decides a local (FF-only) step, in StepResult.extra

    def __init__(self, cfg):
        m, t = cfg.model, cfg.train
        self.layout = expansion_layout(m.placement, m.base_layers, m.target_layers)
        self.frozen = frozen_layers(t.freeze, m.target_layers)
        self.freeze_embedding = bool(t.freeze_embedding)
        self.ff = bool(t.ff)
        self.bp_cadence = int(t.bp_cadence)
        self.surgery = t.surgery
        self.surgery_epsilon, self.gradnorm_alpha, self.cagrad_lambda = \
            t.surgery_epsilon, t.gradnorm_alpha, t.cagrad_lambda
        self.ff_lr, self.ff_margin = t.ff_lr, t.ff_margin
        # the FF term enters a BP step with the constant weight ff_lr / optim.lr (dividing by the
        # scheduled lr instead would grow the FF share 10x along a cosine schedule)
        self.ff_weight = t.ff_lr / cfg.optim.lr
        self.ff_layers = [i for i in range(m.target_layers) if i not in self.frozen]
        if self.ff and not self.ff_layers:
            raise ConfigError(f"train.ff = true but train.freeze = {t.freeze!r} freezes every layer: nothing "
                              "for Forward-Forward to train")
        self.base_layers = m.base_layers
        self.expanding = m.target_layers != m.base_layers
        self.active = bool(self.frozen or self.freeze_embedding or self.ff)
        self.bp_steps = self.ff_steps = self.conflicts = 0

    # -- a fresh run
    def initialise(self, net, seed: int, init: str, init_from: str = "", peek_batch=None) -> None:
        """Fresh run: the base model (from init_from, or freshly initialised as a base_layers model
        would be) expanded to the net's layers. peek_batch() -> ids: one training batch read
        without moving the stream (the calibration of new layers)."""
        if not init_from and not self.expanding:
            net.init(seed, init)
            return
        model = net.model
        if model.layer_init is None:
            raise ConfigError(f"model.layer: the model class {type(model).__name__} has no layer_init, so it "
                              "cannot be expanded")
        if init_from:
            # checked here, on a fresh start only: a resumed run no longer needs its base checkpoint
            if not os.path.exists(init_from):
                raise ConfigError(f"model.init_from = {init_from!r}: no such checkpoint, step directory or run "
                                  "directory")
            source = f"model.init_from = {init_from!r}"
            found = runstate.newest_valid(init_from)
            if found is None:
                raise ConfigError(f"model.init_from = {init_from!r}: no step checkpoint in "
                                  f"{runstate.checkpoints_dir(Path(init_from))}")
            base = found[1]
            n = count_layers([k.split("/", 1)[1] for k in base if k.startswith("param/")])
            if n != self.base_layers:
                raise ConfigError(f"{source} holds a {n}-layer model but model.base_layers = {self.base_layers}")
        else:
            source = "the fresh base model"
            base = self._fresh_base(net, seed, init)
        expand_state(net.flat, base, self.layout, model.layer_init, seed, init, source)
        if self.expanding:
            self.calibrate_new_layers(net, peek_batch)

    def _fresh_base(self, net, seed: int, init: str) -> dict:
        """The tensors of a freshly initialised base_layers model with the same head."""
        from .net import Net

        base = Net(net.model.resized(self.base_layers), net.head.detached())
        base.init(seed, init)
        return base.tensors()

    def calibrate_new_layers(self, net, peek_batch) -> None:
        """Scale each new layer's conv_w and conv_b by 1/max|input| over one training batch (when that
        is > 1), so that the new block starts in its normal operating range.

        Only for layer kinds without a norm at the block's input (model.prenorm False: mamba-lite).
        There a trained model's residual stream can be large (the final LayerNorm does not care):
        in the example's 2-layer model the input of the layers after base layer 1 has rms 336 and
        max 14,000. The block's output grows like the cube of its input scale (u, Bt, Ct and delta
        are all linear in it), so a normally initialised new layer there puts out ~1e15, overflows
        to inf on some windows (inf * 0 = nan through the zero out_proj_w) and its first update makes
        the run non-finite. The max, not the rms, because the residual stream has outliers
        (max/rms = 40 there). out_proj_w is still 0, so the model's function does not change."""
        model = net.model
        new = [j for j, b in enumerate(self.layout) if b is None]
        if not new or model.prenorm or peek_batch is None:
            return
        model.forward(peek_batch())
        for j in new:
            scale = float(np.max(np.abs(model.layer_input(j))))
            if scale > 1.0:
                for leaf in ("conv_w", "conv_b"):
                    v = net.params[model.layer_prefix(j) + leaf]
                    v[...] = (v.astype(np.float64) / scale).astype(np.float32)

    # -- checkpoint state
    def state(self) -> dict:
        return {"layout": self.layout, "frozen_layers": list(self.frozen), "freeze_embedding": self.freeze_embedding,
                "ff": self.ff, "bp_cadence": self.bp_cadence, "surgery": self.surgery,
                "bp_steps": self.bp_steps, "ff_steps": self.ff_steps, "conflicts": self.conflicts}

    def load_state(self, st, source: str) -> None:
        if st is None:  # a checkpoint without staged state: only a plain run can resume from it
            st = {"layout": list(range(len(self.layout))), "frozen_layers": [], "freeze_embedding": False,
                  "ff": False, "bp_cadence": 1, "surgery": self.surgery, "bp_steps": 0, "ff_steps": 0, "conflicts": 0}
        for key, now in (("layout", self.layout), ("frozen_layers", list(self.frozen)),
                         ("freeze_embedding", self.freeze_embedding), ("ff", self.ff),
                         ("bp_cadence", self.bp_cadence)):
            if st.get(key) != now:
                raise ConfigError(f"cannot resume from {source}: staged-training {key} is {st.get(key)!r} in the "
                                  f"checkpoint but {now!r} in this run")
        self.bp_steps, self.ff_steps = int(st["bp_steps"]), int(st["ff_steps"])
        self.conflicts = int(st.get("conflicts", 0))

    # -- the step (rtrainer.step.train_step calls these)
    def backprop(self, step: int) -> bool:
        """Step `step` (0-based) backpropagates: always without FF, every bp_cadence-th step with it."""
        return not self.ff or (step + 1) % self.bp_cadence == 0

    def _ff_grads(self, net):
        """(mean FF loss, [float64 dL/dD_skip of each FF layer]) from the last forward's layer inputs."""
        model = net.model
        losses, grads = [], []
        for i in self.ff_layers:
            h_pos, h_neg = ff_mod.ff_vectors(model.layer_input(i))
            L, grad = ff_mod.ff_loss_grad(net.params[model.layer_prefix(i) + "D_skip"], h_pos, h_neg,
                                          self.ff_margin)
            losses.append(L)
            grads.append(grad)
        return float(np.mean(losses)), grads

    def after_backward(self, net, step: int):
        """BP step: D_skip's gradient becomes b + ff_weight * surgery(f, b). Returns (extra, finite):
        the FF metrics and whether the FF loss is finite."""
        if not self.ff:
            return {}, True
        ff_loss, ff_grads = self._ff_grads(net)
        conflicts = 0
        for i, f in zip(self.ff_layers, ff_grads):
            gv = net.grads[net.model.layer_prefix(i) + "D_skip"]
            b = gv.astype(np.float64)
            f2, conflict = surgery_mod.combine(self.surgery, f, b, self.surgery_epsilon, self.gradnorm_alpha,
                                               self.cagrad_lambda)
            conflicts += conflict
            gv[...] = (b + self.ff_weight * f2).astype(np.float32)
        extra = {"ff_loss": ff_loss, "bp_applied": True, "conflict_layers": conflicts, "surgery": self.surgery}
        return extra, math.isfinite(ff_loss)

    def local_grads(self, net, step: int):
        """FF-only step (after the forward): (FF loss, {D_skip name: float64 gradient}, extra)."""
        ff_loss, ff_grads = self._ff_grads(net)
        names = [net.model.layer_prefix(i) + "D_skip" for i in self.ff_layers]
        extra = {"ff_loss": ff_loss, "bp_applied": False, "conflict_layers": 0, "surgery": self.surgery}
        return ff_loss, dict(zip(names, ff_grads)), extra

    def local_update(self, net, grads: dict) -> None:
        """Plain SGD on D_skip at train.ff_lr: no Adam, no decay, no schedule."""
        for name, gr in grads.items():
            th = net.params[name]
            th[...] = (th.astype(np.float64) - self.ff_lr * gr).astype(np.float32)

    def after_step(self, r) -> None:
        if not r.finite or not self.ff:
            return
        if r.extra["bp_applied"]:
            self.bp_steps += 1
            self.conflicts += r.extra["conflict_layers"]
        else:
            self.ff_steps += 1
