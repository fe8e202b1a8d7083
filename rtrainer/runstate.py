"""The checkpoint manager: what a run's checkpoints hold beyond the tensors, and the policy around them.

`checkpoint.py` knows how ONE checkpoint is committed and verified (manifest, atomic rename). This
module decides which checkpoints a run writes, keeps and resumes:

- `RunState`: the state schema, defined once, written (`to_json`) and read (`from_json`) from the
  same definition.
- `newest_valid(path)`: a run directory, its checkpoints/ directory, a step directory or a checkpoint
  file -> the newest checkpoint that verifies (Trainer resume, `Net.load` and `model.init_from`).
- `RunDir`: one run directory's checkpoints: the lock, the sweep of what a killed writer left, save
  (commit + run_state.json + best.json), retention, and the set-aside of a replaced timeline.
- `check_schema`: a checkpoint of another state schema is refused. What a resumed run may change
  (the frozen [model]/[head] sections) is decided in `resume.py`.

Extending the state: add a field to `RunState` WITH A DEFAULT; checkpoints written before the field
existed read it as that default, and the file format stays what it was (fields are written in
declaration order, so add new ones at the end).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from . import faults
from .errors import CheckpointError, RunLockedError

SCHEMA_VERSION = 1

_REQUIRED = object()


@dataclass
class RunState:
    """Everything the loop needs to continue exactly where a checkpoint was written.

    Fields without a default are required in every checkpoint; fields with a default are optional
    (a checkpoint written before the field existed reads it as the default)."""

    step: int
    optimizer_updates: int
    skipped: int
    best_val_loss: float                   # math.inf before the first validation (JSON: null)
    data: dict                             # {"train": the training stream's cursor}
    rng: dict                              # numpy bit_generator.state of the trainer's RNG
    metrics_offset: int                    # bytes of metrics.jsonl that belong to this checkpoint
    elapsed_s: float
    config: dict = field(default_factory=dict)   # the resolved run configuration
    bad_evals: int = 0
    best_step: int | None = None
    n_threads: int | None = None           # None: written by a version that did not record it
    staged: dict | None = None             # the staged policy's counters
    schema: int = SCHEMA_VERSION
    metrics_sha256: str | None = None      # of the first metrics_offset bytes (None: an older checkpoint)
    world_size: int | None = None          # processes of the run that wrote it (None: one, an older checkpoint)
    tokenizer: dict | None = None          # data.tokenizer's record: path, sha256, vocab_size, eod_id (None: bytes or ids, or an older checkpoint)

    # the order in which the fields are written (the order checkpoints have always had)
    _ORDER = ("schema", "step", "optimizer_updates", "skipped", "best_val_loss", "bad_evals", "best_step",
              "data", "rng", "metrics_offset", "metrics_sha256", "elapsed_s", "n_threads", "config", "staged")

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["best_val_loss"] = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        keys = list(self._ORDER) + [k for k in d if k not in self._ORDER]
        return {k: d[k] for k in keys}

    @classmethod
    def from_json(cls, d: dict, source: str = "checkpoint") -> "RunState":
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = d[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source}: the checkpoint state has no {f.name!r}")
        st = cls(**kw)
        st.best_val_loss = math.inf if st.best_val_loss is None else float(st.best_val_loss)
        for name in ("step", "optimizer_updates", "skipped", "metrics_offset", "bad_evals"):
            setattr(st, name, int(getattr(st, name)))
        st.elapsed_s = float(st.elapsed_s)
        return st


# ------------------------------------------------------------------------------ finding checkpoints
def is_search_dir(path: Path) -> bool:
    """A directory that holds step checkpoints (a run directory or its checkpoints/), as opposed to
    one step directory (committed by its manifest, or named step-N and partial)."""
    return path.is_dir() and not (path / ckpt.MANIFEST_FILE).exists() and not path.name.startswith("step-")


def checkpoints_dir(path: Path) -> Path:
    """A run directory -> its checkpoints/ directory; a checkpoints/ directory stays as it is."""
    sub = path / "checkpoints"
    return sub if sub.is_dir() else path


def newest_valid(path, on_skip: Callable[[str, CheckpointError], None] | None = None):
    """(path, tensors, state dict) of the checkpoint `path` names: a step directory or checkpoint
    file as it is, or the newest step checkpoint of a run / checkpoints directory that verifies
    (corrupt or partial ones are skipped, each reported to on_skip(path, error)). None when a
    directory holds no step checkpoint at all; CheckpointError when none of them verifies."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, step directory or run directory")
    if not is_search_dir(path):
        tensors, state = ckpt.load_checkpoint(str(path))
        return str(path), tensors, state
    d = checkpoints_dir(path)
    found = ckpt.find_checkpoints(d)
    problems = []
    for _, p in found:
        try:
            tensors, state = ckpt.load_checkpoint(p)
            return str(p), tensors, state
        except CheckpointError as e:
            problems.append(str(e))
            if on_skip is not None:
                on_skip(p, e)
    if found:
        raise CheckpointError(f"no valid checkpoint in {d}: " + "; ".join(problems))
    return None


