"""The tokenizer of a run: a Hugging Face ``tokenizer.json`` (byte-level BPE, or the identity byte
tokenizer), loaded with the ``tokenizers`` library.

    tok = load_tokenizer("data/tok/tokenizer.json")
    ids = tok.encode("To be, or not to be")      # list[int]
    text = tok.decode(ids)                       # str
    tok.vocab_size, tok.sha256, tok.eod_id

Every run that trains on text has one (``rtrainer tokenize`` writes it, ``data.tokenizer`` points
the run at it): the model's vocabulary size V comes from it, and the checkpoint records its path and
SHA-256 (:func:`run_record`), so whatever reads a checkpoint later decodes with the same one
(:func:`tokenizer_for_state`).

The byte tokenizer (:func:`byte_tokenizer`) maps byte b to id b (0..255) and puts its special
tokens after them (the end-of-document token is 256); it is saved as an ordinary ``tokenizer.json``
(a BPE model with the 256 byte symbols and no merges) so that any ``tokenizers`` user can load it.

Errors: a missing or unreadable file, a file that is not a tokenizer, are a
:class:`~rtrainer.errors.DataError` naming the file; a run whose ``model.vocab_size`` disagrees
with its tokenizer is a :class:`~rtrainer.errors.ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

from .errors import CheckpointError, ConfigError, DataError

__all__ = [
    "EOD_TOKEN",
    "Tokenizer",
    "StreamDecoder",
    "load_tokenizer",
    "byte_tokenizer",
    "bytes_to_unicode",
    "file_sha256",
    "for_run",
    "run_record",
    "check_resume",
    "tokenizer_for_state",
]

#: The default end-of-document token (the GPT-2 spelling).
EOD_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (the GPT-2 convention, which the
    ``tokenizers`` ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to code points 256 and up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StreamDecoder:
    """Decode ids one at a time into text pieces that never split a UTF-8 character: a byte-level
    token may end in the middle of one, so such pieces are held back until the rest arrives.
    ``step(id) -> str`` (possibly empty), ``flush() -> str`` (whatever is held back)."""

    _HOLD = 8   # tokens held back at most while waiting for the end of a character

    def __init__(self, tok: "Tokenizer", skip_special: bool = False):
        self._tok = tok
        self._skip = skip_special
        self._pending: list[int] = []

    def step(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self._tok.decode(self._pending, skip_special=self._skip)
        if text.endswith("\ufffd") and len(self._pending) < self._HOLD:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self._tok.decode(self._pending, skip_special=self._skip) if self._pending else ""
        self._pending = []
        return text


class Tokenizer:
    """A loaded ``tokenizer.json``: ``encode(str) -> list[int]``, ``decode(ids) -> str``,
    ``vocab_size``, ``sha256`` (of the file, "" when built in memory), ``eod_id`` (the
    end-of-document id, or None), ``special_ids`` ({token: id})."""

    def __init__(self, hf, path: str | None = None, sha256: str = ""):
        self.hf = hf                      # the tokenizers.Tokenizer
        self.path = path
        self.sha256 = sha256
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        self.special_ids = {t.content: int(i) for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        self.eod_id = self.special_ids.get(EOD_TOKEN)
        self.is_bytes = _is_byte_tokenizer(hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written out in the text, such as
        ``<|endoftext|>``, become their ids)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel threads of the Rust library."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are written out (``<|endoftext|>``) unless
        ``skip_special``. Bytes that are not valid UTF-8 decode to U+FFFD. An id outside
        ``[0, vocab_size)`` is a ValueError."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder for generated ids (see :class:`StreamDecoder`)."""
        return StreamDecoder(self, skip_special)

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (its raw symbol), or None."""
        return self.hf.id_to_token(int(token_id))

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` (atomically) and return its SHA-256."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.hf.to_str(pretty=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.path = path
        self.sha256 = file_sha256(path)
        return self.sha256

    def describe(self) -> str:
        kind = "bytes" if self.is_bytes else type(self.hf.model).__name__
        return f"{kind} tokenizer, V={self.vocab_size}" + (f", eod id {self.eod_id}" if self.eod_id is not None else "")


def _is_byte_tokenizer(hf) -> bool:
    try:
        d = json.loads(hf.to_str())
        m = d.get("model") or {}
        return m.get("type") == "BPE" and not m.get("merges") and len(m.get("vocab") or {}) == 256
    except (ValueError, TypeError):  # pragma: no cover - to_str always gives JSON
        return False


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json``. DataError for a missing, unreadable or malformed file."""
    from tokenizers import Tokenizer as HFTokenizer

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"tokenizer file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"tokenizer {path} is a directory (give the tokenizer.json file in it)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    try:
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a tokenizer.json (invalid UTF-8 at byte offset {e.start})") from None
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a tokenizer.json ({msg})") from None
    if hf.get_vocab_size(with_added_tokens=True) < 1:
        raise DataError(f"{path}: the tokenizer has an empty vocabulary")
    return Tokenizer(hf, path, hashlib.sha256(raw).hexdigest())


