"""The training loop: `Trainer.fit()` reads top to bottom, like nanoGPT's train.py.

Public hooks (override them in a subclass; everything with a leading underscore is internal):
    build_data()               -> RunData(train, val, vocab_size)
    build_model(vocab_size)    -> the sequence model (MambaLiteStack)
    build_head(vocab_size)     -> the head, which owns the loss (see rtrainer.heads)
    build_optimizer(flat)      -> the optimizer (AdamW over the flat buffer)
    evaluate()                 -> {"val_loss": ..., "val_acc": ...} over the fixed validation windows
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import signal
import threading

import psutil
from threadpoolctl import threadpool_limits

from . import checkpoint as ckpt
from . import config as config_mod
from . import data as data_mod
from . import staged as staged_mod
from .errors import CheckpointError, ConfigError, NonFiniteError, RtrainerError, RunIOError, RunLockedError
from .heads import HPNHead
from .metrics import MetricsWriter
from .model import MambaLiteStack
from .optim import AdamW, lr_at
from .params import FlatParams
from .threads import resolve_threads

SCHEMA_VERSION = 1
# config sections that define the function being trained: a resume must not change them
_FROZEN_SECTIONS = ("model", "head")


def forward_backward(model, head, flat: FlatParams, ids: np.ndarray, targets: np.ndarray, dz: np.ndarray) -> float:
    """One forward pass, loss and backward pass: returns the loss and leaves the gradients of
    the trainable tensors in flat.grad. dz (B*T, D) is scratch for dloss/dz."""
    flat.zero_grad()
    z = model.forward(ids)
    loss = head.forward(z, targets)
    dz.fill(0.0)
    head.backward(dz)
    model.backward(dz)
    return loss


class Interrupted(RtrainerError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written; exit 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclasses.dataclass
class RunData:
    train: object            # .next_batch() -> (ids, targets), .state(), .set_state(d)
    val: object | None       # .batches() -> iterable of (ids, targets), the same every time
    vocab_size: int


class Trainer:
    """Trains the model described by a Config. `Trainer.from_file(path, overrides).fit()`."""

    def __init__(self, config, *, resume: str | None = None, overwrite: bool = False, console: bool = True):
        self.cfg = config
        self.resume = resume
        self.overwrite = overwrite
        self.console = console
        self.n_threads = resolve_threads(config.run.threads)

    @classmethod
    def from_file(cls, path: str, overrides=(), **kw):
        return cls(config_mod.load_config(path, list(overrides)), **kw)

    # ================================================================ public hooks
    def build_data(self) -> RunData:
        c = self.cfg
        fmt = c.data.format
        train_path = _abspath(c.data.train)
        tokens = data_mod.load_tokens(train_path, fmt)
        if c.data.val:
            val_path = _abspath(c.data.val)
            val_tokens = data_mod.load_tokens(val_path, fmt)
        elif c.data.val_ratio > 0:
            val_path = train_path
            tokens, val_tokens = data_mod.split_tokens(tokens, c.data.val_ratio)
        else:
            val_path, val_tokens = None, None
        V = c.model.vocab_size
        if V == 0:
            V = data_mod.max_token(tokens) + 1
            if val_tokens is not None and len(val_tokens):
                V = max(V, data_mod.max_token(val_tokens) + 1)
        data_mod.check_token_range(tokens, V, train_path)
        B, T = c.train.batch_size, c.train.seq_len
        train = data_mod.PackedStream(tokens, B, T, name=train_path)
        val = None
        if val_tokens is not None and c.eval.val_every > 0:
            data_mod.check_token_range(val_tokens, V, val_path)
            val = data_mod.FixedWindows(val_tokens, B, T, c.eval.eval_batches, name=val_path)
        return RunData(train=train, val=val, vocab_size=int(V))

    def build_model(self, vocab_size: int):
        m = self.cfg.model
        return MambaLiteStack(vocab_size, m.d_model, m.d_state, m.d_conv, m.dt_rank, m.target_layers,
                              scan_chunk=m.scan_chunk, n_threads=self.n_threads)

    def build_head(self, vocab_size: int):
        h = self.cfg.head
        return HPNHead(vocab_size, self.cfg.model.d_model, normalize=h.normalize_prototypes,
                       learnable=h.learnable_prototypes, n_threads=self.n_threads)

    def build_optimizer(self, flat: FlatParams):
        o = self.cfg.optim
        return AdamW(flat, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     weight_decay_scope=o.weight_decay_scope, grad_clip=o.grad_clip, n_threads=self.n_threads)

    def evaluate(self) -> dict:
        """Mean loss and accuracy over the fixed validation windows (no gradients)."""
        n_tok, loss_sum, correct = 0, 0.0, 0
        for ids, targets in self.data.val.batches():
            z = self.model.forward(ids)
            loss = self.head.forward(z, targets)
            pred = self.head.predict(z)
            n = targets.size
            loss_sum += float(loss) * n
            correct += int(np.count_nonzero(pred == targets.reshape(-1)))
            n_tok += n
        return {"val_loss": loss_sum / n_tok, "val_acc": correct / n_tok}

    # ================================================================ the run
    def fit(self) -> dict:
        self._stop_signal = None
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            with threadpool_limits(limits=self.n_threads, user_api="blas"):
                return self._fit()
        except OSError as e:  # disk full, permission denied, ... while the run was going
            raise RunIOError(f"{getattr(e, 'filename', None) or self.cfg.run.out_dir}: {e.strerror or e}") from e
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.close()

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _fit(self) -> dict:
        c = self.cfg
        # 1. everything that can fail on bad input happens before anything is written
        self.data = self.build_data()
        V = self.data.vocab_size
        self.model = self.build_model(V)
        self.head = self.build_head(V)
        self.staged = staged_mod.Staged(c, self.model)   # expansion layout, freezing, FF (rtrainer/staged.py)
        self.flat = FlatParams(self.staged.apply_freeze(self.model.param_specs() + self.head.param_specs()))
        self.staged.bind(self.flat)
        self.model.bind(self.flat.params, self.flat.grads)
        self.head.bind(self.flat.params, self.flat.grads)
        self.optimizer = self.build_optimizer(self.flat)
        self.rng = np.random.default_rng([c.run.seed, 2])   # for subclasses (sampling, dropout, ...)
        self.resolved = self._resolved_config(V)
        out_dir = Path(self.resolved.run.out_dir)
        self.paths = {
            "out_dir": str(out_dir),
            "config": str(out_dir / "config.toml"),
            "metrics": str(out_dir / "metrics.jsonl"),
            "latest": str(out_dir / "checkpoints" / "latest.safetensors"),
            "best": str(out_dir / "checkpoints" / "best.safetensors"),
            "run_state": str(out_dir / "run_state.json"),
            "summary": str(out_dir / "summary.json"),
        }
        # one writer per run directory: the lock dies with its holder (flock), so a killed run
        # never leaves the directory locked
        out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_run_dir(out_dir)
        state = self._load_resume_state()
        if state is None and not self.overwrite and Path(self.paths["latest"]).exists():
            raise ConfigError(f"{out_dir} already holds a run (checkpoints/latest.safetensors): continue it with "
                              "--resume auto, start it over with --overwrite, or set another run.out_dir")
        if state is None:
            self.staged.initialise(self)   # init_params, or the base model (model.init_from) expanded
            self.step, self.skipped, self.best_val_loss, elapsed0 = 0, 0, math.inf, 0.0
            self.bad_evals = 0
            metrics_offset = None
        else:
            self.step = int(state["step"])
            self.optimizer.t = int(state["optimizer_updates"])
            self.skipped = int(state["skipped"])
            self.best_val_loss = _from_json_float(state["best_val_loss"])
            self.bad_evals = int(state.get("bad_evals", 0))
            self.data.train.set_state(state["data"]["train"])
            self.staged.load_state(state.get("staged"), self._resume_path)
            self.rng.bit_generator.state = state["rng"]
            elapsed0 = float(state["elapsed_s"])
            # continuing this run: cut metrics.jsonl back to the checkpoint; a checkpoint from
            # another run directory starts this directory's metrics afresh
            same_run = Path(self._resume_path).resolve().parent.parent == out_dir
            metrics_offset = int(state["metrics_offset"]) if same_run else None

        # 2. the run directory
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(self.paths["config"], config_mod.config_to_toml(self.resolved))
        self.metrics = MetricsWriter(self.paths["metrics"], truncate_to=metrics_offset)
        import rtrainer

        hint = rtrainer.threading_warning() if self.n_threads > 1 else None
        if hint:
            self._say(f"rtrainer: warning: {hint}")
        self._say(f"rtrainer: {'resuming at step ' + str(self.step) if state else 'starting'}: "
                  f"{self.flat.n_trainable:,} trainable parameters, V={V}, threads={self.n_threads}, "
                  f"out_dir={out_dir}")

        # 3. the loop
        total = c.train.steps
        B, T = c.train.batch_size, c.train.seq_len
        dz = np.empty((B * T, c.model.d_model), np.float32)
        t_start = time.perf_counter()
        t_last, step_last = t_start, self.step
        proc = psutil.Process()
        consecutive_skips = 0
        while self.step < total:
            ids, targets = self.data.train.next_batch()
            lr = lr_at(self.step, c.optim.lr, c.schedule.warmup_steps, total, c.schedule.min_lr_scale)
            extra = {}
            if self.staged.active:   # freezing, Forward-Forward, BP cadence, surgery: rtrainer/staged.py
                loss, gnorm, clipped, finite, extra = self.staged.train_step(self, ids, targets, lr, dz)
            else:
                loss = forward_backward(self.model, self.head, self.flat, ids, targets, dz)
                gnorm = self.optimizer.grad_norm()
                clipped = False
                finite = math.isfinite(loss) and math.isfinite(gnorm)
                if finite:
                    scale = self.optimizer.clip_scale(gnorm)
                    clipped = scale < 1.0
                    self.optimizer.step(lr, scale)
            if finite:
                consecutive_skips = 0
            else:  # non-finite loss or gradient: no parameter or moment changes
                self._non_finite(extra.get("ff_loss", loss) if extra.get("bp_applied") is False else loss, gnorm)
                self.skipped += 1
                consecutive_skips += 1
            self.step += 1
            last = self.step == total

            if self.step % c.log.log_every == 0 or last:
                now = time.perf_counter()
                rec = {
                    "kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                    "clipped": clipped, "skipped": self.skipped,
                    "tokens_per_s": (self.step - step_last) * B * T / max(now - t_last, 1e-9),
                    "elapsed_s": elapsed0 + now - t_start,
                    "rss_mb": proc.memory_info().rss / 2**20,
                    **extra,
                }
                self.metrics.write(rec)
                t_last, step_last = now, self.step
                # FF and HPN losses are always labelled apart; FF-only steps have no HPN loss
                what = (f"loss {loss:.5f}" if not extra or extra["bp_applied"] else "ff-only")
                ff = f"  ff_loss {extra['ff_loss']:.5f}" if extra else ""
                self._say(f"step {self.step:>6}/{total}  {what}{ff}  lr {lr:.3e}  grad_norm {gnorm:.4f}"
                          f"  {rec['tokens_per_s']:,.0f} tok/s  rss {rec['rss_mb']:.0f} MB")
            improved = stop_early = False
            if self.data.val is not None and (self.step % c.eval.val_every == 0 or last):
                improved = self._validate()
                stop_early = c.eval.patience > 0 and self.bad_evals >= c.eval.patience
            saved = (c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0) or last or stop_early
            if saved or improved:
                self._save(elapsed0 + time.perf_counter() - t_start, latest=saved, best=improved)
            if stop_early:
                self._say(f"rtrainer: early stopping at step {self.step}: {self.bad_evals} evaluations without an "
                          f"improvement of more than {c.eval.min_delta} (best val_loss {self.best_val_loss:.5f})")
                return self._finish("early_stopping")
            if consecutive_skips > c.train.max_consecutive_skips:
                self._finish("non_finite")
                raise NonFiniteError(f"{consecutive_skips} consecutive steps up to step {self.step} had a non-finite "
                                     "loss or gradient and were skipped (train.max_consecutive_skips = "
                                     f"{c.train.max_consecutive_skips}); stopping")
            _fault_point(self.step, self.flat)
            if self._stop_signal is not None and not last:
                if not saved:
                    self._save(elapsed0 + time.perf_counter() - t_start)
                name = signal.Signals(self._stop_signal).name
                self._finish("interrupted")
                raise Interrupted(self._stop_signal, f"interrupted by {name} after step {self.step}; checkpoint "
                                  f"{self.paths['latest']} written; continue with --resume auto")
        return self._finish("completed")

    def _finish(self, reason: str) -> dict:
        summary = {
            "final_step": self.step,
            "stop_reason": reason,
            "best_val_loss": _json_float(self.best_val_loss),
            "last_val": getattr(self, "last_val", None),
            "skipped_steps": self.skipped,
            "paths": self.paths,
        }
        self.metrics.close()
        ckpt.write_json_atomic(self.paths["summary"], summary)
        return summary

    # ================================================================ internals
    def _non_finite(self, loss: float, gnorm: float) -> None:
        """With train.fail_on_non_finite: keep the state that produced it for diagnosis and stop."""
        if not self.cfg.train.fail_on_non_finite:
            return
        path = Path(self.paths["out_dir"]) / "checkpoints" / f"non-finite-step-{self.step + 1}.safetensors"
        tensors = dict(self.flat.state_tensors())
        for name, g in self.flat.views(self.flat.grad).items():
            tensors[f"grad/{name}"] = g
        ckpt.save_checkpoint(str(path), tensors, {"schema": SCHEMA_VERSION, "step": self.step,
                                                  "loss": _json_float(loss), "grad_norm": _json_float(gnorm),
                                                  "config": config_mod.config_to_dict(self.resolved)})
        self._finish("non_finite")
        raise NonFiniteError(f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                             f"(loss {loss}, grad_norm {gnorm}); parameters, moments and gradients of that step "
                             f"are in {path} (train.fail_on_non_finite = true)")

    def _validate(self) -> bool:
        """Evaluate, log, and track the best val_loss; True on an improvement of more than min_delta."""
        r = self.evaluate()
        improved = r["val_loss"] < self.best_val_loss - self.cfg.eval.min_delta
        if improved:
            self.best_val_loss = r["val_loss"]
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        rec = {"kind": "val", "step": self.step, **r, "best_val_loss": self.best_val_loss}
        self.last_val = {k: _json_float(v) for k, v in rec.items() if k != "kind"}
        self.metrics.write(rec)
        self._say(f"step {self.step:>6}  val_loss {r['val_loss']:.5f}  val_acc {r['val_acc']:.4f}"
                  f"  best {self.best_val_loss:.5f}")
        return improved

    def _save(self, elapsed: float, latest: bool = True, best: bool = False) -> None:
        """One checkpoint = parameters + moments + everything the loop needs to continue; written
        as `latest` and/or, after an improving validation, as `best`."""
        state = {
            "schema": SCHEMA_VERSION,
            "step": self.step,
            "optimizer_updates": self.optimizer.t,
            "skipped": self.skipped,
            "best_val_loss": _json_float(self.best_val_loss),
            "bad_evals": self.bad_evals,
            "data": {"train": self.data.train.state()},
            "rng": self.rng.bit_generator.state,
            "metrics_offset": self.metrics.offset(),
            "elapsed_s": elapsed,
            "n_threads": self.n_threads,
            "config": config_mod.config_to_dict(self.resolved),
            "staged": self.staged.state(),
        }
        if best:
            ckpt.save_checkpoint(self.paths["best"], self.flat.state_tensors(), state)
        if latest:
            ckpt.save_checkpoint(self.paths["latest"], self.flat.state_tensors(), state)
            ckpt.write_json_atomic(self.paths["run_state"], {
                "step": self.step, "checkpoint": self.paths["latest"], "data": state["data"],
                "best_val_loss": state["best_val_loss"], "bad_evals": self.bad_evals})

    def _checkpoint_path(self) -> str | None:
        r = self.resume
        if not r:
            return None
        if r == "auto":
            p = Path(self.paths["latest"])
            return str(p) if p.exists() else None
        p = Path(r)
        if p.is_dir():
            cand = p / "checkpoints" / "latest.safetensors"
            p = cand if cand.exists() else p / "latest.safetensors"
        return str(p)

    def _load_resume_state(self) -> dict | None:
        path = self._checkpoint_path()
        if path is None:
            if self.resume == "auto":
                self._say("rtrainer: --resume auto: no checkpoint yet, starting fresh")
            return None
        self._resume_path = path
        tensors, state = ckpt.load_checkpoint(path)
        if state.get("schema") != SCHEMA_VERSION:
            raise CheckpointError(f"{path}: checkpoint schema {state.get('schema')} is not {SCHEMA_VERSION}")
        saved = state.get("config", {})
        now = config_mod.config_to_dict(self.resolved)
        for section in _FROZEN_SECTIONS:
            for key, value in now[section].items():
                if saved.get(section, {}).get(key) != value:
                    raise ConfigError(
                        f"cannot resume from {path}: {section}.{key} is {saved.get(section, {}).get(key)!r} "
                        f"in the checkpoint but {value!r} in this run")
        self.flat.load_state_tensors(tensors, source=path)
        if int(state.get("n_threads", self.n_threads)) != self.n_threads:
            self._say(f"rtrainer: warning: the checkpoint was written with {state['n_threads']} threads, this run "
                      f"uses {self.n_threads}: results will not be bitwise identical to an uninterrupted run")
        return state

    def _resolved_config(self, vocab_size: int):
        """The config with everything that was inferred made explicit (absolute paths, V, threads)."""
        d = config_mod.config_to_dict(self.cfg)
        d["run"]["out_dir"] = _abspath(d["run"]["out_dir"])
        d["run"]["threads"] = self.n_threads
        d["model"]["vocab_size"] = vocab_size
        if d["model"]["init_from"]:
            d["model"]["init_from"] = _abspath(d["model"]["init_from"])
        for k in ("train", "val"):
            if d["data"][k]:
                d["data"][k] = _abspath(d["data"][k])
        return config_mod.config_from_dict(d)

    def _say(self, msg: str) -> None:
        if self.console:
            print(msg, file=sys.stderr if msg.startswith("rtrainer:") else sys.stdout, flush=True)


def _lock_run_dir(out_dir: Path):
    """Take an exclusive flock on out_dir/.lock (kept open for the run); the file records the
    holder so that a second run can name it."""
    import fcntl
    import socket

    path = out_dir / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLockedError(f"run directory {out_dir} is in use by {holder} (lock {path}); wait for it, "
                             "stop it, or set another run.out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _fault_point(step: int, flat: FlatParams) -> None:
    """Fault injection for the crash tests, once step N is complete (and its checkpoint, if due,
    written), from the environment variable RTRAINER_FAULT:
      after_step=N:SIGNAL                the process sends itself SIGNAL (TERM, INT or KILL): a real
                                         signal delivered by the kernel, not a simulated exception
      nan_param_after_step=N:TENSOR      the named parameter is filled with NaN"""
    kind, _, rest = os.environ.get("RTRAINER_FAULT", "").partition("=")
    n, _, arg = rest.partition(":")
    if not n.isdigit() or int(n) != step:
        return
    if kind == "after_step":
        os.kill(os.getpid(), getattr(signal, "SIG" + (arg or "KILL").upper()))
    elif kind == "nan_param_after_step":
        flat.params[arg][...] = np.nan


def _abspath(p: str) -> str:
    return str(Path(os.path.expanduser(p)).resolve())


def _json_float(x: float):
    return x if math.isfinite(x) else None


def _from_json_float(x) -> float:
    return math.inf if x is None else float(x)
