"""`rtrainer generate MODEL`: sample text from a trained model, one token at a time.

The model runs in step mode (rtrainer/infer.py: constant cost per token, any prompt length). At
each step the head's scores become a distribution over the vocabulary: the softmax head's logits,
or for the HPN head cos(z, prototype_k) / tau. Then, as in nanoGPT / litgpt: divide by
--temperature (0 = greedy: the arg max), keep the --top-k largest, keep the smallest set whose
probability reaches --top-p, renormalise, draw. Sample i draws from its own generator seeded
(--seed, i), so a sample does not depend on how many are drawn with it.

`open_model` is what every model command reads a MODEL with: the Net (rtrainer.net.Net.load) and
its tokenizer, chosen in this order: `--tokenizer FILE`, an export's own tokenizer.json, the
tokenizer the checkpoint records (its SHA-256 checked), the identity byte tokenizer for runs
trained on bytes; None for runs trained on token ids without a tokenizer.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import numpy as np

from .errors import CheckpointError, ConfigError
from .infer import InferenceState

TOKENIZER_FILE = "tokenizer.json"     # an export's tokenizer


# ============================================================================================ the model

def open_model(path: str, which: str = "best", threads: int = 0, tokenizer: str | None = None):
    """(net, tokenizer or None) of MODEL (see the module docstring). `threads` 0 = every core."""
    from .net import Net
    from .threads import resolve_threads

    if int(threads) < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = every core), got {threads}")
    tok = _load_flag_tokenizer(tokenizer)     # a bad file fails before the model is read
    net = Net.load(path, n_threads=resolve_threads(int(threads)), which=which)
    if tok is not None:
        check_vocab(tok, net.model.V, "--tokenizer", ConfigError)
    else:
        tok = model_tokenizer(net)
    return net, tok


def _load_flag_tokenizer(path: str | None):
    if path is None:
        return None
    from .tokenizer import load_tokenizer

    if not path:
        raise ConfigError("--tokenizer needs a tokenizer.json file")
    return load_tokenizer(path)


def is_export(net) -> bool:
    from .net import EXPORT_KIND

    return net.state.get("kind") == EXPORT_KIND


def trained_on_bytes(net) -> bool:
    """A run whose data were raw bytes (data.format = "u8", no task) and that records no tokenizer."""
    data = (net.state.get("config") or {}).get("data") or {}
    return (not net.state.get("tokenizer") and data.get("format") == "u8" and not data.get("task")
            and net.model.V <= 256)


def model_tokenizer(net):
    """The tokenizer the model was trained with (an export's own file, the checkpoint's record, or
    bytes), checked against its vocabulary; None when it has none."""
    from .tokenizer import byte_tokenizer, load_tokenizer, tokenizer_for_state

    src = net.source
    own = os.path.join(src, TOKENIZER_FILE) if is_export(net) else None
    if own is not None and os.path.isfile(own):
        tok = tokenizer_for_state(net.state, src, path=own) if net.state.get("tokenizer") else load_tokenizer(own)
    elif net.state.get("tokenizer"):
        tok = tokenizer_for_state(net.state, src)
    elif trained_on_bytes(net):
        return byte_tokenizer(special_tokens=())
    else:
        return None
    check_vocab(tok, net.model.V, tok.path, CheckpointError)
    return tok


def check_vocab(tok, V: int, what: str, error=ConfigError) -> None:
    """A tokenizer fits a model of V tokens when it has V tokens; a byte tokenizer also fits a
    byte-level model that saw fewer than 256 distinct values (V = the largest byte + 1)."""
    if tok.vocab_size == V or (tok.is_bytes and V <= tok.vocab_size):
        return
    raise error(f"{what}: the tokenizer has {tok.vocab_size} tokens but the model has V = {V}")


def need_tokenizer(net, tok, what: str):
    if tok is None:
        raise ConfigError(f"{net.source}: the model was trained on token ids (V = {net.model.V}) and has no tokenizer, "
                          f"so {what} cannot be turned into tokens; give --tokenizer FILE")
    return tok


def encode_prompt(tok, text: str, V: int, what: str = "the prompt") -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise ConfigError(f"{what} encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ConfigError(f"{what} encodes to token id {bad[0]}, which the model (V = {V}) does not have")
    return ids


# ============================================================================================ sampling

def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int, num_samples: int,
                   V: int | None = None, tau: float | None = None) -> None:
    """ConfigError naming the flag for a sampling setting that makes no sense (V None: not checked yet)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    if top_k is not None and (top_k < 1 or (V is not None and top_k > V)):
        raise ConfigError(f"--top-k must be in [1, V = {V if V is not None else 'the vocabulary size'}], got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau must be > 0, got {tau}")


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
        sorted_p = np.take_along_axis(p, order, axis=1)
        # keep the most likely tokens up to and including the one where the mass reaches top_p
        drop = np.zeros_like(p, dtype=bool)
        np.put_along_axis(drop, order, (np.cumsum(sorted_p, axis=1) - sorted_p) >= top_p, axis=1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    u = np.array([r.random() for r in rngs[:n]]) * cdf[:, -1]
    return np.minimum(np.count_nonzero(cdf <= u[:, None], axis=1), V - 1).astype(np.int64)


def generate(net, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float = 1.0, num_samples: int = 1, seed: int = 0, tau: float | None = None,
             on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """(num_samples, max_new_tokens) ids generated after prompt_ids by `net` (a Net), the samples
    decoded together as one batch; `on_token(ids)` is called with each step's (num_samples,) ids."""
    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples, int(net.model.V), tau)
    B = num_samples
    rngs = [np.random.default_rng([int(seed), i]) for i in range(B)]
    out = np.empty((B, max_new_tokens), np.int64)
    if max_new_tokens == 0:
        return out
    # the prompt is fed once and its state copied to every sample: the prefill costs the same for any
    # number of samples, and sample i does not depend on how many are drawn with it
    one = InferenceState(net, batch=1)
    one.prefill(np.asarray(prompt_ids, np.int64).reshape(1, -1))
    st = InferenceState(net, batch=B)
    z = st.broadcast_from(one)
    for t in range(max_new_tokens):
        nxt = sample_next(st.scorer.sampling_logits(z, tau), rngs, temperature, top_k, top_p)
        out[:, t] = nxt
        if on_token is not None:
            on_token(nxt)
        if t + 1 < max_new_tokens:
            z = st.step(nxt)
    return out


# ============================================================================================ the command

def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return "\n" if prompt is None else prompt
    try:
        with open(prompt_file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompt-file {prompt_file}: not UTF-8 text (byte offset {e.start})") from None


def run_generate(args, out=None) -> None:
    """The `rtrainer generate` command: the prompt, then the generated text streamed as it comes;
    with --num-samples N > 1, sample 1 streamed and the others printed after it."""
    from threadpoolctl import threadpool_limits

    out = out or sys.stdout
    prompt = read_prompt(args.prompt, args.prompt_file)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples, tau=args.tau)
    net, tok = open_model(args.model, args.checkpoint, args.threads, args.tokenizer)
    V = int(net.model.V)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples, V, args.tau)
    ids = encode_prompt(need_tokenizer(net, tok, "the prompt"), prompt, V)
    n = args.num_samples
    stream = tok.stream_decoder()
    out.write(f"--- sample 1/{n}\n{prompt}" if n > 1 else prompt)
    out.flush()

    def on_token(nxt):
        piece = stream.step(int(nxt[0]))
        if piece:
            out.write(piece)
            out.flush()

    with threadpool_limits(limits=net.model.n_threads, user_api="blas"):
        gen = generate(net, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, num_samples=n, seed=args.seed, tau=args.tau, on_token=on_token)
    out.write(stream.flush() + "\n")
    for i in range(1, n):
        out.write(f"--- sample {i + 1}/{n}\n{prompt}{tok.decode(gen[i].tolist())}\n")
    out.flush()
