"""Staged training (SPEC §3, reference §3-5): layer expansion, freezing, Forward-Forward local
learning on D_skip, the BP cadence and gradient surgery.

Parsing (pure functions, used by config validation and the trainer):
    expansion_layout(placement, base, target) -> list: entry j of the expanded stack is the index of
        the base layer that goes there, or None for a new layer.
    frozen_layers(freeze, n_layers) -> sorted tuple of frozen layer indices.

Expansion is generic over layer kinds: a layer is the group of tensors named `layers.{i}.*`, moved
by renaming; a new layer is filled by the layer kind's init function (`model.layer_init`, e.g.
rtrainer.model.init_layer) and then its `out_proj_w` is zeroed, so it is an identity block in the
residual stream whose other tensors are random: its out_proj_w gets a non-zero gradient at once
and the block learns (the reference zeroes every tensor, a stationary point it never leaves).

`Staged` is the runtime part the Trainer holds: which tensors are frozen, and the training step
when freezing or FF is on (the plain step of trainer.forward_backward is used otherwise, so runs
without these options are unchanged bitwise).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from . import ff as ff_mod
from . import surgery as surgery_mod
from .errors import CheckpointError, ConfigError
from .params import FlatParams, ParamSpec

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_FREEZE_RE = re.compile(r"^(none|first:\d+|indices:\d+(,\d+)*)$")


# ------------------------------------------------------------------------------------ parsing
def expansion_layout(placement: str, base: int, target: int) -> list:
    """Layer j of the expanded model = base layer layout[j], or a new layer where layout[j] is None.
    Every inconsistency is a ConfigError naming model.placement (never a silent fallback)."""
    if target < base:
        raise ConfigError(f"model.target_layers = {target} is smaller than model.base_layers = {base}; "
                          "layers are only ever added")
    n_new = target - base
    kind, _, arg = placement.partition(":")
    if kind == "append" and not arg:
        return list(range(base)) + [None] * n_new
    if kind == "prepend" and not arg:
        return [None] * n_new + list(range(base))
    if kind == "insert" and arg.isdigit():
        n = int(arg)
        if n > base:
            raise ConfigError(f"model.placement = {placement!r}: the insert position must be in [0, {base}] "
                              f"(model.base_layers = {base})")
        return list(range(n)) + [None] * n_new + list(range(n, base))
    if kind == "specific" and arg and all(s.isdigit() for s in arg.split(",")):
        idx = [int(s) for s in arg.split(",")]
        if len(set(idx)) != len(idx):
            raise ConfigError(f"model.placement = {placement!r} repeats a layer index")
        if len(idx) != n_new:
            raise ConfigError(f"model.placement = {placement!r} lists {len(idx)} new layer positions, but "
                              f"target_layers - base_layers = {target} - {base} = {n_new}")
        bad = [i for i in idx if i >= target]
        if bad:
            raise ConfigError(f"model.placement = {placement!r}: position {bad[0]} is out of range "
                              f"[0, {target}) (model.target_layers = {target})")
        it = iter(range(base))
        return [None if j in set(idx) else next(it) for j in range(target)]
    raise ConfigError(f"model.placement must be append | prepend | insert:N | specific:i,j,... "
                      f"(N, i, j non-negative integers), got {placement!r}")


def frozen_layers(freeze: str, n_layers: int) -> tuple:
    """train.freeze = none | first:N | indices:i,j,... -> sorted layer indices (ConfigError otherwise)."""
    if not _FREEZE_RE.match(freeze):
        raise ConfigError(f"train.freeze must be none | first:N | indices:i,j,... (non-negative integers), "
                          f"got {freeze!r}")
    if freeze == "none":
        return ()
    kind, _, arg = freeze.partition(":")
    if kind == "first":
        n = int(arg)
        if n > n_layers:
            raise ConfigError(f"train.freeze = {freeze!r}: the model has only {n_layers} layers")
        return tuple(range(n))
    idx = [int(s) for s in arg.split(",")]
    if len(set(idx)) != len(idx):
        raise ConfigError(f"train.freeze = {freeze!r} repeats a layer index")
    bad = [i for i in idx if i >= n_layers]
    if bad:
        raise ConfigError(f"train.freeze = {freeze!r}: layer {bad[0]} is out of range [0, {n_layers}) "
                          f"(model.target_layers = {n_layers})")
    return tuple(sorted(idx))


def layer_of(name: str):
    """'layers.3.x_proj_w' -> (3, 'x_proj_w'); other names -> (None, name)."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


