"""``rtrainer tokenize``: UTF-8 text files -> a tokenizer and train / validation shard directories.

    rtrainer tokenize corpus/ --out data/tok --vocab-size 4096        # train a byte-level BPE
    rtrainer tokenize '*.txt' --out data/tok --tokenizer tokenizer.json   # encode with an existing one
    rtrainer tokenize book.txt --out data/bytes --bytes --doc-separator '\\n\\n'   # identity bytes

Inputs are files, directories (every regular file under them, recursively, in name order; names
starting with "." are skipped) and glob patterns. Each file is one **document**, or several when
``doc_separator`` is given (the separator is dropped). An end-of-document token follows every
document. The validation split takes whole documents: ``round(val_ratio * documents)`` of them (at
least one), chosen with a seeded generator.

Output (written into a temporary directory beside ``out`` and renamed into place at the end, so an
error leaves nothing behind and an existing directory is only replaced with ``overwrite``):

    out/train/train-000000.bin ...   little-endian u16 when V <= 65,536, else u32 (``data.format``)
    out/train/.rtrainer/manifest.json
    out/val/val-000000.bin ...       (when val_ratio > 0)
    out/tokenizer.json               the tokenizer (Hugging Face ``tokenizers`` format)
    out/meta.json                    V, dtype, special token ids, documents, tokens, input hashes

The text is read in chunks (``_CHUNK_BYTES``) and encoded piece by piece, so memory stays flat
whatever the corpus size. Pieces are cut only where a non-space character is followed by white
space, where byte-level BPE's pre-tokenizer splits anyway, so the ids equal those of encoding each
document whole (unless a run of more than ``_PIECE_CHARS`` characters holds no white space at
all: it is cut hard). Special-token text inside the documents (``<|endoftext|>`` written out) is encoded
as ordinary text: only the inserted end-of-document tokens carry the special id.
"""

from __future__ import annotations

import glob as glob_mod
import hashlib
import json
import os
import shutil
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ConfigError, DataError, RunIOError
from .tokenizer import EOD_TOKEN, Tokenizer, byte_tokenizer, load_tokenizer

__all__ = ["tokenize", "resolve_inputs", "parse_separator", "DEFAULT_VOCAB", "DEFAULT_SHARD_TOKENS"]

DEFAULT_VOCAB = 4096
DEFAULT_SHARD_TOKENS = 50_000_000
_CHUNK_BYTES = 4 << 20        # bytes read from a file at a time
_PIECE_CHARS = 1 << 16        # characters per piece handed to the encoder
_BATCH_CHARS = 1 << 20        # characters per encoder call: 16 pieces for the library's threads; the
                              # encodings of one call (ids, token strings, offsets) are what memory holds
_END = None                   # document boundary marker in the piece stream


# ============================================================================ inputs
def resolve_inputs(inputs: Sequence[str], exclude: str | None = None) -> list[str]:
    """Files of ``inputs`` (files, directories, glob patterns), deduplicated in order;
    DataError for one that matches nothing."""
    out, seen = [], set()
    skip = os.path.realpath(exclude) if exclude else None

    def add(p):
        real = os.path.realpath(p)
        if real in seen or (skip and (real == skip or real.startswith(skip + os.sep))):
            return
        seen.add(real)
        out.append(p)

    for spec in inputs:
        if os.path.isdir(spec):
            found = _walk(spec)
        elif os.path.exists(spec):
            found = [spec]
        elif glob_mod.has_magic(spec):
            found = []
            for p in sorted(glob_mod.glob(spec, recursive=True)):
                found += _walk(p) if os.path.isdir(p) else [p] if os.path.isfile(p) else []
        else:
            raise DataError(f"input not found: {spec}")
        if not found:
            raise DataError(f"input {spec} matches no files")
        for p in found:
            if not os.path.isfile(p):
                raise DataError(f"input {p} is not a regular file")
            add(p)
    if not out:
        raise DataError("no input files (every input is inside --out)")
    return out


def _walk(d: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")
                  and os.path.isfile(os.path.join(root, n))]
    return files


