"""Token sources and batch streams.

Sources (:func:`load_tokens`), each a 1-D integer array:

    txt   whitespace-separated integers (the reference format); read whole into int64
    u8    raw bytes, one token per byte (byte-level text, V = 256)           memory-mapped
    u16   raw little-endian uint16 (nanoGPT ``.bin``)                         memory-mapped
    u32   raw little-endian uint32                                            memory-mapped
    npy   a 1-D integer ``.npy`` array (``np.load(mmap_mode="r")``)           memory-mapped
    auto  by extension: .txt -> txt, .npy -> npy, .bin -> u16

Binary sources are never read whole: a dataset larger than RAM trains with flat memory, and the
scans over all tokens (:func:`check_token_range`, :func:`max_token`) go chunk by chunk.

Streams hand out ``(ids, targets)`` pairs of int64 C-contiguous ``(B, T)`` arrays (fresh copies,
so the caller may keep or modify them):

* :class:`PackedStream` (training): consecutive packed windows of ``B*T + 1`` tokens, row b's last
  target is row b+1's first input; its cursor (:meth:`PackedStream.state`) is JSON-able and
  restores the stream exactly.
* :class:`FixedWindows` (validation): the same ``n_batches`` batches at every evaluation.

Every error is a :class:`~rtrainer.errors.DataError` that names the file (or stream) and, where
there is one, the token offset.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from .errors import DataError

__all__ = [
    "FORMATS",
    "resolve_format",
    "load_tokens",
    "check_token_range",
    "max_token",
    "split_tokens",
    "PackedStream",
    "FixedWindows",
]

#: Accepted values of ``data.format``.
FORMATS = ("auto", "txt", "u8", "u16", "u32", "npy")

_RAW_DTYPES = {"u8": np.dtype(np.uint8), "u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
_AUTO = {".txt": "txt", ".npy": "npy", ".bin": "u16"}

# Elements per chunk of the full-array scans: 4M tokens = 32 MB of int64 temporaries at most.
_CHUNK = 1 << 22


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


def _check_readable(path: str) -> int:
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


def _load_txt(path: str) -> np.ndarray:
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


def _load_raw(path: str, fmt: str, size: int) -> np.ndarray:
    dtype = _RAW_DTYPES[fmt]
    if size == 0:
        raise DataError(f"{path}: empty token file (no tokens)")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} "
            f"(format {fmt}: {dtype.itemsize}-byte tokens)"
        )
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot memory-map token file {path}: {e}") from None


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a valid .npy token file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: not a .npy array file")
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise DataError(f"{path}: empty token file (no tokens)")
    return arr


def load_tokens(path: str | os.PathLike, fmt: str = "auto") -> np.ndarray:
    """Load a token file as a 1-D integer array (int64 for txt; memory-mapped for the others).

    Raises DataError for a missing/unreadable file, an unknown or un-inferable format, an empty
    file, a bad text token (``token #i ('text') is not an integer``), a raw file whose size is not a
    multiple of the token size, or an ``.npy`` that is not a 1-D integer array.
    """
    path = os.fspath(path)
    kind = resolve_format(path, fmt)
    size = _check_readable(path)
    if kind == "txt":
        return _load_txt(path)
    if kind == "npy":
        return _load_npy(path)
    return _load_raw(path, kind, size)


def _chunks(tokens: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    n = len(tokens)
    for start in range(0, n, _CHUNK):
        yield start, np.asarray(tokens[start : start + _CHUNK])


def check_token_range(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    """Raise DataError at the first token id outside ``[0, vocab_size)``, naming ``path``.

    Scans chunk by chunk, so memory-mapped tokens stay flat in memory. The message gives the value
    and its offset (the token index in the file).
    """
    V = int(vocab_size)
    if V < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for start, c in _chunks(tokens):
        if c.size == 0:
            continue
        if c.min() >= 0 and c.max() < V:
            continue
        i = int(np.flatnonzero((c < 0) | (c >= V))[0])
        raise DataError(
            f"{path}: token id {int(c[i])} at offset {start + i} is outside [0, {V})"
        )


def max_token(tokens: np.ndarray) -> int:
    """The largest token id (a chunked scan; memory-mapped tokens stay flat in memory)."""
    if len(tokens) == 0:
        raise ValueError("max_token of an empty token array")
    return max(int(c.max()) for _, c in _chunks(tokens))


def split_tokens(tokens: np.ndarray, val_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``val_ratio`` of the tokens for validation (views, no copy).

    ``split = int(len * (1 - val_ratio))``; returns ``(tokens[:split], tokens[split:])``.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    split = int(len(tokens) * (1.0 - val_ratio))
    return tokens[:split], tokens[split:]


def _as_batch(w: np.ndarray, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (B*T+1,) -> ids, targets (B, T) int64 C-contiguous, independent copies."""
    w = np.asarray(w)
    ids = w[:-1].astype(np.int64).reshape(B, T)
    targets = w[1:].astype(np.int64).reshape(B, T)
    return ids, targets


class PackedStream:
    """Packed contiguous training windows over one token array.

    Each batch is one window ``w = tokens[pos : pos + B*T + 1]``:
    ``ids = w[:-1].reshape(B, T)``, ``targets = w[1:].reshape(B, T)`` — row b's last target is row
    b+1's first input, and no token is used twice as a target within an epoch. After a batch,
    ``pos += B*T``; when the next window would run past the end (``pos + B*T + 1 > len``) the stream
    wraps to ``pos = 0`` and ``epoch += 1``: the tail shorter than one batch is skipped in that
    epoch (the order is fixed, so the same tail is skipped every epoch).

    The cursor (:meth:`state`) always points at the next batch to deliver; restoring it with
    :meth:`set_state` on a stream over the same tokens reproduces the following batches exactly.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, name: str = "train"):
        self.tokens = tokens
        self.batch_size = B = int(batch_size)
        self.seq_len = T = int(seq_len)
        self.name = str(name)
        if B < 1 or T < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {B}, {T}")
        need = B * T + 1
        if len(tokens) < need:
            raise DataError(
                f"{self.name}: {len(tokens)} tokens are too few for one batch of "
                f"batch_size {B} x seq_len {T} (needs at least {need})"
            )
        self.pos = 0
        self.epoch = 0
        self.batches = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def batches_per_epoch(self) -> int:
        """Batches delivered before each wrap."""
        return (len(self.tokens) - 1) // self.tokens_per_batch

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, targets)``, each (B, T) int64 C-contiguous; advances the cursor."""
        BT = self.tokens_per_batch
        ids, targets = _as_batch(
            self.tokens[self.pos : self.pos + BT + 1], self.batch_size, self.seq_len
        )
        self.batches += 1
        self.pos += BT
        if self.pos + BT + 1 > len(self.tokens):
            self.pos = 0
            self.epoch += 1
        return ids, targets

    def state(self) -> dict[str, Any]:
        """JSON-able cursor: ``pos``, ``epoch``, ``batches`` (+ the shape it was taken with)."""
        return {
            "pos": self.pos,
            "epoch": self.epoch,
            "batches": self.batches,
            "n_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def set_state(self, d: dict[str, Any]) -> None:
        """Restore a cursor from :meth:`state`; DataError if it does not fit these tokens."""
        if not isinstance(d, dict):
            raise DataError(f"{self.name}: stream state must be an object, got {type(d).__name__}")
        vals = {}
        for key in ("pos", "epoch", "batches"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(
                    f"{self.name}: stream state {key!r} must be a non-negative integer, got {v!r}"
                )
            vals[key] = v
        n = d.get("n_tokens")
        if n is not None and n != len(self.tokens):
            raise DataError(
                f"{self.name}: stream state was saved for {n} tokens but the data has "
                f"{len(self.tokens)} (the data file changed since the checkpoint)"
            )
        BT = self.tokens_per_batch
        if vals["pos"] + BT + 1 > len(self.tokens):
            raise DataError(
                f"{self.name}: stream position {vals['pos']} is out of range for "
                f"{len(self.tokens)} tokens and batches of {BT}+1 tokens"
            )
        self.pos, self.epoch, self.batches = vals["pos"], vals["epoch"], vals["batches"]


class FixedWindows:
    """A fixed set of validation batches: the same windows at every evaluation.

    ``n_batches * B`` windows of ``T + 1`` tokens start at
    ``np.linspace(0, len - T - 1, n_batches * B)`` (rounded down to ints), i.e. evenly spread over
    the whole array; batch k holds windows ``k*B .. k*B + B - 1``. Windows may overlap when the
    array is short.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, name: str = "val"
    ):
        self.tokens = tokens
        self.batch_size = B = int(batch_size)
        self.seq_len = T = int(seq_len)
        self.n_batches = int(n_batches)
        self.name = str(name)
        if B < 1 or T < 1 or self.n_batches < 1:
            raise ValueError(
                f"batch_size, seq_len and n_batches must be >= 1, got {B}, {T}, {n_batches}"
            )
        if len(tokens) < T + 1:
            raise DataError(
                f"{self.name}: {len(tokens)} tokens are too few for one validation window of "
                f"seq_len {T} (needs at least {T + 1})"
            )
        n = self.n_batches * B
        # (n,) window starts, fixed at construction.
        self.starts = np.linspace(0, len(tokens) - T - 1, n).astype(np.int64)

    def __len__(self) -> int:
        return self.n_batches

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids, targets)``, each (B, T) int64 C-contiguous, ``n_batches`` times."""
        B, T = self.batch_size, self.seq_len
        offs = np.arange(T + 1, dtype=np.int64)
        for k in range(self.n_batches):
            # (B, T+1) token windows
            idx = self.starts[k * B : (k + 1) * B, None] + offs
            w = np.asarray(self.tokens[idx]).astype(np.int64)
            yield np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
