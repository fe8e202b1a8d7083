"""Checkpoint files and small JSON files, written atomically and verified on load.

A checkpoint is ONE safetensors file (no pickle: loading never runs code) holding named tensors
(float32 parameters and moments, integer buffers) and, in the safetensors header metadata::

    format       "rtrainer-checkpoint"
    schema       "1"
    state        JSON text of the caller's state dict plus "sha256" = {tensor name: hex sha256 of
                 the tensor's raw little-endian bytes}
    layout       JSON text {tensor name: [dtype, shape]}
    meta_sha256  hex sha256 of  state + "\\n" + layout  (a flipped bit in the header text is caught
                 as well as one in the payload: safetensors itself checks structure, not content)

The state is encoded with the standard ``json`` module, not orjson, so that Python integers wider
than 64 bits (numpy PCG64 generator states) and non-finite floats (``best_val_loss = inf``) round
trip exactly. The key ``"sha256"`` of the state is reserved.

Writes (:func:`save_checkpoint`, :func:`write_json_atomic`) go to ``.tmp-<name>-<random>`` in the
target's directory, are flushed and fsync'd, ``os.replace``'d onto the final name, and then the
directory is fsync'd: a reader sees the old file or the new one, never half of one. Any OSError
(ENOSPC, EACCES, ...) removes the temp file and raises :class:`~rtrainer.errors.RunIOError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from typing import Any, Mapping

import numpy as np
import orjson

from .errors import CheckpointError, RunIOError

__all__ = [
    "FORMAT",
    "SCHEMA",
    "save_checkpoint",
    "load_checkpoint",
    "write_json_atomic",
    "write_text_atomic",
    "read_json",
    "atomic_write_bytes",
    "fsync_dir",
]

FORMAT = "rtrainer-checkpoint"
SCHEMA = "1"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the rename is still atomic.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _open_temp(path: str) -> tuple[int, str]:
    directory, name = os.path.split(path)
    while True:
        tmp = os.path.join(directory, f".tmp-{name}-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + replace + dir fsync).

    On OSError the temp file is removed, any previous file at ``path`` is left untouched, and
    RunIOError is raised naming the path and the OS error.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path)
    tmp = None
    try:
        fd, tmp = _open_temp(path)
        with os.fdopen(fd, "wb") as fh:
            view = memoryview(data)
            while view:
                n = fh.write(view)
                view = view[n:]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(directory)
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        reason = f"{e.strerror} [errno {e.errno}]" if e.strerror else str(e)
        raise RunIOError(f"cannot write {path}: {reason}") from None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _le_contiguous(name: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(
            f"checkpoint tensor {name!r} must be a numpy array, got {type(arr).__name__}"
        )
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        arr = arr.copy(order="C")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def _digest(arr: np.ndarray) -> str:
    # raw bytes of a C-contiguous little-endian array (0-d and empty arrays included)
    return hashlib.sha256(arr.reshape(-1).view(np.uint8)).hexdigest()


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> None:
    """Write a checkpoint atomically: ``tensors`` (name -> array) and a JSON-able ``state``.

    Raises RunIOError if the file cannot be written (nothing is left under ``path`` or the temp
    name; a previous checkpoint at ``path`` survives), TypeError/ValueError for bad arguments.
    """
    from safetensors.numpy import save as st_save

    path = os.fspath(path)
    if "sha256" in state:
        raise ValueError("checkpoint state key 'sha256' is reserved")
    arrays = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"checkpoint tensor names must be non-empty strings, got {name!r}")
        arrays[name] = _le_contiguous(name, arr)
    full_state = dict(state)
    full_state["sha256"] = {name: _digest(a) for name, a in arrays.items()}
    state_text = json.dumps(full_state, default=_json_default, sort_keys=True)
    layout_text = json.dumps(
        {name: [a.dtype.str, list(a.shape)] for name, a in arrays.items()}, sort_keys=True
    )
    metadata = {
        "format": FORMAT,
        "schema": SCHEMA,
        "state": state_text,
        "layout": layout_text,
        "meta_sha256": hashlib.sha256((state_text + "\n" + layout_text).encode()).hexdigest(),
    }
    atomic_write_bytes(path, st_save(arrays, metadata=metadata))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(tensors, state)`` (state without "sha256").

    Raises CheckpointError: ``checkpoint not found: {path}``; ``{path}: not a valid rtrainer
    checkpoint ({reason})`` for anything that is not an intact safetensors file of this format and
    schema; ``{path}: tensor '{name}' is corrupt (checksum mismatch)``.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path}")

    def invalid(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid rtrainer checkpoint ({reason})")

    if os.path.isdir(path):
        raise invalid("it is a directory")
    try:
        with safe_open(path, framework="numpy") as fh:
            meta = fh.metadata() or {}
            names = list(fh.keys())
            if meta.get("format") != FORMAT:
                raise invalid(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            if meta.get("schema") != SCHEMA:
                raise CheckpointError(
                    f"{path}: checkpoint schema {meta.get('schema')!r} is not supported "
                    f"(this rtrainer reads schema {SCHEMA!r})"
                )
            state_text, layout_text = meta.get("state"), meta.get("layout")
            if not isinstance(state_text, str) or not isinstance(layout_text, str):
                raise invalid("header metadata lacks state/layout")
            digest = hashlib.sha256((state_text + "\n" + layout_text).encode()).hexdigest()
            if digest != meta.get("meta_sha256"):
                raise invalid("header metadata checksum mismatch")
            tensors = {name: fh.get_tensor(name) for name in names}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' SafetensorError, OSError, ...
        raise invalid(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    try:
        state = json.loads(state_text)
        layout = json.loads(layout_text)
    except ValueError as e:
        raise invalid(f"header state is not JSON: {e}") from None
    sums = state.pop("sha256", None) if isinstance(state, dict) else None
    if not isinstance(sums, dict) or not isinstance(layout, dict):
        raise invalid("header state lacks the tensor checksums")
    if set(sums) != set(tensors) or set(layout) != set(tensors):
        missing = sorted(set(sums) ^ set(tensors))
        raise invalid(f"tensor list does not match the header (differs in {missing[:5]})")
    for name in names:
        arr = tensors[name]
        if layout[name] != [arr.dtype.str, list(arr.shape)]:
            raise invalid(f"tensor '{name}' has dtype/shape {arr.dtype.str}{list(arr.shape)}, "
                          f"header says {layout[name]}")
        if _digest(_le_contiguous(name, arr)) != sums[name]:
            raise CheckpointError(f"{path}: tensor '{name}' is corrupt (checksum mismatch)")
    return tensors, state


# --------------------------------------------------------------------------------------------
# JSON files (run_state.json, summary.json, ...)
# --------------------------------------------------------------------------------------------


def _nonfinite_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _nonfinite_to_none(obj.item())
    if isinstance(obj, np.ndarray):
        return _nonfinite_to_none(obj.tolist())
    if isinstance(obj, Mapping):
        return {k: _nonfinite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nonfinite_to_none(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temp + fsync + replace + dir fsync).

    orjson encodes it (numpy scalars/arrays allowed); non-finite floats become null. Integers wider
    than 64 bits (which orjson refuses, e.g. a PCG64 state) fall back to the standard json module
    with the same output conventions. Raises RunIOError if the file cannot be written.
    """
    try:
        data = orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as e:
        if "64-bit" not in str(e) and "Integer" not in str(e):
            raise
        data = json.dumps(_nonfinite_to_none(obj), indent=2, allow_nan=False).encode()
    atomic_write_bytes(path, data + b"\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (temp + fsync + replace + dir fsync), e.g. config.toml."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike, error: type[Exception] = CheckpointError) -> Any:
    """Read a JSON file; ``error`` (CheckpointError by default) names the file on any problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise error(f"file not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        # stdlib json, not orjson: orjson reads integers wider than 64 bits as floats (lossy).
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid JSON ({e})") from None