# ------------------------------------------------------------------------------------ expansion
def count_layers(names) -> int:
    """Number of layers in a set of parameter names (layers.0 .. layers.{L-1} must all be present)."""
    idx = {layer_of(n)[0] for n in names} - {None}
    return max(idx) + 1 if idx else 0


def expand_state(flat: FlatParams, base: dict, layout: list, new_layer_init, rng_seed: int, init: str,
                 source: str) -> None:
    """Fill flat (the expanded model) from `base` = {"param/<name>", "adam_m/<name>", "adam_v/<name>"}
    of the base model (a checkpoint's tensors or a freshly initialised base model): base tensors are
    moved to their new layer index with their moments; new layers (layout[j] is None) are
    initialised by new_layer_init(views, j, rng, init, n_layers), get out_proj_w = 0 and zero moments."""
    target = len(layout)
    for buf, prefix in ((flat.data, "param"), (flat.m, "adam_m"), (flat.v, "adam_v")):
        views = flat.views(buf)
        for name, view in views.items():
            j, rest = layer_of(name)
            if j is not None and layout[j] is None:
                view[...] = 0.0
                continue
            src = name if j is None else f"layers.{layout[j]}.{rest}"
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
                lj, rest = layer_of(name)
                if lj == j and rest == "out_proj_w":
                    view[...] = 0.0


def _checkpoint_in(path: str) -> str:
    """model.init_from: a checkpoint (file or step directory) as it is; a run directory or its
    checkpoints/ directory: the newest step checkpoint in it."""
    from . import checkpoint as ckpt

    d = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if os.path.isdir(d) and not os.path.exists(os.path.join(d, ckpt.MANIFEST_FILE)):
        found = ckpt.find_checkpoints(d)
        if not found:
            raise ConfigError(f"model.init_from = {path!r}: no step checkpoint in {d}")
        return found[0][1]
    return path


