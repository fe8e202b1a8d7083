"""``metrics.jsonl``: one JSON object per line, written with orjson, flushed after every line.

A fresh run truncates the file. A resumed run truncates it to the byte offset stored in the
checkpoint it resumes from (:meth:`MetricsWriter.offset`, taken right before the checkpoint is
written), so lines logged after that checkpoint by the interrupted run (including half a line)
disappear and the file reads as if the run had never stopped.

Non-finite floats (nan, inf) are written as ``null`` (orjson's behaviour); numpy scalars and arrays
are accepted. Keys are only ever added, never renamed (the key set is documented in the README).
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from .errors import CheckpointError, RunIOError

__all__ = ["MetricsWriter", "read_metrics"]


class MetricsWriter:
    """Append-only JSONL writer. ``truncate_to=None``: fresh file; an int: resume at that offset."""

    def __init__(self, path: str | os.PathLike, truncate_to: int | None = None):
        self.path = os.fspath(path)
        try:
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