def byte_tokenizer(special_tokens: Sequence[str] = (EOD_TOKEN,)) -> Tokenizer:
    """The identity byte tokenizer: byte b <-> id b, then ``special_tokens`` from id 256 on."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    table = bytes_to_unicode()
    hf = HFTokenizer(BPE({table[b]: b for b in range(256)}, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    if special_tokens:
        hf.add_special_tokens(list(special_tokens))
    return Tokenizer(hf)


# ============================================================================ the run's tokenizer
def for_run(path: str, vocab_size: int, origin: str = "data.tokenizer") -> Tokenizer | None:
    """The tokenizer of a run (``data.tokenizer``), or None when the key is empty. ``vocab_size``
    is ``model.vocab_size``: 0 takes V from the tokenizer; any other value must equal it
    (ConfigError otherwise)."""
    if not path:
        return None
    tok = load_tokenizer(os.path.abspath(os.path.expanduser(path)))
    if vocab_size and int(vocab_size) != tok.vocab_size:
        raise ConfigError(f"model.vocab_size = {vocab_size} does not match the tokenizer of {origin} "
                          f"({tok.path}: V = {tok.vocab_size}); set model.vocab_size = 0 to take V from it")
    return tok


def run_record(tok: Tokenizer | None) -> dict | None:
    """What a checkpoint keeps about its tokenizer: path, SHA-256, V, end-of-document id."""
    if tok is None:
        return None
    return {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}


def _record(state) -> dict | None:
    """The tokenizer record of a checkpoint state: the raw state dict, or a RunState."""
    rec = state.get("tokenizer") if isinstance(state, dict) else getattr(state, "tokenizer", None)
    return rec if isinstance(rec, dict) and rec else None


def check_resume(state, tok: Tokenizer | None, source: str) -> None:
    """A resumed run must use the tokenizer its checkpoint was trained with (same SHA-256);
    ConfigError otherwise, naming both files. ``state`` is the checkpoint's state dict or RunState.
    A checkpoint without a record (older, or bytes/ids data) passes; a checkpoint with one needs
    ``data.tokenizer`` set."""
    rec = _record(state)
    if rec is None:
        return
    was = f"tokenizer {rec.get('path')} (sha256 {str(rec.get('sha256'))[:12]}...)"
    if tok is None:
        raise ConfigError(f"cannot resume from {source}: it was trained with {was} but this run has no "
                          f"data.tokenizer; set data.tokenizer = {json.dumps(str(rec.get('path')))}")
    if rec.get("sha256") != tok.sha256:
        raise ConfigError(f"cannot resume from {source}: it was trained with {was} but data.tokenizer {tok.path} "
                          f"has sha256 {tok.sha256[:12]}... (another tokenizer: the token ids would mean other text)")


def tokenizer_for_state(state, source: str = "the checkpoint", path: str | None = None) -> Tokenizer | None:
    """The tokenizer a checkpoint (its state dict, or a RunState) was trained with, verified by its
    SHA-256, or None if it records none. ``path`` loads another copy of the same file instead (an
    export's own ``tokenizer.json``). CheckpointError when the file is gone or differs."""
    rec = _record(state)
    if not rec:
        return None
    p = path or rec.get("path")
    if not p or not os.path.exists(p):
        gone = "which no longer exists" if not path else f"and its copy {path} does not exist"
        raise CheckpointError(f"{source} was trained with tokenizer {rec.get('path')}, {gone}")
    tok = load_tokenizer(p)
    if rec.get("sha256") and tok.sha256 != rec["sha256"]:
        raise CheckpointError(f"{source} was trained with tokenizer sha256 {rec['sha256'][:12]}... but {p} has "
                              f"{tok.sha256[:12]}... (the file changed since)")
    return tok
