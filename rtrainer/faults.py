"""Fault injection for the crash tests (docs/checkpoints.md, crash safety), driven by one environment
variable so that a parent process can make a real training process fail at an exact moment:

    RTRAINER_FAULT=after_step=N:SIG           once step N is complete (its checkpoint, if due, written),
                                              the process sends itself SIGNAL (KILL, TERM or INT)
    RTRAINER_FAULT=nan_param_after_step=N:T   once step N is complete, parameter T is filled with NaN
    RTRAINER_FAULT=nan_loss_at_step=N         step N's loss is NaN (after its backward, before the update)
    RTRAINER_FAULT=nan_grad_at_step=N:T       step N's gradient of parameter T is NaN
    RTRAINER_FAULT=kill_at=POINT:N            the N-th time (1-based) the process reaches the named
                                              point, it sends itself SIGKILL (no cleanup runs)
    RTRAINER_FAULT=enospc_at=POINT:N          the N-th time it reaches POINT, the write in progress fails
                                              with OSError(ENOSPC), as on a full disk

Named points, in the order a checkpoint commit reaches them (rtrainer.checkpoint):

    ckpt.after_tensors     model.safetensors is written and fsynced in the temporary directory
    ckpt.before_manifest   about to write MANIFEST.json (the commit record)
    ckpt.after_manifest    MANIFEST.json written and fsynced, the directory not yet renamed
    ckpt.before_rename     the temporary directory is fsynced, about to be renamed to step-N
    ckpt.after_rename      step-N exists and checkpoints/ is fsynced; run_state.json not yet updated
    ckpt.after_run_state   run_state.json and the pointers are updated; retention not yet run
    ckpt.mid_retention     an old checkpoint has been renamed to .trash-*, not yet deleted

Without the variable every call is a cheap no-op. Signals are real (os.kill on our own pid), so
what the tests see is what a user sees when the machine kills the process.
"""
from __future__ import annotations

import errno
import os
import signal

__all__ = ["point", "POINTS", "parse"]

POINTS = ("ckpt.after_tensors", "ckpt.before_manifest", "ckpt.after_manifest", "ckpt.before_rename",
          "ckpt.after_rename", "ckpt.after_run_state", "ckpt.mid_retention")

_counts: dict[str, int] = {}


def parse() -> tuple[str, str, str]:
    """(kind, name-or-step, argument) of RTRAINER_FAULT, or ("", "", "") when unset."""
    kind, _, rest = os.environ.get("RTRAINER_FAULT", "").partition("=")
    where, _, arg = rest.rpartition(":") if kind in ("kill_at", "enospc_at") else rest.partition(":")
    return kind, where, arg


def point(name: str, path: str = "") -> None:
    """Mark that the process reached the named point; injects the configured fault there."""
    kind, where, arg = parse()
    if kind not in ("kill_at", "enospc_at") or where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if str(_counts[name]) != (arg or "1"):
        return
    if kind == "kill_at":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or name)
