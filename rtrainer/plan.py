"""The run plan: what a run will need, computed before anything is allocated or written.

:func:`make_plan` turns a configuration (and the vocabulary size, once known) into parameter
counts, the memory of every large buffer the run allocates, the FLOPs of one training step and the
tokens per epoch. :func:`require_fits` refuses a plan whose memory does not fit what the machine
has available (``psutil.virtual_memory().available``), with a :class:`~rtrainer.errors.ConfigError`
(exit 2) that names the largest items and the run-file keys that drive them. ``rtrainer run x.toml
--dry-run`` prints the plan (:func:`format_plan`) with an estimated time from a short timed step
on a small synthetic batch (:func:`timed_step`), and writes nothing.

Memory items (bytes; float32 = 4, int64 = 8; P = elements of the flat parameter buffer):

    parameters, gradients       4P each (one flat buffer each, every tensor 64-byte aligned)
    adamw_moments               8P (m and v)
    activations                 the model's workspace at (batch_size, seq_len), or at the longest
                                eval.extra_lengths if larger: exactly what the layer stack's
                                ``activation_bytes()`` reports once it has run
    workspace                   scratch outside activation_bytes(): dloss/dz (B*T, D), the
                                mamba-lite weight-gradient buffer, the head's buffers (the softmax
                                head's (B*T, V) logits and (V, D) gradient, the prediction blocks)
    data                        the training batch (ids, targets, the window read) and the
                                prefetch queue (data.prefetch_buffer batches with workers)
    validation                  the fixed validation sets (window positions, or the generated
                                batches of a synthetic task) at every length
    checkpoint                  the serialised checkpoint held in memory while it is written or
                                read (parameters and both moments: 12P)

``RTRAINER_MEMORY_CHECK=off`` in the environment skips the refusal (for a machine where the
available memory is known to be misreported). The margin: a run is refused when
``total * (1 + MARGIN) + MARGIN_BYTES`` exceeds the available memory. The items above are the
large allocations; the margin covers what is not itemised (numpy temporaries of the matrix
products, the interpreter, the page cache of memory-mapped data).
"""
from __future__ import annotations

import math
import time

from .errors import ConfigError, DataError

__all__ = ["MARGIN", "MARGIN_BYTES", "make_plan", "require_fits", "format_plan", "timed_step",
           "infer_vocab", "available_memory", "dry_run", "activation_bytes"]

MARGIN = 0.10
MARGIN_BYTES = 128 << 20
_F32, _I64 = 4, 8
_ROW_BYTES = 128            # one validation window position: a (shard, start) tuple in a list
_PREDICT_BLOCK = 1024       # rows per block of the heads' predict()

# run-file keys that drive each memory item (named when a run does not fit)
_DRIVERS = {
    "parameters": ("model.vocab_size", "model.d_model", "model.target_layers"),
    "gradients": ("model.vocab_size", "model.d_model", "model.target_layers"),
    "adamw_moments": ("model.vocab_size", "model.d_model", "model.target_layers"),
    "activations": ("train.batch_size", "train.seq_len", "model.d_model", "model.target_layers"),
    "workspace": ("train.batch_size", "train.seq_len", "model.d_model", "model.vocab_size"),
    "data": ("train.batch_size", "train.seq_len", "data.prefetch_buffer"),
    "validation": ("eval.eval_batches", "train.batch_size", "eval.extra_lengths"),
    "checkpoint": ("model.vocab_size", "model.d_model", "model.target_layers"),
}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} PB"  # pragma: no cover


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


# ------------------------------------------------------------------------------------------ pieces
def _dt_rank(m) -> int:
    from .model import resolve_dt_rank

    return resolve_dt_rank(m.layer, m.d_model, m.dt_rank) if m.selective else 0