def parse_separator(s: str | None) -> str | None:
    """``--doc-separator`` with backslash escapes (``'\\n\\n'`` -> two newlines); None/'' = none."""
    if not s:
        return None
    try:
        sep = s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--doc-separator {s!r}: bad escape ({e.reason})") from None
    if not sep:
        raise ConfigError("--doc-separator is empty")
    return sep


# ============================================================================ reading
class _Reader:
    """Documents of the input files as a stream of text pieces and ``_END`` markers; validates
    UTF-8 (DataError naming the file and byte offset), hashes every file, counts documents."""

    def __init__(self, paths: list[str], sep: str | None, on_bytes: Callable[[int], None] | None = None):
        self.paths, self.sep, self.on_bytes = paths, sep, on_bytes
        self.hashes: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.documents = 0

    def _text(self, path: str) -> Iterator[str]:
        h = hashlib.sha256()
        size = 0
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"cannot read input {path}: {e.strerror or e}") from None
        with f:
            carry, base = b"", 0           # carry = an incomplete UTF-8 sequence at a chunk's end
            while True:
                try:
                    b = f.read(_CHUNK_BYTES)
                except OSError as e:
                    raise DataError(f"cannot read input {path}: {e.strerror or e}") from None
                h.update(b)
                size += len(b)
                data = carry + b
                cut = len(data)
                if b:  # hold back a trailing partial character (at most 3 bytes)
                    k = 1
                    while k <= min(3, len(data)) and (data[-k] & 0xC0) == 0x80:
                        k += 1
                    if k <= min(4, len(data)) and data[-k] >= 0xC0:
                        need = 2 if data[-k] < 0xE0 else 3 if data[-k] < 0xF0 else 4
                        if need > k:
                            cut = len(data) - k
                try:
                    text = data[:cut].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: invalid UTF-8 at byte offset {base + e.start} "
                                    f"({e.reason})") from None
                base += cut
                carry = data[cut:]
                if self.on_bytes:
                    self.on_bytes(len(b))
                if text:
                    yield text
                if not b:
                    break
        self.hashes[path] = h.hexdigest()
        self.sizes[path] = size

    def pieces(self) -> Iterator[str | None]:
        sep = self.sep
        for path in self.paths:
            has_text = False
            carry = ""
            for text in self._text(path):
                if sep is None:
                    has_text = True
                    yield text
                    continue
                parts = (carry + text).split(sep)
                carry = parts.pop()
                for p in parts:
                    if p:
                        yield p
                        has_text = True
                    if has_text:
                        yield _END
                        self.documents += 1
                        has_text = False
                if len(carry) >= len(sep):     # the separator may straddle chunks: keep its length - 1
                    keep = len(sep) - 1
                    head, carry = (carry[:-keep], carry[-keep:]) if keep else (carry, "")
                    yield head
                    has_text = True
            if carry:
                yield carry
                has_text = True
            if has_text:
                yield _END
                self.documents += 1


def _cut_point(s: str) -> int:
    """The last index i > 0 with s[i] white space and s[i - 1] not, or 0 if there is none."""
    p = max(s.rfind(" "), s.rfind("\n"))
    while p > 0:
        if not s[p - 1].isspace():
            return p
        p -= 1
    return 0


def _documents_as_pieces(pieces: Iterator[str | None]) -> Iterator[str | None]:
    """Re-cut the text of each document into pieces of about ``_PIECE_CHARS`` at safe points."""
    buf = ""
    for p in pieces:
        if p is _END:
            if buf:
                yield buf
                buf = ""
            yield _END
            continue
        buf += p
        i = 0
        while len(buf) - i > _PIECE_CHARS:
            c = _cut_point(buf[i:i + _PIECE_CHARS]) or _PIECE_CHARS   # no white space at all: a hard cut
            yield buf[i:i + c]
            i += c
        buf = buf[i:]
    if buf:  # pragma: no cover - every document ends with _END
        yield buf


