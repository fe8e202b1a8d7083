"""The live progress bar of a run (tqdm) and the closing message.

    bar = Progress(total_steps, initial=start_step, enabled=on_terminal(), tokens_per_step=B * T)
    bar.update(step, loss)                 # every step (tqdm redraws at most ~5 times a second)
    bar.validation(val_loss, val_acc)      # after each evaluation
    bar.write(line, stream)                # a log line printed above the bar, without breaking it
    bar.close()
    print(closing_message(summary, paths, total=total_steps))

The bar shows step/total, the last loss, the last validation, tokens/s, elapsed and ETA. It is only
drawn on a terminal (stdout and stderr both a TTY): off a terminal, or with ``enabled=False``,
``write`` is a plain line and nothing else is printed, so logs and pipes get exactly the plain
lines. The bar goes to stderr; the log lines keep their stream (stdout, or stderr for lines that
start with ``rtrainer:``). Like every console write (rtrainer/console.py) the bar is best effort:
a terminal that goes away removes the bar, never the run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import sys
import time

from . import console

__all__ = ["Progress", "on_terminal", "closing_message", "follow_up_commands"]


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals (the bar is only drawn then)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm bar over training steps (see the module docstring)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, tokens_per_step: int | None = None,
                 desc: str = "train"):
        self.total, self.initial = int(total), int(initial)
        self.tokens_per_step = tokens_per_step
        self.enabled = bool(enabled)
        self.loss = self.val_loss = self.val_acc = self.tok_s = None
        self._t0 = time.perf_counter()
        self.bar = None
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=False, smoothing=0.1, mininterval=0.2,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}{postfix}]")

    def update(self, step: int, loss: float | None = None, tok_s: float | None = None) -> None:
        """The run is at ``step`` with this training loss; ``tok_s`` defaults to the mean
        tokens/s since the bar started (from ``tokens_per_step``)."""
        if self.bar is None:
            return
        self.loss = loss if loss is not None else self.loss
        if tok_s is None and self.tokens_per_step:
            dt = time.perf_counter() - self._t0
            tok_s = (step - self.initial) * self.tokens_per_step / dt if dt > 0 else None
        self.tok_s = tok_s
        try:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(step - self.bar.n)
        except (OSError, ValueError):   # the terminal went away: no bar from now on
            self._drop()

    def validation(self, val_loss: float, val_acc: float | None = None) -> None:
        """Remember the last validation (shown until the next one)."""
        self.val_loss, self.val_acc = val_loss, val_acc
        if self.bar is not None:
            try:
                self.bar.set_postfix_str(self._postfix(), refresh=True)
            except (OSError, ValueError):
                self._drop()

    def _postfix(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}" if math.isfinite(self.loss) else f"loss {self.loss}")
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.4f}" + (f" acc {self.val_acc:.3f}" if self.val_acc is not None else ""))
        if self.tok_s:
            parts.append(f"{self.tok_s:,.0f} tok/s")
        return "  ".join(parts)   # tqdm puts ", " before a non-empty postfix

    def write(self, line: str, stream=None) -> None:
        """Print ``line`` (to ``stream``, default stdout) best effort; on a live bar, above it."""
        stream = stream if stream is not None else sys.stdout
        if self.bar is None:
            console.say(line, stream)
            return
        try:
            with self.bar.external_write_mode(file=stream):
                console.say(line, stream)
        except (OSError, ValueError):
            self._drop()
            console.say(line, stream)

    def close(self) -> None:
        if self.bar is not None:
            try:
                self.bar.close()
            except (OSError, ValueError):
                pass
            self.bar = None

    def _drop(self) -> None:
        """The bar's stream failed: stop drawing (the stream is silenced like any dead console)."""
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.disable = True
            console.silence(sys.stderr)


def _short(p: str | None) -> str | None:
    """A path relative to the current directory when it lies below it."""
    if not p:
        return p
    try:
        r = os.path.relpath(p)
    except ValueError:  # pragma: no cover - another drive
        return p
    return p if r.startswith("..") else r


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.5f}"


def follow_up_commands() -> tuple[str, ...]:
    """The commands on a trained model that this installation has (the closing message names only
    those): ``generate`` and ``export``, each if its module ``rtrainer.<name>`` exists."""
    return tuple(c for c in ("generate", "export") if importlib.util.find_spec(f"rtrainer.{c}") is not None)


def closing_message(summary: dict, paths: dict, total: int | None = None,
                    commands: tuple[str, ...] | None = None) -> str:
    """The lines printed when a run ends (each starting ``rtrainer:``): how it stopped, the best
    validation, where the model is, and the commands to resume (or continue), generate and export.

    ``summary`` is the run's summary.json dict (final_step, stop_reason, best_val_loss, last_val),
    ``paths`` its paths (out_dir, config, latest, best); ``total`` the planned steps; ``commands``
    the follow-up commands to name (default: :func:`follow_up_commands`)."""
    commands = follow_up_commands() if commands is None else commands
    step, reason = summary.get("final_step"), summary.get("stop_reason")
    out = _short(paths.get("out_dir"))
    cfg = _short(paths.get("config"))
    at = f"step {step}" + (f"/{total}" if total else "")
    what = {"completed": "finished", "early_stopping": "stopped early", "paused": "paused",
            "interrupted": "interrupted", "non_finite": "stopped on a non-finite loss or gradient"}.get(reason, reason)
    lines = [f"rtrainer: run {what} at {at} (stop_reason {reason})"]
    best, last = summary.get("best_val_loss"), summary.get("last_val") or {}
    if best is not None:
        best_dir = paths.get("best")
        where = f" at {os.path.basename(best_dir)}" if best_dir else ""
        lines.append(f"rtrainer: best val_loss {_fmt(best)}{where}; last val_loss {_fmt(last.get('val_loss'))} "
                     f"val_acc {_fmt(last.get('val_acc'))}")
    elif last:
        lines.append(f"rtrainer: last val_loss {_fmt(last.get('val_loss'))} val_acc {_fmt(last.get('val_acc'))}")
    else:
        lines.append("rtrainer: no validation (eval.val_every = 0 or no validation data)")
    if paths.get("best") and paths.get("best") == paths.get("latest"):
        models = [f"{_short(paths['best'])} (best and latest)"]
    else:
        models = [f"{_short(paths[k])} ({k})" for k in ("best", "latest") if paths.get(k)]
    lines.append("rtrainer: model: " + (", ".join(models) if models else "no checkpoint was written"))
    if paths.get("latest"):
        q = shlex.quote
        if reason in ("paused", "interrupted"):
            lines.append(f"rtrainer: resume:   rtrainer run {q(cfg)} --resume auto")
        else:
            more = f" --set train.steps={2 * total}" if total else ""
            lines.append(f"rtrainer: continue: rtrainer run {q(cfg)} --resume auto{more}")
        if "generate" in commands:
            lines.append(f"rtrainer: generate: rtrainer generate {q(out)} --prompt 'Once upon a time'")
        if "export" in commands:
            lines.append(f"rtrainer: export:   rtrainer export {q(out)} {q(os.path.join(out, 'export'))}")
    return "\n".join(lines)