def activation_bytes(m, B: int, T: int) -> int:
    """Bytes of the layer stack's activation workspace at (B, T): the same sum as the stacks'
    ``activation_bytes()`` after a forward pass at that shape (tests hold the two equal)."""
    D, N, L, R = m.d_model, m.d_state, m.target_layers, _dt_rank(m)
    BT, W = B * T, 2 * m.d_state + _dt_rank(m)
    nc = -(-T // m.scan_chunk)
    if m.layer == "mamba":
        C = m.expand * D
        n = ((L + 1) * BT * D + L * BT + L * BT * D + 4 * L * BT * C + L * BT * W
             + (L if m.selective else 1) * BT * C + L * BT * C + L * B * nc * C * N
             + BT * D + BT + 5 * BT * C + 3 * BT * D + BT * W + max(C * D, C * W, R * C))
        return n * _F32
    n = ((L + 1) * BT * D + 2 * L * BT * D + L * BT * W + (L if m.selective else 1) * BT * D
         + L * BT * D + L * B * nc * D * N + BT * D + BT + 5 * BT * D + BT * W)
    return n * _F32


def _flat_size(specs) -> tuple[int, int]:
    """(elements of the flat buffer with its 16-float alignment, trainable elements)."""
    off, trainable = 0, 0
    for s in specs:
        off = (off + 15) // 16 * 16 + s.size
        trainable += s.size if getattr(s, "trainable", True) else 0
    return off, trainable


def _specs(cfg, V: int, model=None, head=None):
    if model is None or head is None:
        from .heads import HPNHead, SoftmaxHead
        from .model import MambaLiteStack, MambaStack

        m, h = cfg.model, cfg.head
        R = _dt_rank(m) or 1
        if model is None:
            model = (MambaStack(V, m.d_model, m.d_state, m.d_conv, R, m.target_layers, expand=m.expand,
                                scan_chunk=m.scan_chunk, selective=m.selective) if m.layer == "mamba" else
                     MambaLiteStack(V, m.d_model, m.d_state, m.d_conv, R, m.target_layers,
                                    scan_chunk=m.scan_chunk, selective=m.selective))
        if head is None:
            head = (SoftmaxHead(V, m.d_model, bias=h.bias) if h.kind == "softmax" else
                    HPNHead(V, m.d_model, learnable=h.learnable_prototypes))
    return model.param_specs() + head.param_specs()


def step_flops(cfg, V: int, B: int | None = None, T: int | None = None) -> dict:
    """FLOPs of one training step (rtrainer.flops); the softmax head's products replace the HPN
    loss terms. {"forward", "backward", "optimizer", "total"}."""
    from . import flops

    m, h = cfg.model, cfg.head
    B = cfg.train.batch_size if B is None else B
    T = cfg.train.seq_len if T is None else T
    R = _dt_rank(m)
    learn = h.kind == "hpn" and h.learnable_prototypes
    if m.layer == "mamba":
        f = flops.mamba_step_flops(B, T, m.d_model, m.d_state, m.d_conv, R, m.target_layers, V, m.expand,
                                   learnable_prototypes=learn)
    else:
        f = flops.step_flops(B, T, m.d_model, m.d_state, m.d_conv, R, m.target_layers, V,
                             learnable_prototypes=learn)
    fwd, bwd, opt = f["forward"], f["backward"], f["optimizer"]
    if h.kind == "softmax":
        BT, D = B * T, m.d_model
        hpn_f, hpn_b = f["components"].get("fwd.hpn", 0), f["components"].get("bwd.hpn", 0)
        # logits z @ W^T (2 BT D V) + softmax/cross-entropy (~5 BT V); backward dz and dW (4 BT D V)
        fwd += 2 * BT * D * V + 5 * BT * V - hpn_f
        bwd += 4 * BT * D * V + 2 * BT * V - hpn_b
        opt += 16 * (V * D + (V if h.bias else 0))
    return {"forward": fwd, "backward": bwd, "optimizer": opt, "total": fwd + bwd + opt}


# ------------------------------------------------------------------------------------------ the plan
def make_plan(cfg, vocab_size: int | None = None, *, model=None, head=None, tokens_per_epoch: int | None = None,
              vocab_source: str = "") -> dict:
    """The plan of a run of ``cfg`` with vocabulary ``vocab_size`` (None: not known yet, the
    items that depend on it are counted at the smallest vocabulary the run can have)."""
    c, m = cfg, cfg.model
    B, T = c.train.batch_size, c.train.seq_len
    if vocab_size is None:
        vocab_size = max(m.vocab_size, c.data.task_vocab if c.data.task else 1, 1)
    V = int(vocab_size)
    P, trainable = _flat_size(_specs(cfg, V, model, head))
    lengths = [T] + [L for L in c.eval.extra_lengths if c.eval.val_every > 0]
    acts = max(activation_bytes(m, B, L) for L in lengths)
    Lmax = max(lengths)
    BTm = B * Lmax
    ws = BTm * m.d_model * _F32                                   # dloss/dz
    if m.layer != "mamba":
        ws += m.d_model * max(m.d_model, 2 * m.d_state + _dt_rank(m)) * _F32   # weight-gradient scratch
    if c.head.kind == "softmax":
        ws += BTm * V * _F32 + BTm * m.d_model * _F32 + V * m.d_model * _F32
    else:
        ws += BTm * (_F32 + _I64) + V * m.d_model * _F32            # cos, targets; normalised prototypes
    ws += min(_PREDICT_BLOCK, BTm) * V * _F32 + BTm * _I64          # predict(): a block of scores, the ids
    batch = 2 * B * T * _I64 + B * (T + 1) * _I64
    data = batch
    if c.data.prefetch_workers > 0 and not c.data.task:
        data += (c.data.prefetch_buffer + 1) * 2 * B * T * _I64 + c.data.prefetch_workers * B * (T + 1) * _I64
    val = 0
    if c.eval.val_every > 0:
        for L in lengths:
            if c.data.task:
                val += c.eval.eval_batches * 2 * B * L * _I64
            else:
                val += c.eval.eval_batches * B * _ROW_BYTES
        val += 3 * B * (Lmax + 1) * _I64                            # one validation batch being read
    ckpt = (16 if c.train.fail_on_non_finite else 12) * P
    memory = {"parameters": 4 * P, "gradients": 4 * P, "adamw_moments": 8 * P, "activations": acts,
              "workspace": ws, "data": data, "validation": val, "checkpoint": ckpt}
    memory["total"] = sum(memory.values())
    f = step_flops(cfg, V)
    tokens_per_step = B * T
    plan = {
        "parameters": P, "trainable_parameters": trainable, "vocab_size": V, "vocab_source": vocab_source,
        "memory": memory, "flops_per_step": f, "tokens_per_step": tokens_per_step,
        "tokens_per_epoch": tokens_per_epoch, "steps": c.train.steps,
        "steps_per_epoch": (tokens_per_epoch / tokens_per_step) if tokens_per_epoch else None,
    }
    return plan


def _need(total: int) -> int:
    return int(total * (1 + MARGIN)) + MARGIN_BYTES


def require_fits(plan: dict, cfg, available: int | None = None) -> None:
    """ConfigError (exit 2) when the plan's memory (with the margin) exceeds what is available,
    naming the largest items and their keys."""
    import os

    if os.environ.get("RTRAINER_MEMORY_CHECK", "").strip().lower() in ("0", "off", "no", "false"):
        return
    avail = available_memory() if available is None else int(available)
    mem = plan["memory"]
    if _need(mem["total"]) <= avail:
        return
    groups: dict[tuple, list] = {}        # items driven by the same keys are reported together
    for k, v in mem.items():
        if k != "total":
            g = groups.setdefault(_DRIVERS[k], [0, []])
            g[0] += v
            g[1].append(k.replace("_", " "))
    parts = []
    for drivers, (v, names) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:3]:
        if v < 0.1 * mem["total"]:
            break
        keys = ", ".join(f"{key} = {_value(cfg, key)}" for key in drivers)
        parts.append(f"{' + '.join(names)} {_human(v)} ({keys})")
    raise ConfigError(
        f"the run does not fit in memory: it needs about {_human(mem['total'])} ({'; '.join(parts)}) plus a "
        f"{MARGIN:.0%} margin, but {_human(avail)} is available; reduce the keys named "
        "(`rtrainer run CONFIG --dry-run` prints the whole plan)")


