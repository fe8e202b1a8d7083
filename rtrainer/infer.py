"""Recurrent inference: load a trained model and run it one token at a time.

`load_model(path)` reads a step checkpoint, a run directory (its best or latest checkpoint) or an
export (`rtrainer export`) and returns a `LoadedModel`: the model and head built exactly as the
Trainer builds them, with the saved parameters in a flat buffer.

`InferenceState(lm, batch)` carries, per layer, the last K-1 conv inputs and the scan state h, so
`step(token_ids)` costs the same whatever the length of the context (no window is re-read):

    mamba-lite layer   x = r ; u = silu(conv(x)) ; [Bt|Ct|draw] = u @ x_proj_w ; dt = draw @ dt_proj_w
                       y = scan(u, dt) ; r = x + y @ out_proj_w
    mamba layer        xn = rmsnorm(r) ; [xin|zg] = xn @ in_proj_w ; u = silu(conv(xin)) ; ... ;
                       y = scan(...) ; r = x + (y * silu(zg)) @ out_proj_w
    LTI layers         [Bt|Ct] = [B_lti|C_lti] for every token, dt = 0
    then z = LayerNorm(r) (no affine), the same kernels as the training forward for everything but
    the conv and the scan (kernels/step.pyx). The head turns z into scores over the vocabulary:
    `scores(head, z)` = the softmax head's logits, or the HPN head's cosines to the prototypes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from ._kernels import embed as _embed
from ._kernels import gate as _gate
from ._kernels import norm as _norm
from ._kernels import rmsnorm as _rmsnorm
from ._kernels import step as _step
from .errors import CheckpointError, ConfigError
from .model import LN_EPS, RMS_EPS, MambaStack
from .params import FlatParams

EXPORT_FORMAT = "rtrainer-export"
EXPORT_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
HPN_TAU = 0.1     # default HPN sampling temperature: p(k) ~ exp(cos_k / tau)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: `model` (MambaLiteStack or MambaStack) and `head`, bound to `flat`."""

    model: object
    head: object
    flat: FlatParams
    config: dict               # the run's resolved configuration ({section: {key: value}})
    path: str                  # the file or directory it was read from
    kind: str                  # "checkpoint" or "export"
    step: int | None
    state: dict                # the checkpoint's JSON state (without tensors)
    tokenizer_path: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.V)

    @property
    def n_threads(self) -> int:
        return int(self.model.n_threads)

    @property
    def train_seq_len(self) -> int:
        return int(self.config.get("train", {}).get("seq_len", 0))


# ============================================================================================ loading

def _is_export_dir(p: Path) -> bool:
    return (p / EXPORT_CONFIG).is_file() and (p / ckpt.TENSOR_FILE).is_file() and not (p / ckpt.MANIFEST_FILE).exists()


def _is_run_dir(p: Path) -> bool:
    return (p / "checkpoints").is_dir()


