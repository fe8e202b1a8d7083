"""The training loop: `Trainer.fit()` reads top to bottom, like nanoGPT's train.py.

Public hooks (override them in a subclass; everything with a leading underscore is internal):
    build_data()               -> RunData(train, val, vocab_size)
    build_model(vocab_size)    -> the sequence model (MambaLiteStack or MambaStack, by model.layer)
    build_head(vocab_size)     -> the head, which owns the loss (see rtrainer.heads)
    build_optimizer(flat)      -> the optimizer (AdamW over the flat buffer)
    evaluate()                 -> {"val_loss": ..., "val_acc": ...} over the fixed validation windows

The model and head are assembled into a rtrainer.net.Net (self.net); each step is
rtrainer.step.train_step with the staged-training policy (rtrainer.staged) when the run uses one.
"""
from __future__ import annotations

import contextlib
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
from . import runstate
from . import config as config_mod
from . import console as console_mod
from . import distributed as dist_mod
from . import faults
from . import plan as plan_mod
from . import resume as resume_mod
from . import staged as staged_mod
from . import shards as shards_mod
from . import stream as stream_mod
from . import tokenizer as tokenizer_mod
from . import progress as progress_mod
from .errors import CheckpointError, ConfigError, NonFiniteError, RtrainerError, RunIOError
from .metrics import MetricsWriter
from .model import resolve_dt_rank
from .net import Net, build_head, build_model
from .optim import AdamW, lr_at
from .runstate import RunState
from .params import FlatParams
from .step import train_step

SCHEMA_VERSION = runstate.SCHEMA_VERSION


