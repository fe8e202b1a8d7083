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

__all__ = ["say", "silence", "is_dead"]

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