def _value(cfg, key: str):
    section, name = key.split(".")
    v = getattr(getattr(cfg, section), name)
    if key == "model.vocab_size" and v == 0:
        return "0 (from the data)"
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------------------ vocabulary
def infer_vocab(shards, limit: int | None = None) -> int:
    """model.vocab_size = 0: the largest token id of the shards + 1, refused (DataError naming the
    shard file and the offset of the first id at or above the limit) when it exceeds the limit of
    model.vocab_size: one stray huge id must not size the embedding."""
    from . import shards as shards_mod
    from .config import MAX_VOCAB

    limit = MAX_VOCAB if limit is None else int(limit)
    V = max(shards_mod.shards_max_token(shards) + 1, 1)   # all ids negative: the range check names one
    if V <= limit:
        return V
    for s in shards:
        if s.max_id is not None and s.max_id < limit and s.lo == 0 and s.hi == s.n_file:
            continue
        for off, c in s.chunks():
            import numpy as np

            bad = np.flatnonzero(c >= limit)
            if bad.size:
                i = int(bad[0])
                raise DataError(
                    f"{s.name}: token id {int(c[i])} at offset {off + i} would make the inferred vocabulary "
                    f"{int(c[i]) + 1:,} ids, more than the limit of {limit:,} (model.vocab_size = 0 infers it from "
                    "the largest id); fix the data or set model.vocab_size")
    raise DataError(f"the inferred vocabulary of {V:,} ids is more than the limit of {limit:,}; set "
                    "model.vocab_size")  # pragma: no cover - the scan above finds the id