class Interrupted(RtrainerError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written; exit 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum

    agreed = True   # every rank of a multi-process run stops after the same step


@dataclasses.dataclass
class RunData:
    train: object            # .next_batch() -> (ids, targets), .state(), .set_state(d)
    val: object | None       # .batches() -> iterable of (ids, targets), the same every time
    vocab_size: int
    extra_val: dict = dataclasses.field(default_factory=dict)   # {seq_len: like val} (eval.extra_lengths)

    def close(self) -> None:
        """Stop every source's prefetch workers and unmap its shards (sources without close() have none)."""
        for src in (self.train, self.val, *self.extra_val.values()):
            if hasattr(src, "close"):
                src.close()


class _Meter:
    """Throughput between two log lines, and the run's clock."""

    def __init__(self, t_start: float, step: int, elapsed0: float):
        self.t_start, self.elapsed0 = t_start, elapsed0
        self.t_last, self.step_last = t_start, step
        self.proc = psutil.Process()

    def tokens_per_s(self, now: float, step: int, tokens_per_step: int) -> float:
        r = (step - self.step_last) * tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        return r


class Trainer:
    """Trains the model described by a Config. `Trainer.from_file(path, overrides).fit()`."""

    def __init__(self, config, *, resume: str | None = None, overwrite: bool = False, console: bool = True,
                 stop_at: int | None = None):
        self.cfg = config
        self.resume = resume
        self.overwrite = overwrite
        self.stop_at = stop_at     # pause after this step with a checkpoint (stop_reason "paused")
        # data parallel: a launcher started several processes (rtrainer.distributed); one process
        # without micro-batches leaves every step exactly as it is
        self.comm = dist_mod.get_comm()
        self.dp = dist_mod.DataParallel(self.comm, config.train.batch_size, config.train.micro_batch_size)
        self.console = console and self.comm.is_root   # rank 0 speaks and writes; the others only compute
        self.n_threads = dist_mod.threads_per_rank(config.run.threads, self.comm.launcher)
        # what a run holds once set up (fit); the cleanup relies on these starting as None
        self.data = None
        self.run_dir = None   # the checkpoint manager (runstate.RunDir)
        self.last_val = None
        self.metrics = None
        self.tokenizer = None   # data.tokenizer, loaded by build_data
        self.progress = None    # the live progress bar (rank 0 on a terminal), once the loop starts
        # warnings and integrity events: stderr (rank 0), metrics, summary
        self.events = console_mod.Events(printed=self.comm.is_root)

    @classmethod
    def from_file(cls, path: str, overrides=(), **kw):
        return cls(config_mod.load_config(path, list(overrides)), **kw)

    # ================================================================ public hooks
    def build_data(self) -> RunData:
        c, d = self.cfg, self.cfg.data
        if d.task:
            return self._build_task_data()
        train_path = _abspath(d.train)
        shards = shards_mod.open_source(train_path, d.format, d.shard_glob, d.verify)
        val_shards = shards_mod.open_source(_abspath(d.val), d.format, d.shard_glob, d.verify) if d.val else None
        self.tokenizer = tokenizer_mod.for_run(d.tokenizer, c.model.vocab_size)   # V comes from it
        V = c.model.vocab_size or (self.tokenizer.vocab_size if self.tokenizer is not None else 0)
        if V == 0:  # whole shards: the manifest knows their largest id (bounded: rtrainer/plan.py)
            V = plan_mod.infer_vocab(shards + (val_shards or []))
        if not d.val and d.val_ratio > 0:
            shards, val_shards = shards_mod.split_shards(shards, d.val_ratio)
        shards_mod.check_shards_range(shards, V)
        B, T = c.train.batch_size, c.train.seq_len
        train = stream_mod.TokenStream(shards, B, T, packed=d.packed, random_windows=d.random_windows,
                                       shuffle=d.shuffle_shards, seed=c.run.seed, prefetch_workers=d.prefetch_workers,
                                       prefetch_buffer=d.prefetch_buffer, name=train_path,
                                       shuffle_windows=d.shuffle_windows)
        val = None
        extra = {}
        if val_shards is not None and c.eval.val_every > 0:
            shards_mod.check_shards_range(val_shards, V)
            val_name = _abspath(d.val) if d.val else train_path
            val = stream_mod.ShardWindows(val_shards, B, T, c.eval.eval_batches, name=val_name)
            for L in c.eval.extra_lengths:
                extra[L] = stream_mod.ShardWindows(val_shards, B, L, c.eval.eval_batches, name=val_name)
        return RunData(train=train, val=val, vocab_size=int(V), extra_val=extra)

    def _build_task_data(self) -> RunData:
        """data.task: fresh seeded batches for training, fixed seeded sets for validation."""
        from . import tasks

        c, d = self.cfg, self.cfg.data
        B, T = c.train.batch_size, c.train.seq_len
        kw = dict(task_tokens=d.task_tokens, task_vocab=d.task_vocab)
        train = tasks.TaskStream(d.task, B, T, c.run.seed, **kw)
        val, extra = None, {}
        if c.eval.val_every > 0:
            val = tasks.TaskEval(d.task, B, T, c.eval.eval_batches, c.run.seed, **kw)
            for L in c.eval.extra_lengths:
                try:
                    extra[L] = tasks.TaskEval(d.task, B, L, c.eval.eval_batches, c.run.seed, **kw)
                except ValueError as e:
                    raise ConfigError(f"eval.extra_lengths: length {L}: {e}") from None
        return RunData(train=train, val=val, vocab_size=max(c.model.vocab_size, d.task_vocab), extra_val=extra)

    def build_model(self, vocab_size: int):
        return build_model(self.cfg.model, vocab_size, self.n_threads)

    def build_head(self, vocab_size: int):
        return build_head(self.cfg, vocab_size, self.n_threads)

    def build_optimizer(self, flat: FlatParams):
        o = self.cfg.optim
        return AdamW(flat, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     weight_decay_scope=o.weight_decay_scope, grad_clip=o.grad_clip, n_threads=self.n_threads)

    def evaluate(self) -> dict:
        """Mean loss and accuracy over the fixed validation windows (no gradients), scored tokens
        only (targets = -1 are ignored); plus val_loss@L, val_acc@L for each eval.extra_lengths L."""
        r = {}
        for L, source in [(None, self.data.val)] + sorted(self.data.extra_val.items()):
            e = self.net.evaluate(source.batches()) if not self.dp.active else self._evaluate_shared(source)
            sfx = "" if L is None else f"@{L}"
            r["val_loss" + sfx] = e["loss"]
            r["val_acc" + sfx] = e["acc"]
        return r

    def _evaluate_shared(self, source) -> dict:
        """Net.evaluate over this rank's micro-batches of every window, the sums reduced over the ranks.
        The loss is summed per micro-batch slot, then over the slots in order: one process with M
        micro-batches adds the same numbers in the same order as M ranks with one each."""
        n_tok, correct, slots = 0, 0, {}
        batches = source.slotted_batches() if hasattr(source, "slotted_batches") else \
            ((0, i, t) for i, t in source.batches())
        for j, ids, targets in batches:
            z = self.model.forward(ids)
            loss = self.head.forward(z, targets)
            pred = self.head.predict(z)
            t = targets.reshape(-1)
            n = int(np.count_nonzero(t != -1))
            slots[j] = slots.get(j, 0.0) + float(loss) * n
            correct += int(np.count_nonzero(pred == t))    # pred is never -1
            n_tok += n
        loss_sum = 0.0
        for j in sorted(slots):
            loss_sum += slots[j]
        if self.comm.distributed:
            loss_sum, correct, n_tok = self.comm.sum([loss_sum, correct, n_tok])
        return {"loss": loss_sum / max(n_tok, 1), "acc": correct / max(n_tok, 1)}

    # ================================================================ the run
    def fit(self) -> dict:
        """Set-up, the loop (step, log, evaluate, checkpoint, stop conditions), finish."""
        with self._running():
            c = self.cfg
            total, B, T = c.train.steps, c.train.batch_size, c.train.seq_len
            elapsed0 = self._setup()
            t_start = time.perf_counter()
            meter = _Meter(t_start, self.step, elapsed0)
            self.progress = progress_mod.Progress(total, self.step, self.console and progress_mod.on_terminal(), B * T)
            elapsed = lambda: elapsed0 + time.perf_counter() - t_start  # noqa: E731
            consecutive_skips = 0
            fb = lambda ids, targets: self.dp.forward_backward(self.net, ids, targets)  # noqa: E731
            while self.step < total:
                # the step
                ids, targets = self.data.train.next_batch()
                lr = lr_at(self.step, c.optim.lr, c.schedule.warmup_steps, total, c.schedule.min_lr_scale)
                if self.dp.active:   # this rank's share in micro-batches, one Allreduce (rtrainer/distributed.py)
                    self.dp.begin_step(self.data.train)
                    r = train_step(self.net, self.optimizer, ids, targets, lr, self.policy, step=self.step,
                                   forward_backward=fb, loss_hook=self.dp.loss_hook, grad_hook=self.dp.grad_hook)
                else:
                    r = train_step(self.net, self.optimizer, ids, targets, lr, self.policy, step=self.step)
                if r.finite:
                    consecutive_skips = 0
                else:  # non-finite loss or gradient: no parameter or moment changes
                    self._non_finite(r)
                    self.skipped += 1
                    consecutive_skips += 1
                self.step += 1
                last = self.step == total
                self.progress.update(self.step, r.loss)
                # log, evaluate, checkpoint
                if self.step % c.log.log_every == 0 or last:
                    self._log(r, lr, meter, B * T)
                improved = stop_early = validated = False
                if self.data.val is not None and (self.step % c.eval.val_every == 0 or last):
                    validated = True
                    improved = self._validate()
                    stop_early = c.eval.patience > 0 and self.bad_evals >= c.eval.patience
                saved = (c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0) or last or stop_early
                if saved or improved:
                    self._save(elapsed(), latest=saved, best=improved)
                # stop conditions
                if stop_early:
                    self._say(f"rtrainer: early stopping at step {self.step}: {self.bad_evals} evaluations without "
                              f"an improvement of more than {c.eval.min_delta} (best val_loss {self.best_val_loss:.5f})")
                    return self._finish("early_stopping")
                if consecutive_skips > c.train.max_consecutive_skips:
                    self._finish("non_finite")
                    raise NonFiniteError(f"{consecutive_skips} consecutive steps up to step {self.step} had a "
                                         "non-finite loss or gradient and were skipped (train.max_consecutive_skips "
                                         f"= {c.train.max_consecutive_skips}); stopping")
                _fault_point(self.step, self.flat)
                if self.stop_at is not None and self.step >= self.stop_at and not last:
                    if not saved:
                        self._save(elapsed())
                    self._say(f"rtrainer: paused after step {self.step} (--stop-at); continue with --resume auto")
                    self._closing_validation(validated)
                    return self._finish("paused")
                if self.comm.distributed:   # every rank stops after the same step
                    self._stop_signal = self.dp.agree_stop(self._stop_signal)
                if self._stop_signal is not None and not last:
                    if not saved:
                        self._save(elapsed())
                    name = signal.Signals(self._stop_signal).name
                    self._closing_validation(validated)
                    self._finish("interrupted")
                    # SIGUSR1 is a warning ahead of a SIGTERM: the run ends as if it had been terminated
                    code = signal.SIGTERM if self._stop_signal == signal.SIGUSR1 else self._stop_signal
                    raise Interrupted(code, f"interrupted by {name} after step {self.step}; checkpoint "
                                      f"{self.paths['latest']} written; continue with --resume auto")
            return self._finish("completed")

    @contextlib.contextmanager
    def _running(self):
        """Around a run: SIGINT/SIGTERM finish the current step, BLAS at the run's thread count, an
        OSError while running is a RunIOError; afterwards the lock and every data source are closed."""
        self._stop_signal = None
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            # SIGUSR1: what mpirun forwards to every rank and Slurm sends ahead of a kill (--signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            with threadpool_limits(limits=self.n_threads, user_api="blas"):
                yield
        except OSError as e:  # disk full, permission denied, ... while the run was going
            err = RunIOError(f"{getattr(e, 'filename', None) or self.cfg.run.out_dir}: {e.strerror or e}")
            self._failure_summary(err)
            raise err from e
        except RunIOError as e:   # e.g. the last checkpoint could not be written: never "completed"
            self._failure_summary(e)
            raise
        finally:
            if self.progress is not None:   # before an error line: no half-drawn bar above it
                self.progress.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.run_dir is not None:
                self.run_dir.unlock()
            if self.data is not None:
                self.data.close()   # stop the prefetch workers, unmap the shards

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _setup(self) -> float:
        """Everything before the first step; returns the run time already spent (resume). Bad input
        fails here before anything is written."""
        c = self.cfg
        # the run plan: memory checked before anything is allocated (from the config alone, then
        # with the vocabulary once the data has given it)
        avail = plan_mod.available_memory()
        plan_mod.require_fits(plan_mod.make_plan(c), c, avail)
        self.data = self.build_data()
        V = self.data.vocab_size
        model, head = self.build_model(V), self.build_head(V)
        tpe = self.data.train.tokens_per_epoch() if hasattr(self.data.train, "tokens_per_epoch") else None
        self.plan = plan_mod.make_plan(c, V, model=model, head=head, tokens_per_epoch=tpe)
        plan_mod.require_fits(self.plan, c, avail)
        self.net = Net.build(c, V, n_threads=self.n_threads, model=model, head=head)
        self.model, self.head, self.flat = self.net.model, self.net.head, self.net.flat
        self.staged = staged_mod.Staged(c)   # expansion, Forward-Forward, BP cadence, surgery
        self.policy = self.staged if self.staged.active else None
        self.optimizer = self.build_optimizer(self.flat)
        self.rng = np.random.default_rng([c.run.seed, 2])   # for subclasses (sampling, dropout, ...)
        if self.dp.active:
            if self.policy is not None and self.staged.ff:   # (freezing alone is Net's, no policy step)
                raise ConfigError("train.ff / train.bp_cadence (a staged-training policy) work on one process "
                                  "without micro-batches (train.micro_batch_size)")
            self.dp.bind(self.flat)
            self.data.train = self.dp.wrap_train(self.data.train)
            self.data.val = self.dp.wrap_eval(self.data.val)
            self.data.extra_val = {L: self.dp.wrap_eval(v) for L, v in self.data.extra_val.items()}
        self.resolved = self._resolved_config(V)
        out_dir = Path(self.resolved.run.out_dir)
        self.ckpt_dir = out_dir / "checkpoints"
        self.paths = {
            "out_dir": str(out_dir),
            "config": str(out_dir / "config.toml"),
            "metrics": str(out_dir / "metrics.jsonl"),
            "checkpoints": str(self.ckpt_dir),
            "latest": None,     # the newest committed step directory, once there is one
            "best": None,       # the step directory of the best validation, once there is one
            "run_state": str(out_dir / "run_state.json"),
            "summary": str(out_dir / "summary.json"),
        }
        state, metrics_offset, metrics_sha256, elapsed0 = None, None, None, 0.0
        if self.comm.is_root:
            state, metrics_offset, metrics_sha256, elapsed0 = self._setup_run_dir(out_dir)
        if self.comm.distributed:   # rank 0 read the checkpoint (or initialised): the others take its state
            if self.comm.is_root:
                shared = (state, elapsed0)
            else:
                self.staged.initialise(self.net, c.run.seed, c.model.init, c.model.init_from,
                                       staged_mod.peek(self.data.train))
                shared = None
            state, elapsed0 = self.comm.bcast(shared)
            for buf in (self.flat.param_buf, self.flat.m, self.flat.v):
                self.comm.bcast_array_(buf)
            if not self.comm.is_root:
                self._restore_scalars(state)
        if self.comm.is_root:
            self._open_metrics(metrics_offset, metrics_sha256)
        else:
            self.metrics = _NoMetrics()
        self.events.attach(self.metrics, self.step)
        was = 1 if state is None or state.world_size is None else int(state.world_size)
        if state is not None and was != self.comm.size:
            self.events.emit("world_size_changed", f"the checkpoint was written by {was} process(es), this run has "
                             f"{self.comm.size}: the global batch and the data are the same, but sums are rounded "
                             "in another order, so results are not bitwise those of an uninterrupted run",
                             step=self.step, old=was, new=self.comm.size)
        import rtrainer

        hint = rtrainer.threading_warning() if self.n_threads > 1 else None
        if hint:
            self.events.emit("blas_spin_wait", hint, step=self.step)
        for event, message, fields in plan_mod.surprises(c, self.n_threads):
            self.events.emit(event, message, step=self.step, **fields)
        world = f", processes={self.comm.size}" if self.comm.distributed else ""
        accum = f", micro-batches={self.dp.accum}" if self.dp.accum > 1 else ""
        self._say(f"rtrainer: {'resuming at step ' + str(self.step) if state else 'starting'}: "
                  f"{self.flat.n_trainable:,} trainable parameters, V={V}, threads={self.n_threads}{world}{accum}, "
                  f"out_dir={out_dir}; plan: memory about {plan_mod._human(self.plan['memory']['total'])}, "
                  f"{self.plan['flops_per_step']['total'] / 1e9:.3f} GFLOP/step")
        return elapsed0

    def _setup_run_dir(self, out_dir: Path):
        """Rank 0 (or the only process): lock the run directory, clean it, read the checkpoint to
        resume or initialise, write the resolved config. Returns (state, metrics offset, metrics
        sha256, elapsed)."""
        c = self.cfg
        plan_mod.check_outputs(out_dir)   # a file where out_dir belongs, read-only checkpoints/, ...
        self.run_dir = runstate.RunDir(out_dir, c.checkpoint.keep_last, self.events.emit)
        self.run_dir.lock()    # one writer per run directory (flock: dies with its holder)
        self.run_dir.sweep()   # what a killed writer left: .tmp-* and .trash-*
        state = self._load_resume_state()
        existing = self.run_dir.existing()
        if state is None and existing:
            if not self.overwrite:
                raise ConfigError(f"{out_dir} already holds a run ({existing[0][1]}): continue it with "
                                  "--resume auto, start it over with --overwrite, or set another run.out_dir")
            self.run_dir.retire_all(existing)
        if state is None:
            # init_params, or the base model (model.init_from) expanded
            self.staged.initialise(self.net, c.run.seed, c.model.init, c.model.init_from,
                                   staged_mod.peek(self.data.train))
            self._restore_scalars(None)
            metrics_offset = metrics_sha256 = None
            elapsed0 = 0.0
        else:
            self._restore_scalars(state)
            elapsed0 = state.elapsed_s
            # continuing this run: cut metrics.jsonl back to the checkpoint; a checkpoint from
            # another run directory starts this directory's metrics afresh
            same_run = self.run_dir.owns(self._resume_path)
            metrics_offset = state.metrics_offset if same_run else None
            metrics_sha256 = state.metrics_sha256 if same_run else None   # None: an older checkpoint
            if same_run:
                self.run_dir.set_aside_newer(self.step, existing)
                self.paths["latest"] = self._resume_path
                self.paths["best"] = self.run_dir.best_path(self.best_step)

        # the run directory
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(self.paths["config"], config_mod.config_to_toml(self.resolved))
        return state, metrics_offset, metrics_sha256, elapsed0

    def _open_metrics(self, metrics_offset, metrics_sha256) -> None:
        """Rank 0: metrics.jsonl continued from the checkpoint (checked against its sha256) or new."""
        try:   # the summary of an earlier segment must not pass for this one's (written again at the end)
            os.unlink(self.paths["summary"])
        except FileNotFoundError:
            pass
        self.metrics = MetricsWriter(self.paths["metrics"], truncate_to=metrics_offset,
                                     expect_sha256=metrics_sha256)
        if self.metrics.set_aside is not None:   # the log did not match the checkpoint: kept aside, never continued
            moved, why = self.metrics.set_aside
            self.events.emit("metrics_set_aside", f"{self.paths['metrics']} does not match the checkpoint ({why}): "
                             f"it is damaged; kept as {moved}, a new metrics file starts at step {self.step}",
                             path=self.paths["metrics"], moved_to=moved, reason=why)

    def _restore_scalars(self, state: RunState | None) -> None:
        """Everything but the tensors of a checkpoint's state (the step, counters, data cursor, RNG);
        None: a new run."""
        if state is None:
            self.step, self.skipped, self.best_val_loss = 0, 0, math.inf
            self.bad_evals, self.best_step = 0, None
            return
        self.step, self.skipped = state.step, state.skipped
        self.best_val_loss, self.bad_evals, self.best_step = state.best_val_loss, state.bad_evals, state.best_step
        self.optimizer.load_state({"updates": state.optimizer_updates})
        self.data.train.set_state(state.data["train"])
        self.staged.load_state(state.staged, getattr(self, "_resume_path", None))
        self.rng.bit_generator.state = state.rng

    def _log(self, r, lr: float, meter: "_Meter", tokens_per_step: int) -> None:
        now = time.perf_counter()
        extra = r.extra
        rec = {
            "kind": "train", "step": self.step, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
            "clipped": r.clipped, "skipped": self.skipped,
            "tokens_per_s": meter.tokens_per_s(now, self.step, tokens_per_step),
            "elapsed_s": meter.elapsed0 + now - meter.t_start,
            "rss_mb": meter.proc.memory_info().rss / 2**20,
            **extra,
        }
        self.metrics.write(rec)
        # FF and head losses are always labelled apart; FF-only steps have no head loss
        what = (f"loss {r.loss:.5f}" if not extra or extra["bp_applied"] else "ff-only")
        ff = f"  ff_loss {extra['ff_loss']:.5f}" if extra else ""
        self._say(f"step {self.step:>6}/{self.cfg.train.steps}  {what}{ff}  lr {lr:.3e}  grad_norm {r.grad_norm:.4f}"
                  f"  {rec['tokens_per_s']:,.0f} tok/s  rss {rec['rss_mb']:.0f} MB")

    def _finish(self, reason: str) -> dict:
        summary = {
            "final_step": self.step,
            "stop_reason": reason,
            "best_val_loss": _json_float(self.best_val_loss),
            "last_val": self.last_val,
            "skipped_steps": self.skipped,
            "paths": self.paths,
            "events": self.events.items,
        }
        self.metrics.close()
        if self.comm.is_root:
            ckpt.write_json_atomic(self.paths["summary"], summary)
        if self.progress is not None:
            self.progress.close()
        self._say(progress_mod.closing_message(summary, self.paths, total=self.cfg.train.steps))
        self.comm.barrier()   # no rank leaves (and so ends the job) before rank 0 has written
        return summary

    # ================================================================ internals
    def _failure_summary(self, err: Exception) -> None:
        """An I/O error stopped the run: summary.json says so (stop_reason "io_error", the message
        in "error"), best effort: the directory may be what failed."""
        if getattr(self, "metrics", None) is None or not self.comm.is_root:
            return   # stopped before the run directory was set up (or not rank 0): nothing to summarise
        try:
            self.metrics.close()
        except RtrainerError:
            pass
        try:
            ckpt.write_json_atomic(self.paths["summary"], {
                "final_step": self.step, "stop_reason": "io_error", "error": str(err),
                "best_val_loss": _json_float(self.best_val_loss), "last_val": getattr(self, "last_val", None),
                "skipped_steps": self.skipped, "paths": self.paths, "events": self.events.items})
        except (OSError, RtrainerError):
            pass

    def _non_finite(self, r) -> None:
        """With train.fail_on_non_finite: keep the state that produced it for diagnosis and stop."""
        if not self.cfg.train.fail_on_non_finite:
            return
        # an FF-only step is decided by its FF loss
        loss = r.extra["ff_loss"] if r.extra.get("bp_applied") is False else r.loss
        gnorm = r.grad_norm
        path = Path(self.paths["out_dir"]) / "checkpoints" / f"non-finite-step-{self.step + 1}.safetensors"
        if not self.comm.is_root:   # rank 0 keeps the diagnosis; the others stop with it
            self._finish("non_finite")
            raise NonFiniteError(f"step {self.step + 1}: non-finite loss or gradient (see rank 0)")
        tensors = dict(self.flat.state_tensors())
        for name, g in self.flat.grads.items():
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
        self.progress.validation(r["val_loss"], r["val_acc"])
        self._say(f"step {self.step:>6}  val_loss {r['val_loss']:.5f}  val_acc {r['val_acc']:.4f}"
                  f"  best {self.best_val_loss:.5f}")
        return improved

    def _closing_validation(self, validated: bool) -> None:
        """A run that stops between evaluations (signal, --stop-at) still reports where it stands:
        one validation line marked "closing": true, written AFTER the checkpoint, so it changes
        neither the best/patience state nor what a resumed run logs (resume cuts metrics.jsonl back
        to the checkpoint's offset)."""
        if self.data.val is None or validated:
            return
        r = self.evaluate()
        rec = {"kind": "val", "step": self.step, **r, "best_val_loss": self.best_val_loss, "closing": True}
        self.last_val = {k: _json_float(v) for k, v in rec.items() if k != "kind"}
        self.metrics.write(rec)
        self._say(f"step {self.step:>6}  val_loss {r['val_loss']:.5f}  val_acc {r['val_acc']:.4f}  (closing)")

    def _save(self, elapsed: float, latest: bool = True, best: bool = False) -> None:
        """Commit one checkpoint: parameters + moments + everything
        the loop needs to continue, as checkpoints/step-N committed by its manifest; then
        run_state.json and best.json (hints: the truth is the newest step-N that verifies); then
        retention. `latest`/`best` say why it is written (a due save, an improving validation)."""
        if best:
            self.best_step = self.step
        self.dp.check_same_params(self.flat.param_buf, self.step)
        if not self.comm.is_root:   # rank 0 writes; the others wait for it
            if latest:
                self.paths["latest"] = str(self.ckpt_dir / ckpt.step_dir_name(self.step))
            self.comm.barrier()
            return
        state = RunState(
            step=self.step, optimizer_updates=self.optimizer.state()["updates"], skipped=self.skipped,
            best_val_loss=self.best_val_loss, bad_evals=self.bad_evals, best_step=self.best_step,
            data={"train": self.data.train.state()}, rng=self.rng.bit_generator.state,
            metrics_offset=self.metrics.offset(), elapsed_s=elapsed, n_threads=self.n_threads,
            config=config_mod.config_to_dict(self.resolved), staged=self.staged.state(),
            metrics_sha256=self.metrics.sha256(),   # of those bytes: the log is checked on resume
            world_size=self.comm.size, tokenizer=tokenizer_mod.run_record(self.tokenizer))
        path = self.run_dir.save(self.flat.state_tensors(), state, best=best, extra={"n_threads": self.n_threads})
        self.paths["latest"] = path
        if best:
            self.paths["best"] = path
        self.comm.barrier()

    def _load_resume_state(self) -> RunState | None:
        r = self.resume
        if not r:
            return None
        if r == "auto":
            found = self.run_dir.newest_valid()
            if found is None:
                self.events.emit("resume_found_nothing", f"--resume {r}: no checkpoint yet in {self.ckpt_dir}, "
                                 "starting fresh", out_dir=str(self.paths["out_dir"]))
                return None
        else:   # a step directory, a checkpoint file, or a run directory (its newest valid checkpoint)
            found = runstate.newest_valid(r, self.run_dir.skipped)
            if found is None:
                raise CheckpointError(f"no checkpoint found in {r}")
        self._resume_path, tensors, raw = found
        path = self._resume_path
        runstate.check_schema(path, raw)
        saved = raw.get("config", {})
        now = config_mod.config_to_dict(self.resolved)
        defaults = config_mod.config_to_dict(config_mod.Config())
        # the same tokenizer (first: another one also changes the vocabulary [model] would name)
        tokenizer_mod.check_resume(raw, self.tokenizer, path)
        # [model] and [head] must not change (a key added after the checkpoint stands at its default there)
        resume_mod.check_frozen(path, saved, now, defaults, self.cfg.model.vocab_size)
        state = RunState.from_json(raw, source=path)
        self.flat.load_state_tensors(tensors, source=path)
        if state.n_threads is not None and int(state.n_threads) != self.n_threads:
            self.events.emit("threads_changed", f"the checkpoint was written with {state.n_threads} threads, this "
                             f"run uses {self.n_threads}: results will not be bitwise identical to an uninterrupted "
                             "run", old=int(state.n_threads), new=self.n_threads)
        # what may change is applied from the resume step on, with a warning naming old -> new
        for event, message, fields in resume_mod.changed_settings(saved, now, defaults, state.step):
            self.events.emit(event, message, **fields)
        return state

    def _resolved_config(self, vocab_size: int):
        """The config with everything that was inferred made explicit (absolute paths, V, threads)."""
        d = config_mod.config_to_dict(self.cfg)
        d["run"]["out_dir"] = _abspath(d["run"]["out_dir"])
        d["run"]["threads"] = self.n_threads
        d["model"]["vocab_size"] = vocab_size
        if d["model"]["init_from"]:
            d["model"]["init_from"] = _abspath(d["model"]["init_from"])
        d["model"]["dt_rank"] = resolve_dt_rank(d["model"]["layer"], d["model"]["d_model"], d["model"]["dt_rank"])
        for k in ("train", "val", "tokenizer"):
            if d["data"][k]:
                d["data"][k] = _abspath(d["data"][k])
        return config_mod.config_from_dict(d)

    def _say(self, msg: str) -> None:
        """Console output, best effort (rtrainer/console.py): a closed or broken console never
        stops the run."""
        if self.console:
            stream = sys.stderr if msg.startswith("rtrainer:") else sys.stdout
            if self.progress is not None:
                self.progress.write(msg, stream)   # above a live bar
            else:
                console_mod.say(msg, stream)


class _NoMetrics:
    """The metrics of a rank other than 0: nothing is written."""

    closed = False

    def write(self, record):
        pass

    def offset(self):
        return 0

    def sha256(self):
        return None

    def close(self):
        pass


def _fault_point(step: int, flat: FlatParams) -> None:
    """The step faults of rtrainer.faults (RTRAINER_FAULT), once step N is complete and its
    checkpoint, if due, written: after_step=N:SIGNAL sends a real signal to this process,
    nan_param_after_step=N:TENSOR fills a parameter with NaN."""
    kind, n, arg = faults.parse()
    if not n.isdigit() or int(n) != step:
        return
    only = os.environ.get("RTRAINER_FAULT_RANK", "").strip()   # multi-process runs: on this rank only
    if only and only != str(dist_mod.detect_launcher().rank):
        return
    if kind == "after_step":
        os.kill(os.getpid(), getattr(signal, "SIG" + (arg or "KILL").upper()))
    elif kind == "nan_param_after_step":
        flat.params[arg][...] = np.nan


def _abspath(p: str) -> str:
    return str(Path(os.path.expanduser(p)).resolve())


def _json_float(x: float):
    return x if math.isfinite(x) else None

