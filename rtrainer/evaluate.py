"""`rtrainer eval MODEL --data PATH`: score a trained model on any data.

PATH is a token file (.bin / .npy, or any file with --format u8|u16|u32|npy|txt), a shard
directory (through its manifest), or UTF-8 text (any other file, or --format text), which the
model's tokenizer encodes. The data is cut into windows of seq_len + 1 tokens (default: the
training length) spread evenly over it, read with the same window reader as validation, and run
through the training forward (Net.evaluate). Reported: the head's loss and accuracy over every
scored token, and for the softmax head the cross-entropy in bits per token and (when the tokens
map to bytes through the tokenizer) bits per byte.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import shards as shards_mod
from .errors import ConfigError, DataError
from .stream import ShardWindows

TOKEN_FORMATS = ("u8", "u16", "u32", "npy", "txt")


def _text_shard(path: str, tok) -> shards_mod.Shard:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    ids = np.asarray(tok.encode(text), np.int64)
    if ids.size == 0:
        raise DataError(f"{path}: encodes to no tokens")
    return shards_mod.Shard.from_array(ids, name=path)


def open_data(path: str, fmt: str, tok, model_source: str) -> tuple[list, str]:
    """(shards, how they were read: "tokens" | "text")."""
    if fmt not in ("auto", "text") + TOKEN_FORMATS:
        raise ConfigError(f"--format must be auto, text or one of {', '.join(TOKEN_FORMATS)}, got {fmt!r}")
    if not os.path.exists(path):
        raise DataError(f"data not found: {path}")
    if os.path.isdir(path):
        return shards_mod.open_source(path, "auto" if fmt in ("auto", "text") else fmt), "tokens"
    if fmt in TOKEN_FORMATS or (fmt == "auto" and os.path.splitext(path)[1].lower() in (".bin", ".npy")):
        return shards_mod.open_source(path, fmt), "tokens"
    if tok is None:
        raise ConfigError(f"{path} is read as text, but the model {model_source} has no tokenizer; give "
                          "--tokenizer FILE, or token data (--format u16, a shard directory, ...)")
    return [_text_shard(path, tok)], "text"


def token_bytes(tok, V: int) -> np.ndarray | None:
    """(V,) UTF-8 bytes each id stands for (special tokens 0); None without a tokenizer. A
    byte-level symbol is one character per byte (the GPT-2 byte table)."""
    if tok is None:
        return None
    if tok.is_bytes:
        return np.ones(V, np.int64)
    from .tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    special = set(tok.special_ids.values())
    out = np.zeros(V, np.int64)
    for i in range(V):
        s = tok.token(i)
        if i in special or s is None:
            continue
        out[i] = len(s) if all(c in alphabet for c in s) else len(tok.decode([i]).encode("utf-8"))
    return out


def evaluate_model(net, tok, data: str, fmt: str = "auto", seq_len: int = 0, batch_size: int = 8,
                   max_batches: int = 0) -> dict:
    """Loss, accuracy and (softmax head) bits per token / per byte of a Net on `data`."""
    from threadpoolctl import threadpool_limits

    if seq_len < 0 or batch_size < 1 or max_batches < 0:
        raise ConfigError("--seq-len and --max-batches must be >= 0 and --batch-size >= 1")
    shards, how = open_data(data, fmt, tok, net.source)
    V = int(net.model.V)
    shards_mod.check_shards_range(shards, V)
    train_T = int(((net.state.get("config") or {}).get("train") or {}).get("seq_len") or 128)
    longest = max(len(s) for s in shards)
    if longest < 2:
        raise DataError(f"{data}: needs at least 2 tokens to score one")
    T = min(int(seq_len or train_T), longest - 1)
    B = int(batch_size)
    positions = sum(max(len(s) - T, 0) for s in shards)
    n_batches = math.ceil(max(1, math.ceil(positions / T)) / B)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    windows = ShardWindows(shards, B, T, n_batches, name=data)
    tb = token_bytes(tok, V)
    counted = {"tokens": 0, "bytes": 0}

    def tally(batches):
        for ids, targets in batches:
            t = targets.reshape(-1)
            t = t[t >= 0]
            counted["tokens"] += int(t.size)
            if tb is not None:
                counted["bytes"] += int(tb[t].sum())
            yield ids, targets

    try:
        with threadpool_limits(limits=net.model.n_threads, user_api="blas"):
            res = net.evaluate(tally(windows.batches()))
    finally:
        windows.close()
    softmax = net.cfg.head.kind == "softmax"
    loss = float(res["loss"])
    step = net.state.get("step")
    r = {
        "model": net.source, "step": step if isinstance(step, int) else None, "data": os.path.abspath(data),
        "read_as": how, "head": net.cfg.head.kind, "seq_len": T, "batch_size": B, "batches": n_batches,
        "tokens": counted["tokens"], "loss": loss, "accuracy": float(res["acc"]),
        "bits_per_token": None, "bits_per_byte": None,
    }
    if softmax:
        r["bits_per_token"] = loss / math.log(2)
        if counted["bytes"]:
            r["bits_per_byte"] = loss * counted["tokens"] / math.log(2) / counted["bytes"]
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