# ============================================================================ writing
class _ShardWriter:
    """Token arrays -> ``DIR/PREFIX-NNNNNN.bin`` of ``shard_tokens`` tokens each (the last shard,
    if shorter than half of that, is appended to the one before)."""

    def __init__(self, d: str, prefix: str, dtype: np.dtype, shard_tokens: int):
        os.makedirs(d)
        self.d, self.prefix, self.dtype, self.cap = d, prefix, dtype, int(shard_tokens)
        self.names: list[str] = []
        self.counts: list[int] = []
        self._f = None
        self.tokens = 0

    def _open(self):
        name = f"{self.prefix}-{len(self.names):06d}.bin"
        self.names.append(name)
        self.counts.append(0)
        self._f = open(os.path.join(self.d, name), "wb")

    def write(self, a: np.ndarray) -> None:
        a = np.asarray(a, dtype=self.dtype)
        while len(a):
            if self._f is None or self.counts[-1] == self.cap:
                self._close_file()
                self._open()
            n = min(len(a), self.cap - self.counts[-1])
            a[:n].tofile(self._f)
            self.counts[-1] += n
            self.tokens += n
            a = a[n:]

    def _close_file(self):
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def close(self) -> None:
        self._close_file()
        if len(self.names) >= 2 and self.counts[-1] < self.cap // 2:
            last = os.path.join(self.d, self.names.pop())
            with open(last, "rb") as src, open(os.path.join(self.d, self.names[-1]), "ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.unlink(last)
            tail = self.counts.pop()
            self.counts[-1] += tail


def _encode_fn(tok: Tokenizer, dtype: np.dtype, eod_id: int | None) -> Callable[[list[str], list[bool]], np.ndarray]:
    """(pieces, ends) -> one token array: the ids of every piece, followed by the
    end-of-document id where ``ends`` is True. Bytes tokenizer: the UTF-8 bytes themselves (the
    same ids as the tokenizer.json, without the trip through the library)."""
    eod = [] if eod_id is None else [eod_id]
    if tok.is_bytes:
        def enc_bytes(pieces, ends):
            if not eod or not any(ends):
                return np.frombuffer("".join(pieces).encode("utf-8"), np.uint8).astype(dtype)
            parts = []
            for p, e in zip(pieces, ends):
                parts.append(np.frombuffer(p.encode("utf-8"), np.uint8).astype(dtype))
                if e:
                    parts.append(np.array(eod, dtype))
            return np.concatenate(parts)

        return enc_bytes
    hf = tok.hf
    hf.encode_special_tokens = True   # special-token text in the data is ordinary text
    fast = getattr(hf, "encode_batch_fast", None) or hf.encode_batch

    def enc(pieces, ends):
        encs = fast(pieces, add_special_tokens=False)
        parts = []
        for e, end in zip(encs, ends):
            parts.append(np.array(e.ids + eod if end else e.ids, dtype=dtype))
        return np.concatenate(parts)

    return enc


# ============================================================================ the command
def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _train_bpe(reader: _Reader, vocab_size: int, min_frequency: int, specials: list[str], show: bool,
               total: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    failure = []

    def texts():
        bar = _bar(show, total, "reading (BPE counts)")
        reader.on_bytes = bar.update
        try:
            for p in _documents_as_pieces(reader.pieces()):
                if p is not _END:
                    yield p
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the Rust library
            failure.append(e)
        finally:
            bar.close()
            reader.on_bytes = None

    hf.train_from_iterator(texts(), trainer)
    if failure:
        raise failure[0]
    return Tokenizer(hf)


def _steady_malloc() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB (a process-wide setting; a no-op where
    there is no ``mallopt``). By default glibc raises the threshold each time a large block is freed
    (up to 32 MiB); after that the read buffers and token arrays come from the heap, whose
    fragmentation made the peak RSS grow with the corpus (measured with --bytes: 107 MiB for 67 MB
    of text, 129 MiB for 268 MB; 93 MiB for both with the threshold fixed)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def tokenize(inputs: Sequence[str], out: str, *, vocab_size: int | None = None, tokenizer: str | None = None,
             use_bytes: bool = False, min_frequency: int = 2, special_tokens: Sequence[str] = (),
             eod: str | None = EOD_TOKEN, doc_separator: str | None = None, val_ratio: float = 0.05,
             seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False,
             progress: bool | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); returns the meta.json dict."""
    from .shards import prepare_dir

    say = say or (lambda m: None)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    _steady_malloc()
    # ---- every check on the arguments before any work
    modes = [m for m, on in (("--vocab-size", vocab_size is not None), ("--tokenizer", bool(tokenizer)),
                             ("--bytes", use_bytes)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other: train a BPE (--vocab-size), encode with an "
                          "existing tokenizer (--tokenizer) or use bytes (--bytes)")
    mode = "tokenizer" if tokenizer else "bytes" if use_bytes else "bpe"
    specials = ([eod] if eod else []) + [t for t in special_tokens if t != eod]
    if len(set(specials)) != len(specials):
        raise ConfigError("--special-token: the same token is given twice")
    if mode == "bpe":
        vocab_size = DEFAULT_VOCAB if vocab_size is None else int(vocab_size)
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"--vocab-size {vocab_size} is smaller than the 256 byte symbols plus "
                              f"{len(specials)} special token(s) = {256 + len(specials)}")
        if vocab_size > 2**32:
            raise ConfigError(f"--vocab-size {vocab_size} is larger than 2^32 (u32 token ids)")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1, got {min_frequency}")
    if not 0.0 <= val_ratio < 1.0:
        raise ConfigError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out = os.path.normpath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"--out {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another directory")
    paths = resolve_inputs(inputs, exclude=out)
    tok = None
    if mode == "tokenizer":
        tok = load_tokenizer(tokenizer)
        missing = [t for t in specials if tok.hf.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"{tokenizer}: the tokenizer has no token {missing[0]!r} (the end-of-document token: "
                              "name one it has with --eod, or pass --no-eod)")
    elif mode == "bytes":
        tok = byte_tokenizer(specials)

    parent = os.path.dirname(os.path.abspath(out))
    made = _missing_dirs(parent)   # created for the output, and removed again if it fails
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create {parent} ({e.strerror or e})") from None
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    total = 0
    for p in paths:
        total += os.path.getsize(p)
    try:
        try:
            os.makedirs(tmp)
            meta = _run(paths, tmp, out, mode, tok, vocab_size, min_frequency, specials, eod, doc_separator,
                        val_ratio, seed, shard_tokens, show, total, say, prepare_dir)
            _commit(tmp, out)
        except OSError as e:   # writing the output: disk full, permissions (reading errors are DataErrors)
            raise RunIOError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    return meta


def _missing_dirs(d: str) -> list[str]:
    """The ancestors of ``d`` (itself included) that do not exist yet, deepest first."""
    out = []
    while d and not os.path.exists(d):
        out.append(d)
        d = os.path.dirname(d)
    return out


def _run(paths, tmp, out, mode, tok, vocab_size, min_frequency, specials, eod, sep, val_ratio, seed, shard_tokens,
         show, total, say, prepare_dir) -> dict:
    # ---- pass 1: validate the UTF-8, hash, count documents (and train the BPE on the way)
    reader = _Reader(paths, sep)
    if mode == "bpe":
        say(f"rtrainer: training a byte-level BPE (vocab {vocab_size}, min frequency {min_frequency}) on "
            f"{len(paths)} file(s), {total:,} bytes")
        tok = _train_bpe(reader, vocab_size, min_frequency, specials, show, total)
    else:
        bar = _bar(show, total, "checking")
        reader.on_bytes = bar.update
        try:
            for _ in reader.pieces():
                pass
        finally:
            bar.close()
    n_docs = reader.documents
    hashes, sizes = dict(reader.hashes), dict(reader.sizes)
    if n_docs == 0:
        raise DataError(f"the inputs hold no text ({len(paths)} file(s), {total} bytes): nothing to tokenize")
    val_docs = np.empty(0, np.int64)
    if val_ratio > 0:
        if n_docs < 2:
            raise DataError(f"the inputs are one document, so none can be held out for validation "
                            f"(--val-ratio {val_ratio}): split the text with --doc-separator (e.g. '\\n\\n'), give "
                            "several files, or pass --val-ratio 0")
        n_val = min(max(1, round(val_ratio * n_docs)), n_docs - 1)
        val_docs = np.sort(np.random.default_rng(seed).choice(n_docs, n_val, replace=False))
    V = tok.vocab_size
    dtype = np.dtype("<u2") if V <= 1 << 16 else np.dtype("<u4")
    fmt = "u16" if dtype.itemsize == 2 else "u32"
    tok_path = os.path.join(tmp, "tokenizer.json")
    tok_sha = tok.save(tok_path)
    eod_id = tok.hf.token_to_id(eod) if eod else None
    eod_arr = np.array([eod_id] if eod_id is not None else [], dtype)

    # ---- pass 2: encode into the shards
    encode = _encode_fn(tok, dtype, eod_id)
    writers = {"train": _ShardWriter(os.path.join(tmp, "train"), "train", dtype, shard_tokens)}
    if len(val_docs):
        writers["val"] = _ShardWriter(os.path.join(tmp, "val"), "val", dtype, shard_tokens)
    docs = {"train": 0, "val": 0}
    reader2 = _Reader(paths, sep)
    bar = _bar(show, total, "encoding")
    reader2.on_bytes = bar.update
    doc, vi = 0, 0
    batch = {k: ([], [], [0]) for k in writers}     # pieces, "a document ends after it", characters

    def flush(where):
        pieces, ends, chars = batch[where]
        if pieces:
            writers[where].write(encode(pieces, ends))
            pieces.clear()
            ends.clear()
            chars[0] = 0

    try:
        for p in _documents_as_pieces(reader2.pieces()):
            where = "val" if vi < len(val_docs) and val_docs[vi] == doc else "train"
            pieces, ends, chars = batch[where]
            if p is _END:
                if ends:
                    ends[-1] = True
                else:  # the document's text went out with the last flush
                    writers[where].write(eod_arr)
                docs[where] += 1
                vi += where == "val"
                doc += 1
                continue
            pieces.append(p)
            ends.append(False)
            chars[0] += len(p)
            if chars[0] >= _BATCH_CHARS:
                flush(where)
        for where in writers:
            flush(where)
    finally:
        bar.close()
    for w in writers.values():
        w.close()
    for p in paths:
        if reader2.hashes.get(p) != hashes[p]:
            raise DataError(f"{p}: the file changed while it was being tokenized (sha256 differs between the "
                            "two passes); tokenize it again")
    if doc != n_docs:  # pragma: no cover - caught by the hash check
        raise DataError("the inputs changed while they were being tokenized")
    for name in writers:
        prepare_dir(os.path.join(tmp, name), fmt)
    tokens = {k: w.tokens for k, w in writers.items()}
    meta = {
        "version": 1,
        "tokenizer": {"kind": mode, "file": "tokenizer.json", "sha256": tok_sha, "vocab_size": V,
                      "special_tokens": {t: tok.hf.token_to_id(t) for t in specials}, "eod_token": eod or None,
                      "eod_id": eod_id, **({"min_frequency": min_frequency, "requested_vocab_size": vocab_size}
                                           if mode == "bpe" else {})},
        "vocab_size": V,
        "format": fmt,
        "documents": {"train": docs["train"], "val": docs["val"]},
        "tokens": {"train": tokens["train"], "val": tokens.get("val", 0)},
        "shards": {k: w.names for k, w in writers.items()},
        "val_ratio": val_ratio,
        "seed": seed,
        "doc_separator": sep,
        "inputs": [{"path": os.path.abspath(p), "bytes": sizes[p], "sha256": hashes[p]} for p in paths],
        "input_bytes": total,
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return meta


def _commit(tmp: str, out: str) -> None:
    """Move the finished temporary directory to ``out`` (replacing an empty or --overwrite'd one)."""
    old = None
    if os.path.isdir(out):
        if os.listdir(out):
            old = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.old-{os.getpid()}")
            os.rename(out, old)
        else:
            os.rmdir(out)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def run_file_lines(meta: dict, out: str) -> str:
    """The run-file lines that train on a tokenize output directory."""
    j = lambda *p: json.dumps(os.path.join(out, *p))  # noqa: E731 - a TOML basic string
    lines = ["[model]", "vocab_size = 0          # from data.tokenizer: V = %d" % meta["vocab_size"], "", "[data]",
             f"train = {j('train')}", f"format = \"{meta['format']}\"", f"tokenizer = {j('tokenizer.json')}"]
    if meta["tokens"]["val"]:
        lines.insert(5, f"val = {j('val')}")
    else:
        lines.append("val_ratio = 0.0         # no validation documents were held out")
    return "\n".join(lines)
