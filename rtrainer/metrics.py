"""``metrics.jsonl``: one JSON object per line, written with orjson, flushed after every line.

A fresh run truncates the file. A resumed run truncates it to the byte offset stored in the
checkpoint it resumes from (:meth:`MetricsWriter.offset`, taken right before the checkpoint is
written), so lines logged after that checkpoint by the interrupted run (including half a line)
disappear and the file reads as if the run had never stopped.

Integrity: the writer keeps a running SHA-256 of everything in the file (:meth:`MetricsWriter.sha256`,
stored in the checkpoint next to the offset). On resume the first ``offset`` bytes are hashed and
compared with the checkpoint's value (``expect_sha256``); a checkpoint written before the checksum
existed has none, and then every line of that prefix must at least parse as JSON. A prefix that
fails (a flipped bit, garbage) is never silently continued: the file is renamed to
``metrics.jsonl.damaged-<time>`` (kept for inspection) and a new metrics file starts at the resume
point; :attr:`MetricsWriter.set_aside` names the damaged file and why, for the trainer's event.

Non-finite floats (nan, inf) are written as ``null`` (orjson's behaviour); numpy scalars and arrays
are accepted. Keys are only ever added, never renamed (the key set is documented in the README).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import orjson

from .errors import CheckpointError, RunIOError

__all__ = ["MetricsWriter", "read_metrics"]


class MetricsWriter:
    """Append-only JSONL writer. ``truncate_to=None``: fresh file; an int: resume at that offset
    (``expect_sha256``: the checkpoint's checksum of those bytes, None for an older checkpoint)."""

    def __init__(self, path: str | os.PathLike, truncate_to: int | None = None, expect_sha256: str | None = None):
        self.path = os.fspath(path)
        self._hash = hashlib.sha256()
        self.set_aside: tuple[str, str] | None = None   # (damaged file's new name, what was wrong)
        try:
            if truncate_to is not None and truncate_to > 0 and os.path.exists(self.path):
                problem = _check_prefix(self.path, int(truncate_to), expect_sha256, self._hash)
                if problem is not None:
                    moved, k = f"{self.path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}", 1
                    while os.path.lexists(moved):
                        moved, k = f"{self.path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{k}", k + 1
                    os.rename(self.path, moved)
                    self.set_aside = (moved, problem)
                    self._hash = hashlib.sha256()
                    truncate_to = None
            if truncate_to is None:
                self._fh = open(self.path, "wb")
            else:
                truncate_to = int(truncate_to)
                try:
                    size = os.path.getsize(self.path)
                except FileNotFoundError:
                    size = 0
                    if truncate_to > 0:
                        raise CheckpointError(
                            f"{self.path}: metrics file is missing but the checkpoint expects "
                            f"{truncate_to} bytes"
                        ) from None
                if truncate_to < 0 or size < truncate_to:
                    raise CheckpointError(
                        f"{self.path}: metrics file is {size} bytes, shorter than the "
                        f"checkpoint's offset {truncate_to}"
                    )
                self._fh = open(self.path, "ab")
                self._fh.truncate(truncate_to)
                self._fh.seek(0, os.SEEK_END)
        except OSError as e:
            raise RunIOError(f"cannot open {self.path}: {e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and flush it to the OS."""
        line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as e:
            raise RunIOError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._hash.update(line)

    def sha256(self) -> str:
        """SHA-256 (hex) of the file's content so far: what :meth:`offset` counts."""
        return self._hash.hexdigest()

    def offset(self) -> int:
        """Flush and fsync, then return the file's length in bytes (store it in the checkpoint)."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            return os.fstat(self._fh.fileno()).st_size
        except OSError as e:
            raise RunIOError(f"cannot sync {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError as e:
                raise RunIOError(f"cannot close {self.path}: {e.strerror or e}") from None

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_prefix(path: str, n: int, expect: str | None, h) -> str | None:
    """Hash the first n bytes of path into h; what is wrong with them, or None. Without a
    recorded checksum, every line must parse."""
    with open(path, "rb") as fh:
        left = n
        tail = b""
        while left > 0:
            b = fh.read(min(left, 1 << 22))
            if not b:
                return None   # shorter than the offset: the size check names it
            h.update(b)
            left -= len(b)
            if expect is None:
                lines = (tail + b).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    if line.strip():
                        try:
                            orjson.loads(line)
                        except orjson.JSONDecodeError:
                            return f"a line is not JSON ({line[:40]!r})"
    if expect is None:
        if tail.strip():
            return "the checkpoint's offset is not at the end of a line"
        return None
    if h.hexdigest() != expect:
        return f"its first {n} bytes do not match the checkpoint's checksum"
    return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file (blank lines skipped); ValueError names a bad line."""
    path = os.fspath(path)
    out = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    return out
