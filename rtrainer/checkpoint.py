"""Checkpoints and small JSON files, written atomically and durably, verified on load.

A run's checkpoints are step directories committed by a manifest (the protocol in docs/checkpoints.md)::

    checkpoints/step-00000200/model.safetensors   tensors + the JSON state (below)
    checkpoints/step-00000200/MANIFEST.json       written LAST: each file's size and sha256, the
                                                  step, the thread count, and a hash of itself

:func:`write_step_checkpoint` writes both into ``checkpoints/.tmp-step-N-<random>/`` (each file
fsynced), fsyncs that directory, renames it to ``step-N`` and fsyncs ``checkpoints/``: the rename
is the commit, so a directory named ``step-N`` is complete, and the manifest lets a reader prove
it. :func:`find_checkpoints` lists them newest first, :func:`verify_step_dir` checks one,
:func:`sweep` removes what a killed writer left (``.tmp-*``, ``.trash-*``), :func:`retire` deletes
one by renaming it to ``.trash-*`` first (a crash mid-delete never leaves a half-deleted directory
that looks valid).

The tensor file is ONE safetensors file (no pickle: loading never runs code) holding named tensors
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
import re
import secrets
import shutil
from typing import Any, Mapping

import numpy as np
import orjson

from . import faults
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
    "TENSOR_FILE",
    "MANIFEST_FILE",
    "step_dir_name",
    "write_step_checkpoint",
    "verify_step_dir",
    "find_checkpoints",
    "sweep",
    "retire",
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
        verify_step_dir(path)
        return load_checkpoint(os.path.join(path, TENSOR_FILE))
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
# Step directories committed by a manifest
# --------------------------------------------------------------------------------------------

TENSOR_FILE = "model.safetensors"
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "rtrainer-checkpoint-manifest"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_durable(path: str, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_step_checkpoint(
    ckpt_dir: str | os.PathLike, step: int, tensors: Mapping[str, np.ndarray], state: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Commit one checkpoint as ``ckpt_dir/step-N`` (see the module docstring); returns its path.

    ``extra`` goes into the manifest (e.g. the thread count). If ``step-N`` exists already (a
    superseded attempt at the same step), it is retired after the new one is complete. On OSError
    the temporary directory is removed and RunIOError is raised; every earlier checkpoint is intact.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    tmp = os.path.join(ckpt_dir, f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}")
    final = os.path.join(ckpt_dir, step_dir_name(step))
    try:
        os.mkdir(tmp)
        save_checkpoint(os.path.join(tmp, TENSOR_FILE), tensors, state)
        faults.point("ckpt.after_tensors", tmp)
        size, digest = _file_digest(os.path.join(tmp, TENSOR_FILE))
        manifest = {"format": MANIFEST_FORMAT, "schema": int(SCHEMA), "step": int(step),
                    "files": {TENSOR_FILE: {"size": size, "sha256": digest}}, **dict(extra or {})}
        manifest["manifest_sha256"] = _manifest_hash(manifest)
        faults.point("ckpt.before_manifest", tmp)
        _write_durable(os.path.join(tmp, MANIFEST_FILE),
                       json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        faults.point("ckpt.after_manifest", tmp)
        fsync_dir(tmp)
        faults.point("ckpt.before_rename", tmp)
        if os.path.lexists(final):
            retire(final)
        os.rename(tmp, final)
        tmp = None
        fsync_dir(ckpt_dir)
        faults.point("ckpt.after_rename", final)
        return final
    except (OSError, RunIOError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RunIOError):
            raise
        reason = f"{e.strerror} [errno {e.errno}]" if e.strerror else str(e)
        raise RunIOError(f"cannot write checkpoint {final}: {reason}") from None


def verify_step_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Check a step directory against its manifest (present, self-consistent, every file's size
    and sha256); returns the manifest. Raises CheckpointError naming the directory and the fault."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST_FILE)

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid checkpoint ({reason})")

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(mpath, "rb") as fh:
            manifest = json.loads(fh.read())
    except FileNotFoundError:
        raise bad(f"{MANIFEST_FILE} is missing: the write never committed") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise bad(f"{MANIFEST_FILE} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"{MANIFEST_FILE} is not an rtrainer manifest")
    if manifest.get("manifest_sha256") != _manifest_hash(manifest):
        raise bad(f"{MANIFEST_FILE} checksum mismatch")
    if manifest.get("schema") != int(SCHEMA):
        raise CheckpointError(f"{path}: checkpoint schema {manifest.get('schema')!r} is not supported "
                              f"(this rtrainer reads schema {SCHEMA})")
    files = manifest.get("files")
    if not isinstance(files, dict) or TENSOR_FILE not in files:
        raise bad(f"{MANIFEST_FILE} lists no {TENSOR_FILE}")
    for name, entry in files.items():
        # names come from a file on disk: they must stay inside the directory
        if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", ".."):
            raise bad(f"{MANIFEST_FILE} names a file outside the directory: {name!r}")
        fpath = os.path.join(path, name)
        if os.path.islink(fpath):
            raise bad(f"{name} is a symbolic link")
        try:
            size, digest = _file_digest(fpath)
        except FileNotFoundError:
            raise bad(f"{name} is missing") from None
        except OSError as e:
            raise bad(f"{name} is unreadable: {e.strerror or e}") from None
        if size != entry.get("size"):
            raise bad(f"{name} is {size} bytes, the manifest says {entry.get('size')}")
        if digest != entry.get("sha256"):
            raise bad(f"{name} checksum mismatch")
    return manifest


def find_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Committed step directories in ``ckpt_dir`` as (step, path), newest first (not verified)."""
    ckpt_dir = os.fspath(ckpt_dir)
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out, reverse=True)


def sweep(ckpt_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted writer left in ``ckpt_dir`` (``.tmp-*`` and ``.trash-*``);
    returns their names. Call it only while holding the run-directory lock."""
    ckpt_dir = os.fspath(ckpt_dir)
    removed = []
    try:
        names = sorted(os.listdir(ckpt_dir))
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith((".tmp-", ".trash-")):
            p = os.path.join(ckpt_dir, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            removed.append(name)
    if removed:
        fsync_dir(ckpt_dir)
    return removed


def retire(path: str | os.PathLike) -> None:
    """Delete a checkpoint directory safely: rename to ``.trash-*`` (atomic; fsynced), then remove."""
    path = os.fspath(path)
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".trash-{name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_dir(parent)
    faults.point("ckpt.mid_retention", trash)
    shutil.rmtree(trash, ignore_errors=True)


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
