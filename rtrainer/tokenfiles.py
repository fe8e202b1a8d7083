"""Token file formats: how one file on disk holds a 1-D sequence of integer token ids.

    txt   whitespace-separated integers, parsed into int64 (a shard directory converts them once
          to a little-endian uint32 cache, see :mod:`rtrainer.shards`)
    u8    raw bytes, one token per byte (byte-level text, V = 256)
    u16   raw little-endian uint16 (nanoGPT ``.bin``)
    u32   raw little-endian uint32
    npy   a 1-D integer ``.npy`` array (its data is read in place after the header)
    auto  by extension: .txt -> txt, .npy -> npy, .bin -> u16

Binary files are never read whole: :func:`npy_layout` and :func:`raw_layout` only read the header
and the size; the tokens are memory-mapped later by the reader. Every problem is a
:class:`~rtrainer.errors.DataError` that names the file and, where there is one, the offset.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import DataError

__all__ = ["FORMATS", "RAW_DTYPES", "resolve_format", "check_readable", "read_text_tokens", "npy_layout",
           "raw_layout"]

#: Accepted values of ``data.format``.
FORMATS = ("auto", "txt", "u8", "u16", "u32", "npy")
#: dtype of each raw format.
RAW_DTYPES = {"u8": np.dtype(np.uint8), "u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
_AUTO = {".txt": "txt", ".npy": "npy", ".bin": "u16"}


def resolve_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """The concrete format of ``path``: ``fmt``, or inferred from the extension for "auto"."""
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _AUTO:
        raise DataError(f"cannot infer the format of {path}; set data.format")
    return _AUTO[ext]


def check_readable(path: str) -> int:
    """Size in bytes of a readable regular file, or a DataError naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"token file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read token file {path}: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise DataError(f"token file {path} is a directory")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read token file {path}: permission denied")
    return st.st_size


def read_text_tokens(path: str) -> np.ndarray:
    """A txt token file read whole into int64; DataError naming the first bad token."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DataError(f"cannot read token file {path}: {e.strerror or e}") from None
    parts = data.split()
    if not parts:
        raise DataError(f"{path}: empty token file (no tokens)")
    try:
        return np.array(parts, dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    # Slow path, only to name the first bad token.
    for i, p in enumerate(parts):
        text = p.decode("utf-8", "backslashreplace")
        try:
            v = int(p)
        except ValueError:
            raise DataError(f"{path}: token #{i} ('{text}') is not an integer") from None
        if not -(2**63) <= v < 2**63:
            raise DataError(f"{path}: token #{i} ('{text}') does not fit in int64")
    raise DataError(f"{path}: cannot parse the tokens")  # pragma: no cover


def npy_layout(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, header bytes, tokens) of a 1-D integer .npy, read without loading it (and never
    unpickling anything)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            header = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a valid .npy token file ({e})") from None
    if len(shape) != 1:
        raise DataError(f"{path}: tokens must be a 1-D array, got shape {shape}")
    if dtype.hasobject or not np.issubdtype(dtype, np.integer):
        raise DataError(f"{path}: tokens must be integers, got dtype {dtype}")
    if shape[0] == 0:
        raise DataError(f"{path}: empty token file (no tokens)")
    size = os.path.getsize(path)
    if size - header != shape[0] * dtype.itemsize:
        raise DataError(f"{path}: holds {size - header} data bytes but its header says {shape[0]} tokens of "
                        f"{dtype.itemsize} bytes (truncated at byte offset {size})")
    return dtype.newbyteorder("=") if dtype.byteorder == "|" else dtype, header, int(shape[0])


def raw_layout(path: str, fmt: str, name: str | None = None) -> tuple[np.dtype, int, int]:
    """(dtype, 0, tokens) of a raw u8/u16/u32 file; ``name`` is what the errors call it."""
    name = path if name is None else name
    dtype = RAW_DTYPES[fmt]
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{name}: empty token file (no tokens)")
    if size % dtype.itemsize:
        raise DataError(f"{name}: size {size} bytes is not a multiple of {dtype.itemsize} (format {fmt}); "
                        f"a partial token at byte offset {size - size % dtype.itemsize}")
    return dtype, 0, size // dtype.itemsize