def check_schema(path: str, state: dict) -> None:
    if state.get("schema") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema {state.get('schema')} is not {SCHEMA_VERSION}")


# ------------------------------------------------------------------------------ one run directory
class RunDir:
    """The checkpoints of one run directory: lock, sweep, save, retention, set-aside."""

    def __init__(self, out_dir, keep_last: int = 0, emit: Callable[..., None] | None = None):
        """`emit(event, message, **fields)` reports what the manager did on its own (leftovers
        removed, a corrupt checkpoint skipped, a replaced timeline set aside); the Trainer passes
        its `Events.emit`, which prints the warning and records it in metrics and summary."""
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.run_state_path = self.out_dir / "run_state.json"
        self.keep_last = keep_last
        self.emit = emit or (lambda event, message, **fields: None)
        self._lock = None

    # -- the lock
    def lock(self) -> None:
        """One writer per run directory: an exclusive flock on out_dir/.lock, kept open for the run.
        The lock dies with its holder, so a killed run never leaves the directory locked; the file
        records the holder so that a second run can name it."""
        import fcntl
        import socket

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / ".lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(f"run directory {self.out_dir} is in use by {holder} (lock {path}); wait for it, "
                                 "stop it, or set another run.out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- what is there
    def sweep(self) -> None:
        """Remove what a killed writer left: .tmp-* and .trash-*."""
        swept = ckpt.sweep(self.ckpt_dir)
        if swept:
            self.emit("leftovers_removed", f"removed {len(swept)} leftover temporary checkpoint file(s) in "
                      f"{self.ckpt_dir}: " + ", ".join(swept), paths=list(swept))

    def existing(self) -> list[tuple[int, str]]:
        """(step, path) of the committed step checkpoints, newest first."""
        return ckpt.find_checkpoints(self.ckpt_dir)

    def newest_valid(self):
        """--resume auto: (path, tensors, state) of the newest checkpoint that verifies, None if
        there is none yet; each skipped one is named in a warning."""
        if not self.ckpt_dir.is_dir():
            return None
        return newest_valid(self.ckpt_dir, self.skipped)

    def skipped(self, path, error: CheckpointError) -> None:
        """A checkpoint that does not verify was passed over by the newest-valid search."""
        self.emit("checkpoint_skipped", f"skipping {path}: {error}", path=str(path), reason=str(error))

    def owns(self, path: str) -> bool:
        """Whether a checkpoint belongs to this run directory (a resume continues it)."""
        return self.ckpt_dir.resolve() in Path(path).resolve().parents

    def best_path(self, best_step: int | None) -> str | None:
        if best_step is None:
            return None
        d = self.ckpt_dir / ckpt.step_dir_name(best_step)
        return str(d) if d.is_dir() else None

    # -- writing
    def save(self, tensors: dict, state: RunState, *, best: bool = False, extra: dict | None = None) -> str:
        """Commit one checkpoint (checkpoints/step-N, committed by its manifest), then run_state.json
        and, on an improvement, best.json (hints: the truth is the newest step-N that verifies),
        then retention. Returns the step directory."""
        js = state.to_json()
        path = ckpt.write_step_checkpoint(self.ckpt_dir, state.step, tensors, js, extra=extra)
        ckpt.write_json_atomic(self.run_state_path, {
            "step": state.step, "checkpoint": path, "data": js["data"],
            "best_val_loss": js["best_val_loss"], "best_step": state.best_step, "bad_evals": state.bad_evals})
        if best:
            ckpt.write_json_atomic(self.ckpt_dir / "best.json", {
                "step": state.step, "checkpoint": path, "val_loss": js["best_val_loss"]})
        faults.point("ckpt.after_run_state", path)
        self.apply_retention(state.best_step)
        return path

    def apply_retention(self, best_step: int | None) -> None:
        """Keep the newest `keep_last` step checkpoints and the best one; delete the rest (each
        renamed to .trash-* before removal, so a crash mid-delete leaves nothing that looks valid)."""
        if self.keep_last == 0:
            return
        for i, (step, path) in enumerate(self.existing()):
            if i >= self.keep_last and step != best_step:
                ckpt.retire(path)

    def retire_all(self, existing) -> None:
        """--overwrite: the old run's checkpoints must not be resumed later."""
        for _, path in existing:
            ckpt.retire(path)

    def set_aside_newer(self, step: int, existing) -> None:
        """Resuming at `step` of this run: step directories newer than it belong to a timeline that
        is being replaced (corrupt ones skipped by --resume auto, or later ones when an older
        checkpoint was named explicitly). They are renamed to `superseded-step-N-<time>` (kept for
        inspection, never resumed by `auto`, never deleted by retention)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s, path in existing:
            if s > step:
                new = self.ckpt_dir / f"superseded-{Path(path).name}-{stamp}"
                os.rename(path, new)
                ckpt.fsync_dir(str(self.ckpt_dir))
                self.emit("checkpoint_set_aside", f"{path} is newer than the checkpoint this run resumes "
                          f"from; moved to {new}", path=str(path), moved_to=str(new))