# ------------------------------------------------------------------------------------------ timing
def timed_step(trainer, V: int, budget: float = 1e9, repeats: int = 2) -> dict:
    """Seconds of one training step (forward, loss, backward, AdamW) of the trainer's model and
    head on a synthetic batch, after a warm-up step: the run's own (batch_size, seq_len) when its
    step is at most ``budget`` FLOPs, else a smaller batch (halved, then shorter sequences), the
    time scaled to the run's batch by FLOPs (an estimate: small batches run less efficiently).
    Allocates the parameters (the plan has checked they fit), writes no file."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from .params import FlatParams

    c = trainer.cfg
    b, t = c.train.batch_size, c.train.seq_len
    while step_flops(c, V, b, t)["total"] > budget and (b > 1 or t > 16):
        if b > 1:
            b = (b + 1) // 2
        else:
            t = max(16, (t + 1) // 2)
    model, head = trainer.build_model(V), trainer.build_head(V)
    flat = FlatParams(model.param_specs() + head.param_specs())
    model.bind(flat.params, flat.grads)
    head.bind(flat.params, flat.grads)
    model.init_params(c.run.seed, c.model.init)
    rng = np.random.default_rng([c.run.seed, 9])
    for name, arr in flat.params.items():
        if name.startswith("head."):
            arr[...] = rng.normal(0.0, 0.02, size=arr.shape)
    opt = trainer.build_optimizer(flat)
    ids = rng.integers(0, V, size=(b, t), dtype=np.int64)
    targets = rng.integers(0, V, size=(b, t), dtype=np.int64)
    dz = np.empty((b * t, c.model.d_model), np.float32)
    best = math.inf
    with threadpool_limits(limits=trainer.n_threads, user_api="blas"):
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            flat.zero_grad()
            z = model.forward(ids)
            head.forward(z, targets)
            dz.fill(0.0)
            head.backward(dz)
            model.backward(dz)
            gn = opt.grad_norm()
            opt.step(1e-6, opt.clip_scale(gn))
            if i:
                best = min(best, time.perf_counter() - t0)
    small = step_flops(c, V, b, t)["total"]
    full = step_flops(c, V)["total"]
    return {"batch": b, "seq_len": t, "seconds_small": best, "seconds_per_step": best * full / max(small, 1)}


# ------------------------------------------------------------------------------------------ output
def format_plan(plan: dict, cfg, timing: dict | None = None, available: int | None = None) -> str:
    m, mem, f = cfg.model, plan["memory"], plan["flops_per_step"]
    V = plan["vocab_size"]
    lines = [
        f"model       {m.layer}, {m.target_layers} layers, d_model {m.d_model}, d_state {m.d_state}, "
        f"V {V}{' (' + plan['vocab_source'] + ')' if plan['vocab_source'] else ''}, head {cfg.head.kind}",
        f"parameters  {plan['parameters']:,} ({plan['trainable_parameters']:,} trainable)",
        "memory      " + ", ".join(f"{k.replace('_', ' ')} {_human(v)}" for k, v in mem.items() if k != "total"),
        f"            total about {_human(mem['total'])}"
        + (f" of {_human(available)} available (refused above "
           f"{_human(max(available - MARGIN_BYTES, 0) / (1 + MARGIN))})" if available is not None else ""),
        f"flops/step  {f['total'] / 1e9:,.3f} GFLOP (forward {f['forward'] / 1e9:,.3f}, backward "
        f"{f['backward'] / 1e9:,.3f}, optimizer {f['optimizer'] / 1e9:,.3f})",
    ]
    tpe = plan["tokens_per_epoch"]
    if tpe:
        lines.append(f"tokens      {plan['tokens_per_step']:,} per step, {tpe:,} per epoch "
                     f"({plan['steps_per_epoch']:,.1f} steps per epoch; {plan['steps']:,} steps = "
                     f"{plan['steps'] / plan['steps_per_epoch']:,.2f} epochs)")
    else:
        lines.append(f"tokens      {plan['tokens_per_step']:,} per step (synthetic task: fresh batches, no epochs)")
    if timing is not None:
        s = timing["seconds_per_step"]
        total = s * plan["steps"]
        lines.append(f"estimate    {s:.4g} s/step (a timed step at batch {timing['batch']} x {timing['seq_len']}, "
                     f"scaled by FLOPs), {_duration(total)} for {plan['steps']:,} steps, without validation")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"about {s:.0f} s"
    if s < 7200:
        return f"about {s / 60:.0f} min"
    return f"about {s / 3600:.1f} h"


def dry_run(trainer, out=None) -> dict:
    """``rtrainer run --dry-run``: check the configuration and the data, compute and print the plan
    and a timed estimate; writes nothing under run.out_dir. Returns the plan."""
    from .console import say

    out = out or say
    cfg = trainer.cfg
    avail = available_memory()
    require_fits(make_plan(cfg), cfg, avail)           # what is known before the data is read
    data = trainer.build_data()
    try:
        V = int(data.vocab_size)
        tpe = None
        if hasattr(data.train, "tokens_per_epoch"):
            tpe = int(data.train.tokens_per_epoch())
        src = "" if cfg.model.vocab_size or cfg.data.task else \
            "from data.tokenizer" if cfg.data.tokenizer else "from the data"
        plan = make_plan(cfg, V, tokens_per_epoch=tpe, vocab_source=src)
        require_fits(plan, cfg, avail)
        timing = timed_step(trainer, V)
    finally:
        for s in (data.train, data.val, *getattr(data, "extra_val", {}).values()):
            if hasattr(s, "close"):
                s.close()
    plan["timing"] = timing
    out(f"run plan (dry run, nothing written; run.out_dir = {cfg.run.out_dir})")
    out(format_plan(plan, cfg, timing, avail))
    return plan


# ------------------------------------------------------------------------------------------ outputs
_OUTPUT_FILES = ("config.toml", "metrics.jsonl", "summary.json", "run_state.json", ".lock")


def check_outputs(out_dir, probe: bool = True) -> None:
    """Every path the run writes is checked before anything is: run.out_dir and checkpoints/ are
    directories (or can be created) where a file can be created, and the files that a run replaces
    or appends to are writable. ConfigError (exit 2) when a path is a file where a directory belongs
    (or the reverse), RunIOError (exit 5) when it cannot be written (read-only, permissions).
    ``probe`` creates and removes one empty file in each existing directory (the only check that
    holds for every file system and user); without it, only access(2) is asked."""
    import os
    from pathlib import Path

    from .errors import RunIOError

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run.out_dir {out_dir} is a file, not a directory; set run.out_dir to a directory")
    if not out_dir.exists():
        parent = out_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"run.out_dir {out_dir} cannot be created: {parent} is a file, not a directory")
        _writable_dir(parent, f"cannot create run.out_dir {out_dir}", probe)
        return
    _writable_dir(out_dir, "cannot write run.out_dir", probe)
    if ckpt_dir.exists():
        if not ckpt_dir.is_dir():
            raise ConfigError(f"{ckpt_dir} is a file, not a directory (the run keeps its checkpoints there); "
                              "move it away or set another run.out_dir")
        _writable_dir(ckpt_dir, "cannot write the checkpoint directory", probe)
        best = ckpt_dir / "best.json"
        if best.exists() and (best.is_dir() or not os.access(best, os.W_OK)):
            raise RunIOError(f"cannot replace {best}: it is not a writable file")
    for name in _OUTPUT_FILES:
        p = out_dir / name
        if p.is_dir():
            raise ConfigError(f"{p} is a directory, but the run writes a file there; move it away or set another "
                              "run.out_dir")
        if p.exists() and not os.access(p, os.W_OK):
            raise RunIOError(f"cannot write {p}: permission denied or read-only")


def _writable_dir(d, what: str, probe: bool) -> None:
    import errno
    import os
    import tempfile

    from .errors import RunIOError

    if not os.access(d, os.W_OK | os.X_OK):
        raise RunIOError(f"{what}: {d} is not writable (read-only file system or permission denied)")
    if not probe:
        return
    try:
        fd, p = tempfile.mkstemp(prefix=".rtrainer-probe-", dir=d)
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno, str(e))
        raise RunIOError(f"{what}: cannot create a file in {d} ({reason})") from None
    os.close(fd)
    try:
        os.unlink(p)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------ surprises
def surprises(cfg, n_threads: int) -> list[tuple[str, str, dict]]:
    """Settings that work but are probably not what the user meant: (event, message, fields)."""
    from .threads import available_cores

    out = []
    w, s = cfg.schedule.warmup_steps, cfg.train.steps
    if w >= s:
        out.append(("warmup_longer_than_run",
                    f"schedule.warmup_steps = {w} is not shorter than train.steps = {s}: the learning rate never "
                    f"reaches optim.lr = {cfg.optim.lr:g} before the run ends (it peaks at {cfg.optim.lr * s / w:.3g})",
                    {"warmup_steps": w, "steps": s}))
    cores = available_cores()
    if n_threads > cores:
        out.append(("threads_exceed_cores",
                    f"{n_threads} threads on {cores} available core(s): the kernels oversubscribe the cores and run "
                    "slower; set run.threads = 0 (every core) or at most the core count",
                    {"threads": n_threads, "cores": cores}))
    return out