# ------------------------------------------------------------------------------------ runtime
class Staged:
    """Freezing, FF/BP cadence and surgery for one run (built from the resolved Config)."""

    def __init__(self, cfg, model):
        m, t = cfg.model, cfg.train
        self.cfg = cfg
        self.layout = expansion_layout(m.placement, m.base_layers, m.target_layers)
        self.frozen = frozen_layers(t.freeze, m.target_layers)
        self.freeze_embedding = bool(t.freeze_embedding)
        self.ff = bool(t.ff)
        self.bp_cadence = int(t.bp_cadence)
        self.surgery = t.surgery
        self.ff_layers = [i for i in range(m.target_layers) if i not in self.frozen]
        if self.ff and not self.ff_layers:
            raise ConfigError(f"train.ff = true but train.freeze = {t.freeze!r} freezes every layer: nothing "
                              "for Forward-Forward to train")
        self.expanding = m.target_layers != m.base_layers
        self.active = bool(self.frozen or self.freeze_embedding or self.ff)
        self.bp_steps = self.ff_steps = self.conflicts = 0
        self.layer_init = getattr(model, "layer_init", None)
        # skip differentiating what is frozen (rtrainer.model.MambaLiteStack reads these two)
        if hasattr(model, "frozen_layers"):
            model.frozen_layers = frozenset(self.frozen)
            lead = 0
            while lead in self.frozen:
                lead += 1
            model.backward_stop = lead if self.freeze_embedding else 0

    # -- parameters
    def is_frozen(self, name: str) -> bool:
        j, _ = layer_of(name)
        if j is not None:
            return j in self.frozen
        return name == "embedding" and self.freeze_embedding

    def apply_freeze(self, specs: list) -> list:
        """Frozen tensors become non-trainable: no update, no decay, no moment change, not in the
        clipping norm (FlatParams.segments skips them)."""
        return [dataclasses.replace(s, trainable=False) if s.trainable and self.is_frozen(s.name) else s
                for s in specs]

    def bind(self, flat: FlatParams) -> None:
        self.flat = flat
        self._frozen_ranges = [flat.offsets[n] for n in flat.params if self.is_frozen(n)]

    def initialise(self, trainer) -> None:
        """Fresh run: the base model (from model.init_from, or freshly initialised as a
        base_layers model would be) expanded to target_layers."""
        from . import checkpoint as ckpt

        c = trainer.cfg
        m = c.model
        if not m.init_from and not self.expanding:
            trainer.model.init_params(c.run.seed, m.init)
            trainer.head.init_params(c.run.seed, m.init)
            return
        if self.layer_init is None:
            raise ConfigError(f"model.layer = {m.layer!r}: the model class has no layer_init, so it cannot be "
                              "expanded")
        if m.init_from:
            # checked here, on a fresh start only: a resumed run no longer needs its base checkpoint
            if not os.path.exists(m.init_from):
                raise ConfigError(f"model.init_from = {m.init_from!r}: no such checkpoint, step directory or run "
                                  "directory")
            source = f"model.init_from = {m.init_from!r}"
            base, _state = ckpt.load_checkpoint(_checkpoint_in(m.init_from))
            names = [k.split("/", 1)[1] for k in base if k.startswith("param/")]
            n = count_layers(names)
            if n != m.base_layers:
                raise ConfigError(f"{source} holds a {n}-layer model but model.base_layers = {m.base_layers}")
        else:
            source = "the fresh base model"
            base = self._fresh_base(trainer)
        expand_state(trainer.flat, base, self.layout, self.layer_init, c.run.seed, m.init, source)
        if self.expanding:
            self.calibrate_new_layers(trainer)

    def calibrate_new_layers(self, trainer) -> None:
        """Scale each new layer's conv_w and conv_b by 1/max|input| over one training batch (when that
        is > 1), so that the new block starts in its normal operating range.

        Why: mamba-lite has no per-block norm, and a trained model's residual stream can be large
        (the final LayerNorm does not care): in the example's 2-layer model the input of the layers
        after base layer 1 has rms 336 and max 14,000. The block's output grows like the cube of its
        input scale (u, Bt, Ct and delta are all linear in it), so a normally initialised new layer
        there puts out ~1e15, overflows to inf on some windows (inf * 0 = nan through the zero
        out_proj_w) and its first update makes the run non-finite. The max, not the rms, because
        the residual stream has outliers (max/rms = 40 there). out_proj_w is still 0, so the
        model's function does not change. The batch is read without moving the data stream."""
        model = trainer.model
        new = [j for j, b in enumerate(self.layout) if b is None]
        p = trainer.flat.params
        new = [j for j in new if f"layers.{j}.conv_w" in p and f"layers.{j}.norm_w" not in p]
        if not new:
            return
        stream = trainer.data.train
        st = stream.state()
        ids, _ = stream.next_batch()
        stream.set_state(st)
        model.forward(ids)
        if not hasattr(model, "r"):   # r[j]: the input of layer j (rtrainer.model.MambaLiteStack)
            return
        for j in new:
            scale = float(np.max(np.abs(model.r[j])))
            if scale > 1.0:
                for name in ("conv_w", "conv_b"):
                    v = p[f"layers.{j}.{name}"]
                    v[...] = (v.astype(np.float64) / scale).astype(np.float32)

    def _fresh_base(self, trainer) -> dict:
        c = trainer.cfg
        V = trainer.data.vocab_size
        base_cfg = dataclasses.replace(c, model=dataclasses.replace(c.model, target_layers=c.model.base_layers))
        trainer.cfg = base_cfg
        try:
            base_model = trainer.build_model(V)
        finally:
            trainer.cfg = c
        base_flat = FlatParams(base_model.param_specs() + trainer.head.param_specs())
        base_model.bind(base_flat.params, base_flat.grads)
        trainer.head.bind(base_flat.params, base_flat.grads)
        try:
            base_model.init_params(c.run.seed, c.model.init)
            trainer.head.init_params(c.run.seed, c.model.init)
        finally:
            trainer.head.bind(trainer.flat.params, trainer.flat.grads)
        return base_flat.state_tensors()

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

    # -- the step
    def _forward_backward(self, trainer, ids, targets, dz) -> float:
        model, head, flat = trainer.model, trainer.head, trainer.flat
        flat.zero_grad()
        z = model.forward(ids)
        loss = head.forward(z, targets)
        dz.fill(0.0)
        head.backward(dz)
        model.backward(dz, embedding_grad=not self.freeze_embedding)
        for a, b in self._frozen_ranges:   # frozen layers' scan/conv kernels still accumulate here
            flat.grad[a:b] = 0.0
        return loss

    def _adam(self, trainer, loss, lr):
        opt = trainer.optimizer
        gnorm = opt.grad_norm()
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        clipped = False
        if finite:
            scale = opt.clip_scale(gnorm)
            clipped = scale < 1.0
            opt.step(lr, scale)
        return gnorm, clipped, finite

    def train_step(self, trainer, ids, targets, lr, dz):
        """One step at trainer.step (0-based). Returns (loss, grad_norm, clipped, finite, extra):
        loss is the HPN loss (nan on FF-only steps), extra the FF metrics (empty without FF)."""
        if not self.ff:
            loss = self._forward_backward(trainer, ids, targets, dz)
            gnorm, clipped, finite = self._adam(trainer, loss, lr)
            return loss, gnorm, clipped, finite, {}
        t = self.cfg.train
        bp = (trainer.step + 1) % self.bp_cadence == 0
        if bp:
            loss = self._forward_backward(trainer, ids, targets, dz)
        else:
            trainer.model.forward(ids)
            loss = math.nan
        model, p, g = trainer.model, trainer.flat.params, trainer.flat.grads
        ff_losses, ff_grads = [], []
        for i in self.ff_layers:
            h_pos, h_neg = ff_mod.ff_vectors(model.r[i])
            L, grad = ff_mod.ff_loss_grad(p[f"layers.{i}.D_skip"], h_pos, h_neg, t.ff_margin)
            ff_losses.append(L)
            ff_grads.append(grad)
        ff_loss = float(np.mean(ff_losses))
        extra = {"ff_loss": ff_loss, "bp_applied": bp, "conflict_layers": 0, "surgery": self.surgery}
        if not bp:
            gnorm = math.sqrt(sum(float(gr @ gr) for gr in ff_grads))
            finite = math.isfinite(ff_loss) and math.isfinite(gnorm)
            if finite:   # plain SGD on D_skip, no Adam, no decay, no schedule (reference §3)
                for i, gr in zip(self.ff_layers, ff_grads):
                    th = p[f"layers.{i}.D_skip"]
                    th[...] = (th.astype(np.float64) - t.ff_lr * gr).astype(np.float32)
                self.ff_steps += 1
            return loss, gnorm, False, finite, extra
        # the FF term enters with the constant weight ff_lr / optim.lr (the reference divides by the
        # SCHEDULED lr, so its FF share grows 10x along a cosine schedule: reference §9.9)
        w = t.ff_lr / self.cfg.optim.lr
        conflicts = 0
        for i, f in zip(self.ff_layers, ff_grads):
            gv = g[f"layers.{i}.D_skip"]
            b = gv.astype(np.float64)
            f2, conflict = surgery_mod.combine(self.surgery, f, b, t.surgery_epsilon, t.gradnorm_alpha,
                                               t.cagrad_lambda)
            conflicts += conflict
            gv[...] = (b + w * f2).astype(np.float32)
        extra["conflict_layers"] = conflicts
        gnorm, clipped, finite = self._adam(trainer, loss if math.isfinite(ff_loss) else math.nan, lr)
        if finite:
            self.bp_steps += 1
            self.conflicts += conflicts
        return loss, gnorm, clipped, finite, extra
