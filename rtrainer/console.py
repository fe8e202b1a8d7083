"""Console output that can never stop a run.

Progress lines and warnings go to the terminal (stdout / stderr) on a best-effort basis: when
the reader of a console stream goes away (``rtrainer run x.toml | head -1``, a closed terminal,
``2>&-``), training carries on and loses nothing; the metrics file and the checkpoints are files,
and their write errors are never swallowed here.

When a write to a console stream fails with a broken pipe (EPIPE) or another OSError, the
stream's file descriptor is pointed at ``/dev/null`` (so that the interpreter's final flush at exit
cannot fail either) and every later write to it is skipped. A stream that is closed or missing
(``sys.stdout is None`` when the process was started with fd 1 closed) is skipped too.
"""
from __future__ import annotations

import os
import sys

__all__ = ["say", "silence", "is_dead", "Events"]

_dead: set[int] = set()   # fds of console streams that failed (pointed at /dev/null)


def silence(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null (best effort) and stop writing to it."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    _dead.add(fd)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except OSError:
        pass


def is_dead(stream) -> bool:
    if stream is None or getattr(stream, "closed", False):
        return True
    try:
        return stream.fileno() in _dead
    except (AttributeError, OSError, ValueError):
        return False


def say(msg: str, stream=None) -> bool:
    """Write one line to a console stream (default: stdout); True if it was written. Never raises
    for a broken or closed console stream."""
    if stream is None:
        stream = sys.stdout
    if is_dead(stream):
        return False
    try:
        stream.write(msg + "\n")
        stream.flush()
        return True
    except (OSError, ValueError):   # BrokenPipeError, EIO of a vanished terminal, a closed file
        silence(stream)
        return False


class Events:
    """Warnings and integrity events of one run segment. Each one is

    * printed on stderr as ``rtrainer: warning: <message>`` whatever the console mode (quiet and
      headless runs silence progress lines, never warnings);
    * written to metrics.jsonl as ``{"kind": "event", "step": S, "event": NAME, "message": TEXT,
      ...fields}`` (events that happen before the metrics file is open, e.g. while the checkpoint to
      resume is chosen, are written as soon as it is, right after the resume point);
    * listed in summary.json under ``"events"`` (the same records without ``"kind"``).
    """

    def __init__(self, printed: bool = True):
        self.printed = printed   # False on the ranks of a multi-process job other than 0 (rank 0 speaks)
        self.items: list[dict] = []
        self._writer = None
        self._pending: list[dict] = []

    def emit(self, event: str, message: str, step: int | None = None, **fields) -> dict:
        rec = {"kind": "event", "step": step, "event": event, "message": message, **fields}
        self.items.append({k: v for k, v in rec.items() if k != "kind"})
        if self.printed:
            say(f"rtrainer: warning: {message}", sys.stderr)
        if self._writer is not None and not self._writer.closed:
            self._writer.write(rec)
        else:
            self._pending.append(rec)
        return rec

    def attach(self, writer, step: int | None = None) -> None:
        """From now on, events go to ``writer`` too; the pending ones are written first (their
        step, if unknown when they happened, is the step the segment starts at)."""
        self._writer = writer
        for rec in self._pending:
            if rec["step"] is None:
                rec["step"] = step
            writer.write(rec)
        for item in self.items:
            if item["step"] is None:
                item["step"] = step
        self._pending.clear()
