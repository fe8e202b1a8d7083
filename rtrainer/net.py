"""`Net`: the sequence model, its head and the flat parameter buffer, built and bound once.

    net = Net.build(cfg, vocab_size, n_threads=2)     # from a Config (model, head, train.freeze)
    net.init(seed, "mamba")                           # or net.load_tensors(...) / Net.load(path)
    z = net.forward(ids)                              # ids (B, T) int64 -> z (B*T, D) float32
    loss = net.loss(ids, targets)                     # mean loss over the scored tokens
    pred = net.predict(ids)                           # (B, T) predicted next-token ids
    r = net.evaluate(batches)                         # {"loss": ..., "acc": ...}, no gradients

    net = Net.load("runs/x/checkpoints/step-200")     # or a run directory: its newest valid checkpoint
    net = Net.load("runs/x", which="best")            # or its best one; or an export (rtrainer export)

The training step itself is rtrainer.step.train_step(net, optimizer, ...). Frozen tensors (train.freeze,
train.freeze_embedding) are non-trainable ranges of the flat buffer: no update, no decay, no moment
change, not in the clipping norm; both layer kinds skip their weight-gradient products and the
backward pass stops below the last trainable layer when the embedding is frozen too.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import runstate
from .errors import CheckpointError, ConfigError
from .grammar import frozen_layers
from .heads import HPNHead, SoftmaxHead
from .model import MambaLiteStack, MambaStack, resolve_dt_rank
from .optim import AdamW
from .params import FlatParams

EXPORT_KIND = "export"     # the "kind" in the state of an export's model.safetensors (rtrainer export)


@dataclasses.dataclass(frozen=True)
class Freeze:
    """What is not trained: layer indices and/or the embedding (train.freeze, train.freeze_embedding)."""

    layers: tuple = ()
    embedding: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Freeze":
        return cls(frozen_layers(cfg.train.freeze, cfg.model.target_layers), bool(cfg.train.freeze_embedding))

    def __bool__(self) -> bool:
        return bool(self.layers or self.embedding)


def build_model(model_cfg, vocab_size: int, n_threads: int = 1):
    """The sequence model of a [model] section (MambaLiteStack or MambaStack, by model.layer)."""
    m = model_cfg
    R = resolve_dt_rank(m.layer, m.d_model, m.dt_rank)
    if m.layer == "mamba":
        return MambaStack(vocab_size, m.d_model, m.d_state, m.d_conv, R, m.target_layers, expand=m.expand,
                          scan_chunk=m.scan_chunk, n_threads=n_threads, selective=m.selective)
    return MambaLiteStack(vocab_size, m.d_model, m.d_state, m.d_conv, R, m.target_layers,
                          scan_chunk=m.scan_chunk, n_threads=n_threads, selective=m.selective)


def build_head(cfg, vocab_size: int, n_threads: int = 1):
    """The head of a [head] section (HPNHead or SoftmaxHead, by head.kind)."""
    h = cfg.head
    if h.kind == "softmax":
        return SoftmaxHead(vocab_size, cfg.model.d_model, bias=h.bias, n_threads=n_threads)
    return HPNHead(vocab_size, cfg.model.d_model, normalize=h.normalize_prototypes,
                   learnable=h.learnable_prototypes, n_threads=n_threads,
                   prototype_init=h.prototype_init, separation=h.prototype_separation)


class Net:
    """A model and a head bound to one FlatParams. Build it with Net.build or Net.load (or
    Net(model, head) around pieces you made yourself)."""

    def __init__(self, model, head, freeze: Freeze = Freeze(), cfg=None):
        self.model, self.head, self.cfg = model, head, cfg
        self.freeze = freeze
        specs = model.param_specs() + head.param_specs()
        if freeze:
            specs = [dataclasses.replace(s, trainable=False) if s.trainable and self.is_frozen(s.name) else s
                     for s in specs]
        self.flat = FlatParams(specs)
        model.bind(self.flat.params, self.flat.grads)
        head.bind(self.flat.params, self.flat.grads)
        if freeze:
            model.freeze(freeze.layers, freeze.embedding)
        # the frozen tensors' flat ranges: some kernels (scan, conv) accumulate into them anyway
        self.frozen_ranges = [self.flat.offsets[n] for n in self.flat.params if self.is_frozen(n)]
        self._dz = None
        self.n_threads = 1
        self.state = {}     # the state stored with the checkpoint this Net was loaded from
        self.source = None

    @classmethod
    def build(cls, cfg, vocab_size: int | None = None, *, n_threads: int = 1, freeze: Freeze | None = None,
              model=None, head=None) -> "Net":
        """From a Config, or a dict {section: {key: value}} validated like a run file (data keys
        not required): model.* and head.* give the pieces, train.freeze / train.freeze_embedding
        the frozen tensors (unless `freeze` is given). vocab_size defaults to model.vocab_size.
        `model` / `head` replace the built-in ones (Trainer.build_model / build_head of a subclass)."""
        if isinstance(cfg, Mapping):
            from . import config as config_mod

            cfg = config_mod.config_from_dict(cfg, source="<dict>", require_data=False)
        if vocab_size is None:
            vocab_size = int(cfg.model.vocab_size)
            if vocab_size <= 0:
                raise ConfigError("model.vocab_size: give a vocabulary size (> 0) to build a Net without data")
        if freeze is None:
            freeze = Freeze.from_config(cfg)
        model = build_model(cfg.model, vocab_size, n_threads) if model is None else model
        head = build_head(cfg, vocab_size, n_threads) if head is None else head
        net = cls(model, head, freeze, cfg)
        net.n_threads = n_threads
        return net

    def build_optimizer(self, n_threads: int | None = None) -> AdamW:
        """The AdamW of the config's [optim] section over this Net's trainable tensors (the moments
        live in the Net's flat buffer). For a Net from Net.load it continues the checkpoint's update
        count, so the bias correction goes on where it stopped."""
        o = self.cfg.optim
        opt = AdamW(self.flat, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                    weight_decay_scope=o.weight_decay_scope, grad_clip=o.grad_clip,
                    n_threads=self.n_threads if n_threads is None else n_threads)
        opt.load_state({"updates": int(self.state.get("optimizer_updates", 0))})
        return opt

    def save(self, path, optimizer=None, *, step: int = 0) -> str:
        """Write this Net (parameters, AdamW moments, and the configuration that rebuilds it) as one
        checkpoint file, atomically; Net.load(path) reads it back. `optimizer` records its update
        count. Returns the path."""
        from . import config as config_mod

        d = config_mod.config_to_dict(self.cfg)
        d["model"]["vocab_size"] = int(self.model.V)
        state = {"schema": runstate.SCHEMA_VERSION, "step": int(step),
                 "optimizer_updates": int(optimizer.state()["updates"]) if optimizer is not None else 0,
                 "config": d}
        ckpt.save_checkpoint(str(path), self.tensors(), state)
        return str(path)

    @classmethod
    def load(cls, path, *, n_threads: int = 1, which: str = "latest") -> "Net":
        """A Net with the parameters (and AdamW moments) of a checkpoint: a step directory
        `checkpoints/step-N`, a checkpoint file, a run directory (its newest checkpoint that
        verifies, or with which="best" its best one), or an export directory (`rtrainer export`:
        the parameters only, the moments stay zero). The architecture comes from the config stored
        with the tensors."""
        from . import config as config_mod

        p, tensors, state = runstate.find_model(Path(path), which)
        saved = state.get("config")
        if not isinstance(saved, dict) or "model" not in saved:
            raise CheckpointError(f"{p}: the checkpoint holds no run configuration, so the model cannot be built")
        try:
            cfg = config_mod.config_from_dict(saved, source=str(p), require_data=False)
        except ConfigError as e:
            raise CheckpointError(f"{p}: the stored configuration is not valid: {e}") from None
        V = int(cfg.model.vocab_size)
        if V <= 0:
            raise CheckpointError(f"{p}: the stored configuration has no vocabulary size")
        net = cls.build(cfg, V, n_threads=n_threads)
        if state.get("kind") == EXPORT_KIND:
            net.flat.load_state_tensors({f"param/{k}": v for k, v in tensors.items()}, source=str(p), moments=False)
        else:
            net.load_tensors(tensors, source=str(p))
        net.source = p
        net.state = state
        return net

    # ------------------------------------------------------------------ parameters
    def is_frozen(self, name: str) -> bool:
        j = self.model.layer_of(name)
        if j is not None:
            return j in self.freeze.layers
        return name == "embedding" and self.freeze.embedding

    def init(self, seed: int, init: str) -> None:
        """Fill every tensor as a fresh run does (model.init, run.seed)."""
        self.model.init_params(seed, init)
        self.head.init_params(seed, init)

    def tensors(self) -> dict:
        """param/<name>, adam_m/<name>, adam_v/<name>: what a checkpoint stores (views, not copies)."""
        return self.flat.state_tensors()

    def load_tensors(self, tensors: dict, source: str = "checkpoint") -> None:
        self.flat.load_state_tensors(tensors, source=source)

    @property
    def params(self) -> dict:
        return self.flat.params

    @property
    def grads(self) -> dict:
        return self.flat.grads

    # ------------------------------------------------------------------ compute
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """ids (B, T) int64 -> z (B*T, D) float32 (a view of the model's workspace)."""
        return self.model.forward(ids)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        """Mean head loss over the scored tokens (targets = -1 are not scored); no gradients."""
        return float(self.head.forward(self.model.forward(ids), targets))

    def predict(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) int64: the predicted next token at every position."""
        return self.head.predict(self.model.forward(ids)).reshape(ids.shape)

    def forward_backward(self, ids: np.ndarray, targets: np.ndarray) -> float:
        """Zero the gradients, forward, loss, backward: returns the loss and leaves the gradients of
        the trainable tensors in flat.grad_buf (frozen ranges zeroed)."""
        self.flat.zero_grad()
        z = self.model.forward(ids)
        loss = self.head.forward(z, targets)
        dz = self._dz
        if dz is None or dz.shape != z.shape:
            dz = self._dz = np.empty(z.shape, np.float32)
        dz.fill(0.0)
        self.head.backward(dz)
        self.model.backward(dz)
        for a, b in self.frozen_ranges:
            self.flat.grad_buf[a:b] = 0.0
        return loss

    def evaluate(self, batches) -> dict:
        """{"loss", "acc"}: mean loss and accuracy over the scored tokens (targets = -1 are ignored)
        of an iterable of (ids, targets) batches, weighted by scored tokens; no gradients."""
        n_tok, loss_sum, correct = 0, 0.0, 0
        for ids, targets in batches:
            z = self.model.forward(ids)
            loss = self.head.forward(z, targets)
            pred = self.head.predict(z)
            t = targets.reshape(-1)
            n = int(np.count_nonzero(t != -1))
            loss_sum += float(loss) * n
            correct += int(np.count_nonzero(pred == t))    # pred is never -1
            n_tok += n
        return {"loss": loss_sum / max(n_tok, 1), "acc": correct / max(n_tok, 1)}


def save(net: Net, path, optimizer=None, *, step: int = 0) -> str:
    """rtrainer.save(net, path, optimizer): Net.save; read it back with rtrainer.load(path)."""
    return net.save(path, optimizer, step=step)


def load(path, *, n_threads: int = 1, which: str = "latest") -> Net:
    """rtrainer.load(path): Net.load (a checkpoint file, a step directory, a run directory or an export)."""
    return Net.load(path, n_threads=n_threads, which=which)