def resolve_model_path(path: str, which: str = "best") -> tuple[str, str]:
    """(what to read, its kind: "checkpoint" | "export") for a step checkpoint directory or file, a run
    directory (its best checkpoint, or the newest one that verifies with which="latest"; best falls
    back to latest when the run never validated), or an export directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model not found: {path}")
    if p.is_file():
        return str(p), "checkpoint"
    if (p / ckpt.MANIFEST_FILE).exists() or p.name.startswith("step-"):
        return str(p), "checkpoint"
    if _is_export_dir(p):
        return str(p), "export"
    if not _is_run_dir(p):
        raise CheckpointError(f"{path}: not an rtrainer model (expected a checkpoints/step-N directory, a run "
                              f"directory with checkpoints/, or an export directory with {EXPORT_CONFIG})")
    found = ckpt.find_checkpoints(p / "checkpoints")
    if not found:
        raise CheckpointError(f"{path}: the run directory holds no checkpoint yet")
    if which == "best":
        best = _best_step(p)
        if best is not None:
            d = p / "checkpoints" / ckpt.step_dir_name(best)
            if d.is_dir():
                return str(d), "checkpoint"
    elif which != "latest":
        raise ConfigError(f"--checkpoint must be 'best' or 'latest', got {which!r}")
    problems = []
    for _, d in found:
        try:
            ckpt.verify_step_dir(d)
            return d, "checkpoint"
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"{path}: no checkpoint verifies: " + "; ".join(problems))


def _best_step(run_dir: Path) -> int | None:
    """The run's best step: run_state.json (rewritten at every checkpoint of the current run) wins
    over checkpoints/best.json (which a run started over with --overwrite may have left behind)."""
    for name, key in (("run_state.json", "best_step"), ("checkpoints/best.json", "step")):
        try:
            d = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        s = d.get(key) if isinstance(d, dict) else None
        return s if isinstance(s, int) else None
    return None


def _known(section: str, table: dict) -> dict:
    """Only the keys this version knows (a newer writer may have added some)."""
    from .config import SECTIONS

    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    return {k: v for k, v in (table or {}).items() if k in names}


def build_from_config(config: dict, threads: int = 0):
    """(model, head, flat) for a saved configuration, assembled as the Trainer does (build_model,
    build_head, the model's tensors then the head's in one flat buffer); parameters are zero."""
    from .config import config_from_dict
    from .trainer import Trainer

    try:
        cfg = config_from_dict({"model": _known("model", config.get("model")),
                                "head": _known("head", config.get("head")),
                                "run": {"threads": int(threads)}}, source="the model's config",
                               require_data=False)
    except ConfigError as e:
        raise CheckpointError(f"the model's configuration is invalid: {e}") from None
    V = cfg.model.vocab_size
    if V < 1:
        raise CheckpointError("the model's configuration has no vocabulary size (model.vocab_size = 0)")
    tr = Trainer(cfg)
    model, head = tr.build_model(V), tr.build_head(V)
    flat = FlatParams(model.param_specs() + head.param_specs())
    model.bind(flat.params, flat.grads)
    head.bind(flat.params, flat.grads)
    return model, head, flat


def load_model(path: str, which: str = "best", threads: int = 0) -> LoadedModel:
    """The model and head of a step checkpoint, a run directory (`which` = "best" | "latest") or an
    export, built and bound, with their saved parameters (bitwise). Raises CheckpointError for
    anything that is not one, or that does not verify; ConfigError for threads < 0."""
    if int(threads) < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = every core), got {threads}")
    target, kind = resolve_model_path(path, which)
    tfile = os.path.join(target, ckpt.TENSOR_FILE) if os.path.isdir(target) else target
    if kind == "checkpoint" and os.path.isdir(target):
        ckpt.verify_step_dir(target)
    tensors, state = ckpt.load_checkpoint(tfile)
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{target}: holds no model configuration")
    if state.get("kind") == "export":
        kind = "export"
        params = tensors
    else:
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    model, head, flat = build_from_config(config, threads)
    for name, view in flat.params.items():
        t = params.get(name)
        if t is None:
            raise CheckpointError(f"{target}: tensor '{name}' is missing")
        if tuple(t.shape) != tuple(view.shape) or t.dtype != np.float32:
            raise CheckpointError(f"{target}: tensor '{name}' has shape {tuple(t.shape)} {t.dtype}, the model "
                                  f"expects {tuple(view.shape)} float32")
        view[...] = t
    tok = None
    if kind == "export" and os.path.isfile(os.path.join(target, TOKENIZER_FILE)):
        tok = os.path.join(target, TOKENIZER_FILE)
    elif (config.get("data") or {}).get("tokenizer"):
        tok = str(config["data"]["tokenizer"])
    step = state.get("step")
    return LoadedModel(model=model, head=head, flat=flat, config=config, path=target, kind=kind,
                       step=int(step) if isinstance(step, int) else None, state=state, tokenizer_path=tok)


# ============================================================================================ heads

class HeadScorer:
    """The head's scores over the vocabulary, (n, V) float32 for z (n, D): the softmax head's logits
    z @ W^T + b, or the HPN head's cosines zhat . Pt_k (zhat = z/max(|z|, 1e-8), Pt = the unit
    prototypes, or raw P when normalize_prototypes = false) — the quantities each head's loss and
    prediction are built on. The unit prototypes are computed once, at construction."""

    def __init__(self, head):
        self.head = head
        self.softmax = is_softmax(head)
        if not self.softmax:
            P = head.p["head.prototypes"]
            if head.normalize:
                P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), np.float32(1e-8))
            self.PT = np.ascontiguousarray(P.T)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.softmax:
            return self.head._logits(z, np.empty((z.shape[0], self.head.V), np.float32))
        zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), np.float32(1e-8))
        return zn @ self.PT

    def sampling_logits(self, z: np.ndarray, tau: float | None = None) -> np.ndarray:
        """float64 (n, V) logits to sample from: the softmax head's logits, or cos / tau for HPN
        (tau: the head's `temperature` attribute if it has one, else HPN_TAU)."""
        s = self(z).astype(np.float64)
        if self.softmax:
            return s
        if tau is None:
            tau = float(getattr(self.head, "temperature", HPN_TAU))
        if not tau > 0:
            raise ConfigError(f"the HPN temperature tau must be > 0, got {tau}")
        return s / tau


def scores(head, z: np.ndarray) -> np.ndarray:
    """HeadScorer(head)(z): the head's (n, V) scores of z (n, D)."""
    return HeadScorer(head)(z)


def is_softmax(head) -> bool:
    return "head.W" in head.p


# ============================================================================================ stepping

class InferenceState:
    """Per-layer recurrent state of `batch` sequences decoded together (see the module docstring).

    `prefill(ids)` (B, T) feeds a prompt token by token and returns z of its last token;
    `step(token_ids)` (B,) feeds one token per sequence and returns z (B, D) (a view, overwritten
    by the next call); `reset()` forgets everything. `outputs(z)` gives the head's scores.
    The parameters are read from the model's bound views at every step, except exp(A_log) and the
    unit HPN prototypes, which are computed once here: make a new state after changing those."""

    def __init__(self, lm, batch: int = 1):
        if isinstance(lm, LoadedModel):
            model, head = lm.model, lm.head
        else:
            model, head = lm
        self.model, self.head = model, head
        self.B = int(batch)
        if self.B < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        m = model
        self.full = isinstance(m, MambaStack)
        self.C = m.C if self.full else m.D
        B, D, C, N, K = self.B, m.D, self.C, m.N, m.K
        W = 2 * N + m.R
        f = np.float32
        nt = m.n_threads
        self.negA = []
        for i in range(m.L):
            a = np.empty((N, C), f)
            _step.neg_exp_t(a, m.p[f"layers.{i}.A_log"], nt)
            self.negA.append(a)
        self.conv_state = [np.zeros((B, K - 1, C), f) for _ in range(m.L)]
        self.h = [np.zeros((B, N, C), f) for _ in range(m.L)]
        self.r = np.empty((B, 1, D), f)
        self.r2 = self.r.reshape(B, D)
        self.rn = np.empty((B, D), f)
        self.pre = np.empty((B, C), f)
        self.u = np.empty((B, C), f)
        self.xdbl = np.empty((B, W), f)
        self.dt = np.zeros((B, C), f)
        self.y = np.empty((B, C), f)
        self.z = np.empty((B, D), f)
        self.rstd = np.empty(B, f)
        if self.full:
            self.xn = np.empty((B, D), f)
            self.xin = np.empty((B, C), f)
            self.zg = np.empty((B, C), f)
            self.yg = np.empty((B, C), f)
        self.ids = np.empty((B, 1), np.int64)
        self.position = 0
        self.scorer = HeadScorer(head)

    def reset(self) -> None:
        for a in self.conv_state + self.h:
            a.fill(0.0)
        self.position = 0

    def step(self, token_ids) -> np.ndarray:
        """One token per sequence: token_ids (B,) ints in [0, V) -> z (B, D) float32."""
        m, p, nt = self.model, self.model.p, self.model.n_threads
        B, D, C, N = self.B, m.D, self.C, m.N
        self.ids[:, 0] = np.asarray(token_ids, np.int64).reshape(B)
        if self.ids.min() < 0 or self.ids.max() >= m.V:
            raise ValueError(f"token ids must be in [0, {m.V}), got {self.ids.min()}..{self.ids.max()}")
        _embed.embed_forward(self.r, self.ids, p["embedding"], nt)
        x = self.r2
        for i in range(m.L):
            q = f"layers.{i}."
            if self.full:
                _rmsnorm.rmsnorm_forward(self.xn, self.rstd, x, p[q + "norm_w"], RMS_EPS, nt)
                w_in = p[q + "in_proj_w"]
                np.matmul(self.xn, w_in[:, :C], out=self.xin)
                np.matmul(self.xn, w_in[:, C:], out=self.zg)
                cin = self.xin
            else:
                cin = x
            _step.conv_step(self.pre, self.u, self.conv_state[i], cin, p[q + "conv_w"], p[q + "conv_b"], nt)
            if m.selective:
                np.matmul(self.u, p[q + "x_proj_w"], out=self.xdbl)
                np.matmul(self.xdbl[:, 2 * N:], p[q + "dt_proj_w"], out=self.dt)
            else:
                self.xdbl[:, :N] = p[q + "B_lti"]
                self.xdbl[:, N:2 * N] = p[q + "C_lti"]
            _step.scan_step(self.y, self.h[i], self.u, self.dt, p[q + "dt_proj_b"], self.negA[i], self.xdbl,
                            p[q + "D_skip"], nt)
            if self.full:
                _gate.gate_forward(self.yg, self.y, self.zg, nt)
                np.matmul(self.yg, p[q + "out_proj_w"], out=self.rn)
            else:
                np.matmul(self.y, p[q + "out_proj_w"], out=self.rn)
            self.rn += x
            x[...] = self.rn
        _norm.layernorm_forward(self.z, self.rstd, x, LN_EPS, nt)
        self.position += 1
        return self.z

    def prefill(self, ids) -> np.ndarray:
        """Feed (B, T) prompt tokens (T >= 1) in order; returns z of the last token (B, D)."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim == 1:
            ids = np.broadcast_to(ids, (self.B, ids.shape[0]))
        if ids.shape[0] != self.B or ids.shape[1] < 1:
            raise ValueError(f"prefill: ids have shape {ids.shape}, expected ({self.B}, T >= 1)")
        z = None
        for t in range(ids.shape[1]):
            z = self.step(ids[:, t])
        return z

    def broadcast_from(self, other: "InferenceState", row: int = 0) -> np.ndarray:
        """Make every sequence of this state a copy of `other`'s sequence `row` (e.g. one prompt
        prefilled once, then sampled several ways); returns z (B, D)."""
        for mine, theirs in zip(self.conv_state + self.h, other.conv_state + other.h):
            mine[...] = theirs[row]
        self.z[...] = other.z[row]
        self.position = other.position
        return self.z

    def outputs(self, z: np.ndarray | None = None) -> np.ndarray:
        """The head's scores (B, V) of z (default: the last step's)."""
        return self.scorer(self.z if z is None else z)
