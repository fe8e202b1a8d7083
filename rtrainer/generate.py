"""`rtrainer generate MODEL`: sample text from a trained model, one token at a time.

The model runs in step mode (rtrainer/infer.py: constant cost per token, any prompt length). At
each step the head's scores become a distribution over the vocabulary: the softmax head's logits,
or for the HPN head cos(z, prototype_k) / tau. Then, as in nanoGPT / litgpt: divide by
--temperature (0 = greedy: the arg max), keep the --top-k largest, keep the smallest set whose
probability reaches --top-p, renormalise, draw. Sample i draws from its own generator seeded
(--seed, i), so a sample does not depend on how many are drawn with it.

Text <-> ids goes through a tokenizer: the run's tokenizer.json (an export's own, or the run's
`data.tokenizer`), else for byte-level runs (V <= 256) the identity byte tokenizer.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import numpy as np

from .errors import ConfigError, DataError


# ============================================================================================ text <-> ids

class ByteCodec:
    """The identity tokenizer of byte-level runs: a token is one byte of UTF-8."""

    kind = "bytes"

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, V: int) -> np.ndarray:
        return np.ones(V, np.int64)


class HFCodec:
    """A Hugging Face `tokenizers` tokenizer.json."""

    kind = "tokenizer.json"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(f"{path}: reading a tokenizer.json needs the 'tokenizers' package "
                              "(pip install tokenizers)") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None
        self.path = path
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, V: int) -> np.ndarray:
        """UTF-8 bytes each id stands for (byte-level BPE: one character of the token string per byte;
        special tokens 0)."""
        import json

        byte_level = "ByteLevel" in json.dumps(json.loads(self.tok.to_str()).get("decoder") or {})
        special = set(getattr(self.tok, "get_added_tokens_decoder", lambda: {})().keys())
        out = np.zeros(V, np.int64)
        for i in range(min(V, self.vocab_size)):
            if i in special:
                continue
            s = self.tok.id_to_token(i)
            if s is None:
                continue
            out[i] = len(s) if byte_level else len(self.tok.decode([i]).encode("utf-8"))
        return out


def text_codec(lm):
    """The tokenizer of a loaded model (see the module docstring), checked against its vocabulary.
    None when the model has neither a tokenizer nor byte-level data."""
    V = lm.vocab_size
    if lm.tokenizer_path:
        path = lm.tokenizer_path
        if not os.path.isfile(path):
            raise DataError(f"the model's tokenizer {path} is missing")
        codec = HFCodec(path)
        if codec.vocab_size != V:
            raise DataError(f"{path}: the tokenizer has {codec.vocab_size} tokens but the model has V = {V}")
        return codec
    fmt = str((lm.config.get("data") or {}).get("format", ""))
    if V <= 256 and fmt not in ("u16", "u32", "npy"):
        return ByteCodec(V)
    return None


def encode_prompt(codec, text: str, V: int, what: str = "the prompt") -> list[int]:
    ids = codec.encode(text)
    if not ids:
        raise ConfigError(f"{what} encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ConfigError(f"{what} encodes to token id {bad[0]}, which the model (V = {V}) does not have")
    return ids


# ============================================================================================ sampling

def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int, num_samples: int,
                   V: int) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    if top_k is not None and not 1 <= top_k <= V:
        raise ConfigError(f"--top-k must be in [1, V = {V}], got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next(logits: np.ndarray, rngs, temperature: float, top_k: int | None, top_p: float) -> np.ndarray:
    """One id per row of logits (n, V) float64; row i draws one uniform number from rngs[i]. Every
    operation is per row, so a row's draw does not depend on the other rows."""
    n, V = logits.shape
    if temperature == 0:
        return np.argmax(logits, axis=1)
    s = logits / temperature
    if top_k is not None and top_k < V:
        kth = np.partition(s, V - top_k, axis=1)[:, V - top_k:V - top_k + 1]
        s = np.where(s >= kth, s, -np.inf)
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        # keep the most likely tokens up to and including the one where the mass reaches top_p
        drop = np.zeros_like(p, dtype=bool)
        np.put_along_axis(drop, order, (cum - np.take_along_axis(p, order, axis=1)) >= top_p, axis=1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    u = np.array([r.random() for r in rngs[:n]]) * cdf[:, -1]
    return np.minimum(np.count_nonzero(cdf <= u[:, None], axis=1), V - 1).astype(np.int64)


def generate(lm, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float = 1.0, num_samples: int = 1, seed: int = 0, tau: float | None = None,
             on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """(num_samples, max_new_tokens) generated ids after prompt_ids, the samples decoded together
    (one batch); `on_token(ids)` is called with each step's (num_samples,) ids."""
    from .infer import InferenceState

    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples, lm.vocab_size)
    B = num_samples
    st = InferenceState(lm, batch=B)
    rngs = [np.random.default_rng([int(seed), i]) for i in range(B)]
    out = np.empty((B, max_new_tokens), np.int64)
    if max_new_tokens == 0:
        return out
    # the prompt is fed once and its state copied to every sample: the prefill costs the same for any
    # number of samples, and sample i does not depend on how many are drawn with it
    one = InferenceState(lm, batch=1)
    one.prefill(np.asarray(prompt_ids, np.int64).reshape(1, -1))
    z = st.broadcast_from(one)
    for t in range(max_new_tokens):
        nxt = sample_next(st.scorer.sampling_logits(z, tau), rngs, temperature, top_k, top_p)
        out[:, t] = nxt
        if on_token is not None:
            on_token(nxt)
        if t + 1 < max_new_tokens:
            z = st.step(nxt)
    return out


class _Streamer:
    """Prints the decoded text of one sequence as it grows (holding back an incomplete UTF-8 tail)."""

    def __init__(self, codec, stream):
        self.codec, self.stream = codec, stream
        self.ids: list[int] = []
        self.printed = 0

    def push(self, i: int) -> None:
        self.ids.append(int(i))
        text = self.codec.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            self.stream.write(stable[self.printed:])
            self.stream.flush()
            self.printed = len(stable)

    def finish(self) -> None:
        text = self.codec.decode(self.ids)
        if len(text) > self.printed:
            self.stream.write(text[self.printed:])
        self.stream.flush()


def run_generate(args, out=None) -> None:
    """The `rtrainer generate` command."""
    from threadpoolctl import threadpool_limits

    from .infer import load_model

    out = out or sys.stdout
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte offset {e.start})") from None
    else:
        prompt = "\n" if args.prompt is None else args.prompt
    # flags first (no model read needed for these), then the model
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
        raise ConfigError(f"--tau must be > 0, got {args.tau}")
    lm = load_model(args.model, which=args.checkpoint, threads=args.threads)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples, lm.vocab_size)
    codec = text_codec(lm)
    if codec is None:
        raise DataError(f"{lm.path}: the model has no tokenizer (V = {lm.vocab_size} is not byte-level and the run "
                        "names no data.tokenizer); it cannot turn text into tokens")
    ids = encode_prompt(codec, prompt, lm.vocab_size)
    with threadpool_limits(limits=lm.n_threads, user_api="blas"):
        n = args.num_samples
        if n == 1:
            out.write(prompt)
            s = _Streamer(codec, out)
            generate(lm, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, num_samples=1, seed=args.seed, tau=args.tau,
                     on_token=lambda nxt: s.push(nxt[0]))
            s.finish()
            out.write("\n")
        else:
            streamers = [_Streamer(codec, out)]
            out.write(f"--- sample 1/{n}\n{prompt}")

            def on_token(nxt):
                streamers[0].push(nxt[0])

            gen = generate(lm, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, num_samples=n, seed=args.seed, tau=args.tau, on_token=on_token)
            streamers[0].finish()
            out.write("\n")
            for i in range(1, n):
                out.write(f"--- sample {i + 1}/{n}\n{prompt}{codec.decode(gen[i].tolist())}\n")
        out.flush()
