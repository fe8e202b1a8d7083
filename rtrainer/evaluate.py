"""`rtrainer eval MODEL --data PATH`: score a trained model on any data.

PATH is a token file (.bin / .npy, or any file with --format u8|u16|u32|npy|txt), a shard
directory (through its manifest), or UTF-8 text (any other file, or --format text), which the
model's tokenizer encodes. The data is cut into windows of seq_len + 1 tokens (default: the
training length) that cover it, read with the same window reader as validation, and run through
the training forward. Reported: the head's loss and accuracy over every scored token, and for the
softmax head the cross-entropy in bits per token and (when the tokens map to bytes) bits per byte.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import stream as stream_mod
from .errors import ConfigError, DataError

TOKEN_FORMATS = ("u8", "u16", "u32", "npy", "txt")


def _text_shard(path: str, codec) -> "stream_mod.Shard":
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"data not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    ids = np.asarray(codec.encode(text), np.int64)
    if ids.size == 0:
        raise DataError(f"{path}: encodes to no tokens")
    return stream_mod.Shard(path, None, np.int64, 0, len(ids), array=ids)


def open_data(path: str, lm, fmt: str = "auto", codec=None) -> tuple[list, str]:
    """(shards, how they were read: "tokens" | "text")."""
    if not os.path.exists(path):
        raise DataError(f"data not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return stream_mod.open_source(path, "auto" if fmt in ("auto", "text") else fmt), "tokens"
    if fmt in TOKEN_FORMATS or (fmt == "auto" and ext in (".bin", ".npy")):
        return stream_mod.open_source(path, fmt), "tokens"
    if fmt not in ("auto", "text"):
        raise ConfigError(f"--format must be auto, text or one of {', '.join(TOKEN_FORMATS)}, got {fmt!r}")
    if codec is None:
        raise DataError(f"{path}: text needs a tokenizer, and the model has none (V = {lm.vocab_size}); "
                        "give token data (--format u16, a shard directory, ...)")
    return [_text_shard(path, codec)], "text"


def evaluate_model(lm, data: str, fmt: str = "auto", seq_len: int = 0, batch_size: int = 8,
                   max_batches: int = 0) -> dict:
    """Loss, accuracy and (softmax head) bits per token / per byte of a loaded model on `data`."""
    from threadpoolctl import threadpool_limits

    from .generate import text_codec
    from .infer import is_softmax

    if seq_len < 0 or batch_size < 1 or max_batches < 0:
        raise ConfigError("--seq-len and --max-batches must be >= 0 and --batch-size >= 1")
    codec = text_codec(lm)
    shards, how = open_data(data, lm, fmt, codec)
    V = lm.vocab_size
    stream_mod.check_shards_range(shards, V)
    T = int(seq_len or lm.train_seq_len or 128)
    longest = max(len(s) for s in shards)
    if longest < 2:
        raise DataError(f"{data}: needs at least 2 tokens to score one")
    T = min(T, longest - 1)
    B = int(batch_size)
    positions = sum(max(len(s) - T, 0) for s in shards)
    n_windows = max(1, math.ceil(positions / T))
    n_batches = math.ceil(n_windows / B)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    windows = stream_mod.ShardWindows(shards, B, T, n_batches, name=data)
    softmax = is_softmax(lm.head)
    tb = codec.token_bytes(V) if codec is not None else None
    n_tok = correct = n_bytes = 0
    loss_sum = 0.0
    try:
        with threadpool_limits(limits=lm.n_threads, user_api="blas"):
            for ids, targets in windows.batches():
                z = lm.model.forward(ids)
                loss = lm.head.forward(z, targets)
                pred = lm.head.predict(z)
                t = targets.reshape(-1)
                n = int(np.count_nonzero(t != -1))
                loss_sum += float(loss) * n
                correct += int(np.count_nonzero(pred == t))
                n_tok += n
                if tb is not None:
                    n_bytes += int(tb[t[t >= 0]].sum())
    finally:
        windows.close()
    loss = loss_sum / max(n_tok, 1)
    r = {
        "model": lm.path, "step": lm.step, "data": os.path.abspath(data), "read_as": how,
        "head": "softmax" if softmax else "hpn", "seq_len": T, "batch_size": B, "batches": n_batches,
        "tokens": n_tok, "loss": loss, "accuracy": correct / max(n_tok, 1),
        "bits_per_token": None, "bits_per_byte": None,
    }
    if softmax:
        r["bits_per_token"] = loss / math.log(2)
        if n_bytes:
            r["bits_per_byte"] = loss_sum / math.log(2) / n_bytes
    return r


def format_report(r: dict) -> str:
    lines = [f"model    {r['model']} (step {r['step']})",
             f"data     {r['data']} ({r['read_as']}; {r['batches']} batches of {r['batch_size']} x {r['seq_len']})",
             f"tokens   {r['tokens']:,}",
             f"loss     {r['loss']:.5f}" + ("  (nats/token)" if r["head"] == "softmax" else "  (HPN (1-cos)^2)"),
             f"accuracy {r['accuracy']:.4f}"]
    if r["bits_per_token"] is not None:
        lines.append(f"bits/token {r['bits_per_token']:.4f}")
    if r["bits_per_byte"] is not None:
        lines.append(f"bits/byte  {r['bits_per_byte']:.4f}")
    return "\n".join(lines)
