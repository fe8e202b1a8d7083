"""Shard sources: token files and shard directories, their verified manifest, the text cache, and
memory-mapped readers. What the stream reads from; the order it reads in is :mod:`rtrainer.stream`.

A **source** is a file or a shard directory. Each becomes a list of :class:`Shard` (a token range
of one file). Shards are memory-mapped lazily by a :class:`Mapper` (only those being read are
mapped, at most ``_MAX_MAPPED`` at once) and the pages already read are handed back to the kernel
(``madvise(MADV_DONTNEED)``) every ``_RELEASE_BYTES`` read from a shard, so resident memory stays
flat however large the dataset is: nothing is ever read whole. The file formats are
:mod:`rtrainer.tokenfiles`.

**Shard directory** ``DIR``: the regular files directly inside it whose name matches
``data.shard_glob`` (default: by ``data.format``: ``*.bin``, ``*.npy``, ``*.txt``), sorted by
name. ``DIR/.rtrainer/manifest.json`` records per shard its format, dtype, byte size, token count,
min and max token id and a blake2b checksum of every 4 MiB block; it is built on first use (or
by ``rtrainer prepare DIR``) and verified at every start: a size change, a changed block (checked
when the file's mtime moved, or always with ``data.verify = "full"``), an odd byte count, a
token id >= V, a path that escapes ``DIR`` (a symlink pointing outside, ``..`` in the manifest or
glob) are :class:`~rtrainer.errors.DataError` naming the shard and the offset. Text shards are
converted once to ``DIR/.rtrainer/<name>.u32`` (little-endian uint32) and streamed from there.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import json
import mmap
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from . import tokenfiles
from .errors import DataError

__all__ = [
    "Shard",
    "Mapper",
    "MANIFEST_DIR",
    "MANIFEST_NAME",
    "open_source",
    "prepare_dir",
    "split_shards",
    "check_shards_range",
    "shards_max_token",
    "fingerprint",
]

MANIFEST_DIR = ".rtrainer"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_BLOCK = 4 << 20            # checksum block (bytes) and scan chunk
_RELEASE_BYTES = 8 << 20    # madvise(DONTNEED) a shard's pages after this many bytes read from it
_MAX_MAPPED = 4             # shards mapped at once (least recently used are unmapped)
_DEFAULT_GLOBS = {"auto": ("*.bin", "*.npy", "*.txt"), "txt": ("*.txt",), "npy": ("*.npy",),
                  "u8": ("*.bin",), "u16": ("*.bin",), "u32": ("*.bin",)}


# =========================================================================================== shards
class Shard:
    """Tokens ``[lo, hi)`` of one file: raw little-endian integers from byte ``header`` on
    (``.bin``, the data of an ``.npy``, a text shard's cache), or an in-memory array (``array``)."""

    def __init__(self, name: str, path: str | None, dtype: np.dtype, header: int, n_file: int,
                 lo: int = 0, hi: int | None = None, array: np.ndarray | None = None,
                 max_id: int | None = None, min_id: int | None = None):
        self.name = name            # what error messages call it (the shard's own file)
        self.path = path            # the file the tokens are read from (a text shard: its cache)
        self.dtype = np.dtype(dtype)
        self.header = int(header)
        self.n_file = int(n_file)
        self.lo = int(lo)
        self.hi = self.n_file if hi is None else int(hi)
        self.array = array
        self.max_id = max_id        # of the whole file (manifest), None = unknown
        self.min_id = min_id

    @classmethod
    def from_array(cls, tokens: np.ndarray, name: str = "tokens") -> "Shard":
        """An in-memory 1-D integer array as one shard (tests, tools, a library caller's tokens)."""
        a = np.asarray(tokens)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name}: tokens must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        return cls(name, None, a.dtype, 0, len(a), array=a)

    def __len__(self) -> int:
        return self.hi - self.lo

    def sub(self, lo: int, hi: int) -> "Shard":
        """Tokens ``[lo, hi)`` of this shard (offsets relative to it)."""
        return Shard(self.name, self.path, self.dtype, self.header, self.n_file, self.lo + lo, self.lo + hi,
                     self.array, self.max_id, self.min_id)

    def key(self):
        return (self.path, self.header) if self.array is None else id(self.array)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(offset in the file, tokens) over ``[lo, hi)`` by plain reads of ``_BLOCK`` bytes: a
        full scan that never grows resident memory."""
        if self.array is not None:
            step = _BLOCK // 8
            for s in range(self.lo, self.hi, step):
                yield s, np.asarray(self.array[s:min(s + step, self.hi)])
            return
        step = _BLOCK // self.dtype.itemsize
        with open(self.path, "rb") as f:
            for s in range(self.lo, self.hi, step):
                n = min(step, self.hi - s)
                f.seek(self.header + s * self.dtype.itemsize)
                a = np.fromfile(f, dtype=self.dtype, count=n)
                if len(a) != n:
                    raise DataError(f"{self.name}: truncated: expected {n} tokens at offset {s}, read {len(a)}")
                yield s, a


class Mapper:
    """Memory mappings of the shards being read: lazily opened, at most ``_MAX_MAPPED`` kept,
    pages released every ``_RELEASE_BYTES`` read from one mapping. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._maps: "collections.OrderedDict[Any, list]" = collections.OrderedDict()  # key -> [mm, arr, bytes]

    def tokens(self, shard: Shard) -> np.ndarray:
        """The whole file's tokens (index with file offsets) as a read-only array on the mapping."""
        if shard.array is not None:
            return shard.array
        k = shard.key()
        with self._lock:
            ent = self._maps.get(k)
            if ent is None:
                try:
                    with open(shard.path, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise DataError(f"{shard.name}: cannot memory-map {shard.path}: {e}") from None
                need = shard.header + shard.n_file * shard.dtype.itemsize
                if len(mm) < need:
                    raise DataError(f"{shard.name}: {shard.path} has {len(mm)} bytes, expected {need} (it changed)")
                arr = np.frombuffer(mm, dtype=shard.dtype, count=shard.n_file, offset=shard.header)
                ent = self._maps[k] = [mm, arr, 0]
                while len(self._maps) > _MAX_MAPPED:
                    self._maps.popitem(last=False)  # unmapped once no reader holds its array
            else:
                self._maps.move_to_end(k)
            return ent[1]

    def account(self, shard: Shard, nbytes: int) -> None:
        """Count bytes read from a mapping; past ``_RELEASE_BYTES`` drop its resident pages (clean
        file pages: the next access faults them back from the page cache, same data)."""
        if shard.array is not None:
            return
        with self._lock:
            ent = self._maps.get(shard.key())
            if ent is None:
                return
            ent[2] += nbytes
            if ent[2] >= _RELEASE_BYTES:
                ent[2] = 0
                try:
                    ent[0].madvise(mmap.MADV_DONTNEED)
                except (AttributeError, OSError, ValueError):  # pragma: no cover - no madvise
                    pass

    def close(self) -> None:
        with self._lock:
            self._maps.clear()


# =========================================================================================== sources
def _file_shard(path: str, fmt: str) -> Shard:
    """One token file as a shard (text is parsed into memory)."""
    kind = tokenfiles.resolve_format(path, fmt)
    tokenfiles.check_readable(path)
    if kind == "txt":
        arr = tokenfiles.read_text_tokens(path)
        return Shard(path, None, arr.dtype, 0, len(arr), array=arr)
    dtype, header, n = tokenfiles.npy_layout(path) if kind == "npy" else tokenfiles.raw_layout(path, kind)
    return Shard(path, path, dtype, header, n)


def open_source(path: str, fmt: str = "auto", glob: str = "", verify: str = "quick") -> list[Shard]:
    """The shards of ``path``: a file (one shard) or a shard directory (through its manifest)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _dir_shards(path, fmt, glob, verify)
    return [_file_shard(path, fmt)]


# =========================================================================================== manifest
def _inside(root_real: str, p: str) -> bool:
    real = os.path.realpath(p)
    return os.path.commonpath([root_real, real]) == root_real and real != root_real


def _list_dir(d: str, fmt: str, glob: str) -> list[str]:
    """Names of the shard files directly in ``d`` (sorted); DataError for escaping paths."""
    root = os.path.realpath(d)
    globs = (glob,) if glob else _DEFAULT_GLOBS[fmt]
    for g in globs:
        if "/" in g or os.sep in g or g.startswith(".."):
            raise DataError(f"{d}: data.shard_glob {g!r} names a path outside the directory; give a file name "
                            "pattern such as '*.bin'")
    names = []
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        if e.name.startswith(".") or not any(fnmatch.fnmatchcase(e.name, g) for g in globs):
            continue
        p = os.path.join(d, e.name)
        if not _inside(root, p):
            raise DataError(f"{d}: shard {e.name} -> {os.path.realpath(p)} escapes the directory (offset 0)")
        if not os.path.isfile(p):
            continue
        names.append(e.name)
    if not names:
        raise DataError(f"{d}: no shard files matching {' or '.join(globs)} (set data.shard_glob or data.format)")
    return names


def _blocks(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        off = 0
        while True:
            b = f.read(_BLOCK)
            if not b:
                return
            yield off, b
            off += len(b)


def _digest(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def _checksums(path: str) -> list[str]:
    return [_digest(b) for _, b in _blocks(path)]


def _verify_blocks(path: str, name: str, expected: Sequence[str]) -> None:
    n = 0
    for n, (off, b) in enumerate(_blocks(path), 1):
        if n > len(expected) or _digest(b) != expected[n - 1]:
            raise DataError(f"{name}: content no longer matches the manifest at byte offset {off} (block of "
                            f"{_BLOCK} bytes changed since the manifest was built); rebuild it with "
                            f"`rtrainer prepare --rebuild {os.path.dirname(name)}`")
    if n != len(expected):  # pragma: no cover - the size check catches this first
        raise DataError(f"{name}: shorter than the manifest records")


def _convert_text(src: str, dst: str, name: str) -> None:
    """Whitespace-separated integers -> little-endian uint32, chunk by chunk (flat memory)."""
    tmp = f"{dst}.tmp{os.getpid()}"
    n = 0
    with open(src, "rb") as f, open(tmp, "wb") as out:
        carry = b""
        while True:
            b = f.read(_BLOCK)
            data = carry + b
            if b:
                cut = max(data.rfind(c) for c in (b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x0c"))
                carry, data = (data[cut + 1:], data[:cut + 1]) if cut >= 0 else (data, b"")
            else:
                carry = b""
            parts = data.split()
            if parts:
                try:
                    a = np.array(parts, dtype=np.int64)
                except (ValueError, OverflowError):
                    for i, p in enumerate(parts):
                        try:
                            int(p)
                        except ValueError:
                            raise DataError(f"{name}: token #{n + i} ('{p.decode('utf-8', 'backslashreplace')}') "
                                            "is not an integer") from None
                    raise DataError(f"{name}: a token near #{n} does not fit in 64 bits") from None
                bad = np.flatnonzero((a < 0) | (a >= 2**32))
                if len(bad):
                    i = int(bad[0])
                    raise DataError(f"{name}: token id {int(a[i])} at offset {n + i} is outside [0, 2^32)")
                a.astype("<u4").tofile(out)
                n += len(a)
            if not b:
                break
        out.flush()
        os.fsync(out.fileno())
    if n == 0:
        os.unlink(tmp)
        raise DataError(f"{name}: empty token file (no tokens)")
    os.replace(tmp, dst)


def _scan_entry(d: str, name: str, fmt: str) -> dict:
    """Manifest entry of one shard: layout, checksums, token count and id range."""
    p = os.path.join(d, name)
    label = os.path.join(d, name)
    kind = tokenfiles.resolve_format(p, fmt)
    st = os.stat(p)
    ent: dict[str, Any] = {"path": name, "format": kind, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "checksums": _checksums(p)}
    if kind == "txt":
        cache = os.path.join(MANIFEST_DIR, name + ".u32")
        _convert_text(p, os.path.join(d, cache), label)
        ent.update(cache=cache, cache_bytes=os.path.getsize(os.path.join(d, cache)),
                   cache_checksums=_checksums(os.path.join(d, cache)))
        dtype, header, n = np.dtype("<u4"), 0, ent["cache_bytes"] // 4
        src = os.path.join(d, cache)
    elif kind == "npy":
        dtype, header, n = tokenfiles.npy_layout(p)
        src = p
    else:
        dtype, header, n = tokenfiles.raw_layout(p, kind, label)
        src = p
    sh = Shard(label, src, dtype, header, n)
    lo, hi = None, None
    for _, c in sh.chunks():
        cmin, cmax = int(c.min()), int(c.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    ent.update(dtype=dtype.str, header=header, tokens=n, min_id=lo, max_id=hi)
    return ent


def _manifest_path(d: str) -> str:
    return os.path.join(d, MANIFEST_DIR, MANIFEST_NAME)


def _read_manifest(d: str) -> dict | None:
    p = _manifest_path(d)
    if not os.path.exists(p):
        return None
    try:
        with open(p, "rb") as f:
            m = json.loads(f.read())
        if m.get("version") != MANIFEST_VERSION or not isinstance(m.get("shards"), list):
            raise ValueError("unknown version or layout")
        return m
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable data manifest ({e}); rebuild it with "
                        f"`rtrainer prepare --rebuild {d}`") from None


def _write_manifest(d: str, m: dict) -> None:
    p = _manifest_path(d)
    tmp = f"{p}.tmp{os.getpid()}"  # two runs indexing the same directory do not share a temp file
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def prepare_dir(d: str, fmt: str = "auto", glob: str = "", rebuild: bool = False, verify: str = "full",
                say=None) -> dict:
    """Build (or bring up to date) and verify the manifest of shard directory ``d``; convert text
    shards to their binary cache. Returns the manifest."""
    d = os.fspath(d)
    if not os.path.isdir(d):
        raise DataError(f"{d}: not a directory")
    names = _list_dir(d, fmt, glob)
    old = None if rebuild else _read_manifest(d)
    by_name = {e.get("path"): e for e in old["shards"]} if old else {}
    root = os.path.realpath(d)
    for e in by_name.values():
        p = e.get("path")
        if not isinstance(p, str) or os.path.isabs(p) or ".." in p.split("/") or "/" in p or \
                not _inside(root, os.path.join(d, p)):
            raise DataError(f"{_manifest_path(d)}: shard path {p!r} escapes the directory {d} (offset 0)")
    try:
        os.makedirs(os.path.join(d, MANIFEST_DIR), exist_ok=True)
    except OSError as e:
        if old is None or set(names) - set(by_name):
            raise DataError(f"{d}: cannot write the data manifest ({e.strerror or e}); run `rtrainer prepare {d}` "
                            "where the directory is writable") from None
    entries, changed, added = [], old is None, old is None
    for name in names:
        e = by_name.get(name)
        if e is None:
            if say:
                say(f"rtrainer: indexing shard {os.path.join(d, name)}")
            e = _scan_entry(d, name, fmt)
            changed = added = True
        elif _verify_entry(d, e, fmt, verify):
            changed = True
        entries.append(e)
    others = sorted(set(by_name) - set(names))  # indexed, not selected by this glob / format
    missing = [n for n in others if not os.path.lexists(os.path.join(d, n))]
    if missing:
        raise DataError(f"{os.path.join(d, missing[0])}: shard listed in the data manifest is missing; rebuild it "
                        f"with `rtrainer prepare --rebuild {d}`")
    if changed:
        keep = [by_name[n] for n in others]
        try:
            _write_manifest(d, {"version": MANIFEST_VERSION, "block_bytes": _BLOCK,
                                "shards": sorted(entries + keep, key=lambda e: e["path"])})
        except OSError as e:
            if added:  # only new mtimes of verified shards are lost otherwise (a read-only directory)
                raise DataError(f"{d}: cannot write the data manifest ({e.strerror or e})") from None
    return {"version": MANIFEST_VERSION, "block_bytes": _BLOCK, "shards": entries}


def _verify_entry(d: str, e: dict, fmt: str, verify: str) -> bool:
    """Check one manifest entry against its file; True when the mtime moved (content verified)."""
    name = os.path.join(d, e["path"])
    kind = tokenfiles.resolve_format(name, fmt)
    if kind != e.get("format"):
        raise DataError(f"{name}: the manifest records format {e.get('format')!r} but data.format gives {kind!r}; "
                        f"rebuild it with `rtrainer prepare --rebuild {d}`")
    try:
        st = os.stat(name)
    except OSError as err:
        raise DataError(f"{name}: cannot read the shard ({err.strerror or err})") from None
    if st.st_size != e["bytes"]:
        raise DataError(f"{name}: size is {st.st_size} bytes but the manifest records {e['bytes']} (changed at byte "
                        f"offset {min(st.st_size, e['bytes'])}); rebuild it with `rtrainer prepare --rebuild {d}`")
    touched = st.st_mtime_ns != e["mtime_ns"]
    if verify == "full" or touched:
        _verify_blocks(name, name, e["checksums"])
        e["mtime_ns"] = st.st_mtime_ns  # same content: remember the new mtime
    if kind == "txt":
        cache = os.path.join(d, e.get("cache", ""))
        if not _inside(os.path.realpath(d), cache):
            raise DataError(f"{_manifest_path(d)}: cache path {e['cache']!r} escapes the directory {d} (offset 0)")
        if not os.path.exists(cache) or os.path.getsize(cache) != e["cache_bytes"]:
            raise DataError(f"{cache}: the binary cache of {name} is missing or has the wrong size; rebuild it with "
                            f"`rtrainer prepare --rebuild {d}`")
        if verify == "full":
            _verify_blocks(cache, cache, e["cache_checksums"])
    return touched


def _dir_shards(d: str, fmt: str, glob: str, verify: str) -> list[Shard]:
    m = prepare_dir(d, fmt, glob, verify=verify)
    out = []
    for e in m["shards"]:
        name = os.path.join(d, e["path"])
        src = os.path.join(d, e["cache"]) if e["format"] == "txt" else name
        out.append(Shard(name, src, np.dtype(e["dtype"]), e["header"], e["tokens"], max_id=e["max_id"],
                         min_id=e["min_id"]))
    return out


# =========================================================================================== checks
def split_shards(shards: list[Shard], val_ratio: float) -> tuple[list[Shard], list[Shard]]:
    """Hold out the last ``val_ratio`` of EVERY shard: ``split = int(len * (1 - val_ratio))``."""
    train, val = [], []
    for s in shards:
        k = int(len(s) * (1.0 - val_ratio))
        train.append(s.sub(0, k))
        if k < len(s):
            val.append(s.sub(k, len(s)))
    return train, val


def shards_max_token(shards: list[Shard]) -> int:
    """Largest token id (from the manifest when the whole file is used, else a chunked scan)."""
    best = None
    for s in shards:
        if s.max_id is not None and s.lo == 0 and s.hi == s.n_file:
            m = s.max_id
        else:
            m = max(int(c.max()) for _, c in s.chunks())
        best = m if best is None else max(best, m)
    return int(best)


def check_shards_range(shards: list[Shard], V: int) -> None:
    """DataError at the first token id outside ``[0, V)``: ``<shard>: token id X at offset N``."""
    for s in shards:
        if s.max_id is not None and s.min_id is not None and 0 <= s.min_id and s.max_id < V:
            continue
        for off, c in s.chunks():
            if c.size and (c.min() < 0 or c.max() >= V):
                i = int(np.flatnonzero((c < 0) | (c >= V))[0])
                raise DataError(f"{s.name}: token id {int(c[i])} at offset {off + i} is outside [0, {V})")


def fingerprint(shards: list[Shard]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in shards:
        h.update(f"{os.path.basename(s.name)}:{s.lo}:{s.hi}\n".encode())
    return h.hexdigest()


