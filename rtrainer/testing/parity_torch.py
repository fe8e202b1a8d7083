"""Independent PyTorch implementation of the rtrainer model: the cross-framework parity oracle.

The mamba-lite model written with torch autograd only (no hand-written backward), so that loss and
gradients from rtrainer's Cython kernels can be checked against a second framework.
torch is an optional dependency (`pip install rtrainer[parity]`, torch==2.13.0); this module
imports it at import time, so callers guard with `pytest.importorskip("torch")`.

Glossary (notation): B batch, T time, D d_model, N d_state, K d_conv, R dt_rank, V vocab,
L layers. Parameter names are the contract shared with rtrainer's flat parameter buffer:

    embedding            (V, D)
    layers.{i}.conv_w    (D, K)      conv_w[d, K-1] multiplies the current step
    layers.{i}.conv_b    (D,)
    layers.{i}.x_proj_w  (D, 2N+R)   u @ x_proj_w = [Bt | Ct | draw]
    layers.{i}.dt_proj_w (R, D)
    layers.{i}.dt_proj_b (D,)
    layers.{i}.A_log     (D, N)      A = -exp(A_log)
    layers.{i}.D_skip    (D,)
    layers.{i}.out_proj_w (D, D)
    head.prototypes      (V, D)

Model, for ids (B, T):
    r = embedding[ids]
    per layer:  pre[t,d] = conv_b[d] + sum_k conv_w[d,k] * r[t+k-(K-1), d]   (zero left pad)
                u = silu(pre); [Bt|Ct|draw] = u @ x_proj_w
                delta = softplus(draw @ dt_proj_w + dt_proj_b)              (x above 20)
                h_t = exp(delta_t*A) * h_{t-1} + (delta_t*u_t) outer Bt_t,   h_{-1} = 0
                y_t = h_t . Ct_t + D_skip * u_t
                r = r + y @ out_proj_w
    z = layer_norm(r) (no affine, eps 1e-5, biased variance)
    zhat = z / max(|z|, 1e-8);  Pt = P / max(|P_k|, 1e-8) if normalize_prototypes else P
    cos_i = zhat_i . Pt[y_i];   loss = mean over the B*T tokens of (1 - cos_i)^2

Three scan implementations, all the same math (tests/test_parity_torch_selfcheck.py checks that
they agree): "loop" (the oracle: everything per step, plainest), "vectorised" (exp(delta*A) and
delta*u*Bt for all t at once, only the recurrence is a Python loop) and "chunked" (within chunks of
`chunk` steps the recurrence is closed form via cumulative sums of delta*A, the SSD "segsum"
trick; only the chunk-to-chunk carry is a loop). The benchmark model uses "vectorised".
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LAYER_PARAM_NAMES",
    "param_shapes",
    "init_params",
    "causal_conv",
    "selective_scan",
    "forward_loss",
    "loss_and_grads",
    "adamw_reference_step",
    "TorchMambaHPN",
    "build_torch_model",
]

LAYER_PARAM_NAMES = (
    "conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w",
)
LN_EPS = 1e-5
NORM_EPS = 1e-8  # max(|z|, 1e-8) and max(|P_k|, 1e-8) in the HPN head
SOFTPLUS_THRESHOLD = 20.0

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = np.dtype(dtype).name
    if key not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return _DTYPES[key]


def param_shapes(*, vocab_size: int, d_model: int, n_layers: int, d_state: int, d_conv: int,
                 dt_rank: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape for every parameter, in the canonical order (embedding, layers, head)."""
    V, D, N, K, R = vocab_size, d_model, d_state, d_conv, dt_rank
    shapes: dict[str, tuple[int, ...]] = {"embedding": (V, D)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes[p + "conv_w"] = (D, K)
        shapes[p + "conv_b"] = (D,)
        shapes[p + "x_proj_w"] = (D, 2 * N + R)
        shapes[p + "dt_proj_w"] = (R, D)
        shapes[p + "dt_proj_b"] = (D,)
        shapes[p + "A_log"] = (D, N)
        shapes[p + "D_skip"] = (D,)
        shapes[p + "out_proj_w"] = (D, D)
    shapes["head.prototypes"] = (V, D)
    return shapes


def init_params(*, vocab_size: int, d_model: int, n_layers: int, d_state: int, d_conv: int,
                dt_rank: int, seed: int = 0, dtype: str = "float32",
                out_proj_scale: float = 1.0) -> dict[str, np.ndarray]:
    """A "mamba"-style initialisation (docs/architecture.md) for tests and benchmarks.

    Not bitwise rtrainer's init (that lives in rtrainer/params.py); only the distributions
    matter here: A_log[d, n] = log(n+1), softplus(dt_proj_b) log-uniform in [1e-3, 1e-1],
    D_skip = 1, matrices N(0, 1/fan_in), embedding N(0, 1), unit-norm random prototypes.
    """
    rng = np.random.default_rng(seed)
    V, D, N, K, R = vocab_size, d_model, d_state, d_conv, dt_rank
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(vocab_size=V, d_model=D, n_layers=n_layers, d_state=N,
                                    d_conv=K, dt_rank=R).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "embedding":
            a = rng.standard_normal(shape)
        elif leaf == "conv_w":
            a = rng.standard_normal(shape) / math.sqrt(K)
        elif leaf == "conv_b":
            a = 0.1 * rng.standard_normal(shape)
        elif leaf == "x_proj_w":
            a = rng.standard_normal(shape) / math.sqrt(D)
        elif leaf == "dt_proj_w":
            a = rng.standard_normal(shape) / math.sqrt(R) * 0.1
        elif leaf == "dt_proj_b":
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=shape))
            a = dt + np.log(-np.expm1(-dt))  # inverse softplus
        elif leaf == "A_log":
            a = np.broadcast_to(np.log(np.arange(1, N + 1, dtype=np.float64)), shape).copy()
        elif leaf == "D_skip":
            a = np.ones(shape)
        elif leaf == "out_proj_w":
            a = out_proj_scale * rng.standard_normal(shape) / math.sqrt(D)
        elif leaf == "prototypes":
            a = rng.standard_normal(shape)
            a /= np.linalg.norm(a, axis=1, keepdims=True)
        else:  # pragma: no cover - param_shapes and this table are written together
            raise AssertionError(name)
        out[name] = np.ascontiguousarray(a, dtype=dtype)
    return out


# ----------------------------------------------------------------------------- building blocks

def causal_conv(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor) -> torch.Tensor:
    """pre[b,t,d] = conv_b[d] + sum_k conv_w[d,k] * x[b, t+k-(K-1), d], zero left pad.

    x (B,T,D), conv_w (D,K), conv_b (D) -> pre (B,T,D). conv1d is a cross-correlation, so after
    padding K-1 zeros on the left, tap k reads x[t+k-(K-1)]: conv_w[:, K-1] hits the current step.
    """
    D, K = conv_w.shape
    xt = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, D, T+K-1)
    return F.conv1d(xt, conv_w.unsqueeze(1), conv_b, groups=D).transpose(1, 2)


def _scan_loop(u, delta, A, Bt, Ct, D_skip):
    """Oracle scan: every quantity computed per step. u, delta (B,T,D); A (D,N); Bt, Ct (B,T,N)."""
    Bsz, T, D = u.shape
    h = u.new_zeros(Bsz, D, A.shape[1])  # (B,D,N)
    ys = []
    # unbind, not x[:, t]: the backward of T selects would materialise T full-size zero tensors
    for u_t, d_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), Bt.unbind(1), Ct.unbind(1)):
        dA = torch.exp(d_t[:, :, None] * A)                                   # (B,D,N)
        dBu = (d_t * u_t)[:, :, None] * B_t[:, None, :]                       # (B,D,N)
        h = dA * h + dBu
        ys.append((h * C_t[:, None, :]).sum(-1) + D_skip * u_t)               # (B,D)
    return torch.stack(ys, dim=1)


def _scan_vectorised(u, delta, A, Bt, Ct, D_skip):
    """exp(delta*A) and delta*u*Bt for all t at once; only h_t = dA_t*h_{t-1} + dBu_t loops."""
    dA = torch.exp(delta.unsqueeze(-1) * A)                                   # (B,T,D,N)
    dBu = (delta * u).unsqueeze(-1) * Bt.unsqueeze(2)                         # (B,T,D,N)
    h = torch.zeros_like(dA[:, 0])
    ys = []
    # unbind: one stack in backward. y_t is reduced inside the loop: stacking h (B,T,D,N) and
    # contracting with an einsum (a bmm of B*T tiny matrices) measured slower on CPU
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), Ct.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append((h * C_t[:, None, :]).sum(-1))                              # (B,D)
    return torch.stack(ys, dim=1) + D_skip * u


def _scan_chunked(u, delta, A, Bt, Ct, D_skip, chunk: int = 8):
    """Closed form inside chunks: with S_t = sum_{r<=t} delta_r*A (<= 0, cumulative in-chunk),
    h_t = exp(S_t) * h_start + sum_{s<=t} exp(S_t - S_s) * dBu_s. Memory B*T*chunk*D*N."""
    Bsz, T, D = u.shape
    N = A.shape[1]
    logA = delta.unsqueeze(-1) * A                                            # (B,T,D,N)
    dBu = (delta * u).unsqueeze(-1) * Bt.unsqueeze(2)                         # (B,T,D,N)
    h = u.new_zeros(Bsz, D, N)
    ys = []
    for t0 in range(0, T, chunk):
        c = min(chunk, T - t0)
        S = torch.cumsum(logA[:, t0:t0 + c], dim=1)                           # (B,c,D,N)
        diff = S.unsqueeze(2) - S.unsqueeze(1)                                # (B,c_t,c_s,D,N)
        mask = torch.tril(torch.ones(c, c, dtype=torch.bool, device=u.device))
        # masked (s > t) entries become exp(-inf) = 0 with zero gradient, never NaN
        decay = torch.exp(diff.masked_fill(~mask[None, :, :, None, None], float("-inf")))
        hc = torch.einsum("btsdn,bsdn->btdn", decay, dBu[:, t0:t0 + c])
        hc = hc + torch.exp(S) * h.unsqueeze(1)                               # (B,c,D,N)
        h = hc[:, -1]
        ys.append(torch.einsum("btdn,btn->btd", hc, Ct[:, t0:t0 + c]))
    return torch.cat(ys, dim=1) + D_skip * u


_SCANS = {"loop": _scan_loop, "vectorised": _scan_vectorised, "chunked": _scan_chunked}


def selective_scan(u, delta, A, Bt, Ct, D_skip, *, scan: str = "loop", chunk: int = 8):
    """y (B,T,D) from u, delta (B,T,D), A (D,N) (already -exp(A_log)), Bt, Ct (B,T,N), D_skip (D)."""
    if scan not in _SCANS:
        raise ValueError(f"scan must be one of {sorted(_SCANS)}, got {scan!r}")
    if scan == "chunked":
        return _scan_chunked(u, delta, A, Bt, Ct, D_skip, chunk=chunk)
    return _SCANS[scan](u, delta, A, Bt, Ct, D_skip)


def mamba_lite_layer(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, *, d_state: int,
                     scan: str = "loop", chunk: int = 8) -> torch.Tensor:
    """The mamba-lite layer for x (B,T,D): returns y @ out_proj_w (B,T,D), the residual branch."""
    N = d_state
    pre = causal_conv(x, p[prefix + "conv_w"], p[prefix + "conv_b"])
    u = F.silu(pre)
    xdbl = u @ p[prefix + "x_proj_w"]                                         # (B,T,2N+R)
    Bt, Ct, draw = xdbl[..., :N], xdbl[..., N:2 * N], xdbl[..., 2 * N:]
    delta = F.softplus(draw @ p[prefix + "dt_proj_w"] + p[prefix + "dt_proj_b"],
                       beta=1.0, threshold=SOFTPLUS_THRESHOLD)               # (B,T,D)
    A = -torch.exp(p[prefix + "A_log"])                                       # (D,N)
    y = selective_scan(u, delta, A, Bt, Ct, p[prefix + "D_skip"], scan=scan, chunk=chunk)
    return y @ p[prefix + "out_proj_w"]


def hpn_loss(z: torch.Tensor, P: torch.Tensor, targets: torch.Tensor, *,
             normalize_prototypes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """z (n,D), P (V,D), targets (n) -> (loss, cos (n)). loss = mean (1 - zhat.Pt[y])^2."""
    zhat = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    Py = P[targets]                                                           # (n,D)
    if normalize_prototypes:
        # normalising only the gathered rows equals normalising all of P, then gathering
        Py = Py / torch.linalg.vector_norm(Py, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    cos = (zhat * Py).sum(-1)
    return ((1.0 - cos) ** 2).mean(), cos


def forward_loss(p: Mapping[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor, *,
                 n_layers: int, d_state: int, normalize_prototypes: bool = True,
                 scan: str = "loop", chunk: int = 8, return_aux: bool = False):
    """Whole model: ids, targets (B,T) int64 -> scalar loss (and z, cos if asked)."""
    r = p["embedding"][ids]                                                   # (B,T,D)
    for i in range(n_layers):
        r = r + mamba_lite_layer(r, p, f"layers.{i}.", d_state=d_state, scan=scan, chunk=chunk)
    z = F.layer_norm(r, (r.shape[-1],), eps=LN_EPS)
    loss, cos = hpn_loss(z.reshape(-1, z.shape[-1]), p["head.prototypes"], targets.reshape(-1),
                         normalize_prototypes=normalize_prototypes)
    if return_aux:
        return loss, {"z": z, "cos": cos.reshape(ids.shape)}
    return loss


# ----------------------------------------------------------------------------- numpy entry points

def _check_ids(name: str, a: np.ndarray, V: int) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D integer array (B,T), got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= V):
        raise ValueError(f"{name} out of range [0, {V}): min {a.min()}, max {a.max()}")
    return torch.from_numpy(a.astype(np.int64, copy=False))


def loss_and_grads(params: Mapping[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, *,
                   n_layers: int, d_state: int, dt_rank: int,
                   normalize_prototypes: bool = True, learnable_prototypes: bool = True,
                   dtype: str = "float64", scan: str = "loop", chunk: int = 8,
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and autograd gradients for every parameter, as numpy arrays of `dtype`.

    `head.prototypes` is in the gradient dict only if `learnable_prototypes`. Inputs are copied
    (never modified). Raises ValueError for missing or mis-shaped parameters and for ids or
    targets outside [0, V).
    """
    tdt = _torch_dtype(dtype)
    V, D = np.shape(params["embedding"])
    K = np.shape(params["layers.0.conv_w"])[1] if n_layers else 1
    expected = param_shapes(vocab_size=V, d_model=D, n_layers=n_layers, d_state=d_state,
                            d_conv=K, dt_rank=dt_rank)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r}")
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {np.shape(params[name])}")
    ids_t = _check_ids("ids", ids, V)
    tg_t = _check_ids("targets", targets, V)
    if ids_t.shape != tg_t.shape:
        raise ValueError(f"ids {tuple(ids_t.shape)} and targets {tuple(tg_t.shape)} differ")

    p = {}
    for name in expected:
        t = torch.tensor(np.asarray(params[name]), dtype=tdt)  # a copy
        t.requires_grad_(name != "head.prototypes" or learnable_prototypes)
        p[name] = t
    loss = forward_loss(p, ids_t, tg_t, n_layers=n_layers, d_state=d_state,
                        normalize_prototypes=normalize_prototypes, scan=scan, chunk=chunk)
    names = [n for n in expected if p[n].requires_grad]
    grads = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
    out = {}
    np_dtype = np.float64 if tdt == torch.float64 else np.float32
    for n, g in zip(names, grads):
        out[n] = (np.zeros(expected[n], dtype=np_dtype) if g is None
                  else g.detach().numpy().astype(np_dtype, copy=True))
    return float(loss.item()), out


def adamw_reference_step(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                         exp_avg: Mapping[str, np.ndarray], exp_avg_sq: Mapping[str, np.ndarray],
                         *, step: int, lr: float, betas: tuple[float, float], eps: float,
                         weight_decay: float, decay_names,
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                    dict[str, np.ndarray]]:
    """One AdamW update through torch.optim.adamw.adamw (torch's single-tensor functional path).

    `step` is the 1-based index of THIS update (bias corrections 1 - beta^step). Only names in
    `grads` are updated; the others are returned unchanged (frozen tensors: no update, no moment
    change). Tensors in `decay_names` get `weight_decay`, the others 0. Computed, and the moments
    returned, in each parameter's own dtype. Inputs are not modified; returns new
    (params, exp_avg, exp_avg_sq).
    """
    from torch.optim.adamw import adamw as _adamw

    if step < 1:
        raise ValueError(f"step is the 1-based update count, got {step}")
    decay_names = set(decay_names)
    new_p = {k: np.array(v, copy=True) for k, v in params.items()}
    # moments are held in each parameter's dtype (as torch and the flat buffers do)
    new_m = {k: np.array(v, dtype=new_p[k].dtype if k in new_p else None, copy=True)
             for k, v in exp_avg.items()}
    new_v = {k: np.array(v, dtype=new_p[k].dtype if k in new_p else None, copy=True)
             for k, v in exp_avg_sq.items()}
    for name, g in grads.items():
        dt = torch.from_numpy(new_p[name]).dtype
        p_t = torch.from_numpy(new_p[name])              # shares memory: updated in place
        m_t = torch.from_numpy(new_m[name])
        v_t = torch.from_numpy(new_v[name])
        g_t = torch.tensor(np.asarray(g), dtype=dt)
        # torch increments the step tensor before using it
        step_t = torch.tensor(float(step - 1), dtype=torch.float32)
        with torch.no_grad():
            _adamw([p_t], [g_t], [m_t], [v_t], [], [step_t], foreach=False, capturable=False,
                   differentiable=False, fused=False, amsgrad=False, beta1=betas[0],
                   beta2=betas[1], lr=lr, weight_decay=weight_decay if name in decay_names
                   else 0.0, eps=eps, maximize=False)
    return new_p, new_m, new_v


# ----------------------------------------------------------------------------- nn.Module (bench)

class _Layer(torch.nn.Module):
    def __init__(self, D: int, N: int, K: int, R: int, dtype):
        super().__init__()
        e = lambda *s: torch.nn.Parameter(torch.empty(*s, dtype=dtype))  # noqa: E731
        self.conv_w, self.conv_b = e(D, K), e(D)
        self.x_proj_w, self.dt_proj_w, self.dt_proj_b = e(D, 2 * N + R), e(R, D), e(D)
        self.A_log, self.D_skip, self.out_proj_w = e(D, N), e(D), e(D, D)


class _Head(torch.nn.Module):
    def __init__(self, V: int, D: int, learnable: bool, dtype):
        super().__init__()
        if learnable:
            self.prototypes = torch.nn.Parameter(torch.empty(V, D, dtype=dtype))
        else:
            self.register_buffer("prototypes", torch.empty(V, D, dtype=dtype))


class TorchMambaHPN(torch.nn.Module):
    """nn.Module over forward_loss; `named_parameters()` yields the contract names.

    train_step(ids, targets) does zero_grad + forward + backward + AdamW and returns the loss.
    With `compile=True` the loss function goes through torch.compile (slow first call).
    """

    def __init__(self, *, vocab_size: int, d_model: int, n_layers: int, d_state: int, d_conv: int,
                 dt_rank: int, normalize_prototypes: bool = True,
                 learnable_prototypes: bool = True, scan: str = "vectorised", chunk: int = 8,
                 dtype=torch.float32):
        super().__init__()
        V, D = vocab_size, d_model
        self.n_layers, self.d_state = n_layers, d_state
        self.normalize_prototypes, self.scan, self.chunk = normalize_prototypes, scan, chunk
        self.embedding = torch.nn.Parameter(torch.empty(V, D, dtype=dtype))
        self.layers = torch.nn.ModuleList(
            _Layer(D, d_state, d_conv, dt_rank, dtype) for _ in range(n_layers))
        self.head = _Head(V, D, learnable_prototypes, dtype)
        self.optimizer: torch.optim.Optimizer | None = None
        self._loss_fn = self._loss

    def load_numpy(self, params: Mapping[str, np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}
        self.load_state_dict(state, strict=True)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict(keep_vars=True))

    def _loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return forward_loss(self.named_tensors(), ids, targets, n_layers=self.n_layers,
                            d_state=self.d_state, normalize_prototypes=self.normalize_prototypes,
                            scan=self.scan, chunk=self.chunk)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(ids, targets)

    def forward_backward(self, ids: torch.Tensor, targets: torch.Tensor) -> float:
        for q in self.parameters():
            q.grad = None
        loss = self._loss_fn(ids, targets)
        loss.backward()
        return float(loss.detach())

    def train_step(self, ids, targets) -> float:
        if self.optimizer is None:
            raise RuntimeError("build the model with build_torch_model(...) to get an optimizer")
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        loss = self.forward_backward(ids, targets)
        self.optimizer.step()
        return loss


def build_torch_model(*, vocab_size: int, d_model: int, n_layers: int, d_state: int = 16,
                      d_conv: int = 4, dt_rank: int = 1, params: Mapping[str, np.ndarray] | None
                      = None, seed: int = 0, normalize_prototypes: bool = True,
                      learnable_prototypes: bool = True, lr: float = 1e-4,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      weight_decay: float = 0.01, decay_names=None, scan: str = "vectorised",
                      chunk: int = 8, compile: bool = False, dtype: str = "float32",
                      ) -> TorchMambaHPN:
    """The same math as `loss_and_grads` as an nn.Module with an AdamW optimizer attached.

    `params` (numpy, contract names) or, if None, `init_params(seed=seed)`. `decay_names`
    defaults to the matrices (ndim >= 2). `compile=True` wraps the loss in
    torch.compile (needs a C++ compiler; compiling the unrolled T-step scan takes a while).
    """
    model = TorchMambaHPN(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                          d_state=d_state, d_conv=d_conv, dt_rank=dt_rank,
                          normalize_prototypes=normalize_prototypes,
                          learnable_prototypes=learnable_prototypes, scan=scan, chunk=chunk,
                          dtype=_torch_dtype(dtype))
    if params is None:
        params = init_params(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                             d_state=d_state, d_conv=d_conv, dt_rank=dt_rank, seed=seed,
                             dtype=dtype)
    model.load_numpy(params)
    named = dict(model.named_parameters())
    if decay_names is None:
        decay_names = [n for n, q in named.items() if q.ndim >= 2]
    decay_names = set(decay_names)
    groups = [
        {"params": [q for n, q in named.items() if n in decay_names], "weight_decay": weight_decay},
        {"params": [q for n, q in named.items() if n not in decay_names], "weight_decay": 0.0},
    ]
    model.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                        eps=eps, foreach=False)
    if compile:
        model._loss_fn = torch.compile(model._loss)
    return model


# ============================================================================ the `mamba` block
#
# The full Mamba block, written with torch ops and autograd only (F.rms_norm, F.linear-free matmuls, F.silu,
# F.softplus, conv1d), independent of rtrainer's kernels and of rtrainer/testing/reference.py. Names:
#
#     layers.{i}.norm_w     (D,)        RMSNorm weight (eps 1e-5)
#     layers.{i}.in_proj_w  (D, 2C)     xn @ in_proj_w = [xin | zg], C = E*D
#     layers.{i}.conv_w     (C, K)   conv_b (C,)
#     layers.{i}.x_proj_w   (C, 2N+R)   u @ x_proj_w = [Bt | Ct | draw]
#     layers.{i}.dt_proj_w  (R, C)   dt_proj_b (C,)   A_log (C, N)   D_skip (C,)
#     layers.{i}.out_proj_w (C, D)
#
#     xn = rms_norm(r) * norm_w ; [xin | zg] = xn @ in_proj_w ; u = silu(conv(xin))
#     y = scan(u, delta, A, Bt, Ct, D_skip) ; r = r + (y * silu(zg)) @ out_proj_w
#
# selective=False (the LTI ablation, either layer kind): B_lti (N,), C_lti (N,) replace x_proj_w and
# dt_proj_w; Bt_t = B_lti, Ct_t = C_lti for every token and delta = softplus(dt_proj_b).

MAMBA_LAYER_PARAM_NAMES = ("norm_w", "in_proj_w", "conv_w", "conv_b", "x_proj_w", "dt_proj_w",
                           "dt_proj_b", "A_log", "D_skip", "out_proj_w")
RMS_EPS = 1e-5


def _lti_shapes(shapes: dict, prefix: str, N: int, selective: bool) -> dict:
    if selective:
        return shapes
    out = {}
    for k, v in shapes.items():
        if k == prefix + "x_proj_w":
            out[prefix + "B_lti"] = (N,)
        elif k == prefix + "dt_proj_w":
            out[prefix + "C_lti"] = (N,)
        else:
            out[k] = v
    return out


def mamba_param_shapes(*, vocab_size: int, d_model: int, n_layers: int, d_state: int, d_conv: int,
                       dt_rank: int, expand: int, layer: str = "mamba",
                       selective: bool = True) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of a `mamba` (or, with layer="mamba-lite", a mamba-lite)
    stack, with the LTI replacement when selective is False."""
    V, D, N, K, R = vocab_size, d_model, d_state, d_conv, dt_rank
    if layer == "mamba-lite":
        shapes = param_shapes(vocab_size=V, d_model=D, n_layers=n_layers, d_state=N, d_conv=K,
                              dt_rank=R)
        for i in range(n_layers):
            shapes = _lti_shapes(shapes, f"layers.{i}.", N, selective)
        return shapes
    C = expand * D
    shapes: dict[str, tuple[int, ...]] = {"embedding": (V, D)}
    for i in range(n_layers):
        p = f"layers.{i}."
        layer_shapes = {p + "norm_w": (D,), p + "in_proj_w": (D, 2 * C), p + "conv_w": (C, K),
                        p + "conv_b": (C,), p + "x_proj_w": (C, 2 * N + R), p + "dt_proj_w": (R, C),
                        p + "dt_proj_b": (C,), p + "A_log": (C, N), p + "D_skip": (C,),
                        p + "out_proj_w": (C, D)}
        shapes.update(_lti_shapes(layer_shapes, p, N, selective))
    shapes["head.prototypes"] = (V, D)
    return shapes


def _ssm(u: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, *, d_state: int,
         selective: bool, scan: str, chunk: int) -> torch.Tensor:
    """delta, Bt, Ct from u (B,T,C) (selective) or from the LTI parameters, then the scan."""
    N = d_state
    if selective:
        xdbl = u @ p[prefix + "x_proj_w"]                                     # (B,T,2N+R)
        Bt, Ct, draw = xdbl[..., :N], xdbl[..., N:2 * N], xdbl[..., 2 * N:]
        delta = F.softplus(draw @ p[prefix + "dt_proj_w"] + p[prefix + "dt_proj_b"],
                           beta=1.0, threshold=SOFTPLUS_THRESHOLD)
    else:
        Bt = p[prefix + "B_lti"].expand(u.shape[0], u.shape[1], N)
        Ct = p[prefix + "C_lti"].expand(u.shape[0], u.shape[1], N)
        delta = F.softplus(p[prefix + "dt_proj_b"], beta=1.0,
                           threshold=SOFTPLUS_THRESHOLD).expand_as(u)
    A = -torch.exp(p[prefix + "A_log"])
    return selective_scan(u, delta, A, Bt, Ct, p[prefix + "D_skip"], scan=scan, chunk=chunk)


def mamba_layer(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, *, d_state: int,
                selective: bool = True, scan: str = "loop", chunk: int = 8) -> torch.Tensor:
    """The full Mamba block for x (B,T,D): the residual branch (y * silu(zg)) @ out_proj_w (B,T,D)."""
    C = p[prefix + "conv_w"].shape[0]
    xn = F.rms_norm(x, (x.shape[-1],), p[prefix + "norm_w"], eps=RMS_EPS)
    xz = xn @ p[prefix + "in_proj_w"]                                         # (B,T,2C)
    xin, zg = xz[..., :C], xz[..., C:]
    u = F.silu(causal_conv(xin, p[prefix + "conv_w"], p[prefix + "conv_b"]))
    y = _ssm(u, p, prefix, d_state=d_state, selective=selective, scan=scan, chunk=chunk)
    return (y * F.silu(zg)) @ p[prefix + "out_proj_w"]


def _lite_layer(x, p, prefix, *, d_state, selective, scan, chunk):
    u = F.silu(causal_conv(x, p[prefix + "conv_w"], p[prefix + "conv_b"]))
    y = _ssm(u, p, prefix, d_state=d_state, selective=selective, scan=scan, chunk=chunk)
    return y @ p[prefix + "out_proj_w"]


def mamba_forward_loss(p: Mapping[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor, *,
                       n_layers: int, d_state: int, layer: str = "mamba", selective: bool = True,
                       normalize_prototypes: bool = True, scan: str = "loop", chunk: int = 8):
    """Embedding -> layers -> LayerNorm (no affine) -> HPN loss, for either layer kind."""
    fn = mamba_layer if layer == "mamba" else _lite_layer
    r = p["embedding"][ids]
    for i in range(n_layers):
        r = r + fn(r, p, f"layers.{i}.", d_state=d_state, selective=selective, scan=scan, chunk=chunk)
    z = F.layer_norm(r, (r.shape[-1],), eps=LN_EPS)
    loss, _ = hpn_loss(z.reshape(-1, z.shape[-1]), p["head.prototypes"], targets.reshape(-1),
                       normalize_prototypes=normalize_prototypes)
    return loss


def mamba_loss_and_grads(params: Mapping[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, *,
                         n_layers: int, d_state: int, dt_rank: int, expand: int = 2,
                         layer: str = "mamba", selective: bool = True,
                         normalize_prototypes: bool = True, learnable_prototypes: bool = True,
                         dtype: str = "float64", scan: str = "loop", chunk: int = 8,
                         ) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and autograd gradients of the `mamba` stack (or of an LTI mamba-lite stack), as numpy
    arrays of `dtype`; the same contract as `loss_and_grads`."""
    tdt = _torch_dtype(dtype)
    V, D = np.shape(params["embedding"])
    K = np.shape(params["layers.0.conv_w"])[1] if n_layers else 1
    expected = mamba_param_shapes(vocab_size=V, d_model=D, n_layers=n_layers, d_state=d_state,
                                  d_conv=K, dt_rank=dt_rank, expand=expand, layer=layer,
                                  selective=selective)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r}")
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {np.shape(params[name])}")
    ids_t = _check_ids("ids", ids, V)
    tg_t = _check_ids("targets", targets, V)
    p = {}
    for name in expected:
        t = torch.tensor(np.asarray(params[name]), dtype=tdt)
        t.requires_grad_(name != "head.prototypes" or learnable_prototypes)
        p[name] = t
    loss = mamba_forward_loss(p, ids_t, tg_t, n_layers=n_layers, d_state=d_state, layer=layer,
                              selective=selective, normalize_prototypes=normalize_prototypes,
                              scan=scan, chunk=chunk)
    names = [n for n in expected if p[n].requires_grad]
    grads = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
    np_dtype = np.float64 if tdt == torch.float64 else np.float32
    out = {n: (np.zeros(expected[n], dtype=np_dtype) if g is None
               else g.detach().numpy().astype(np_dtype, copy=True)) for n, g in zip(names, grads)}
    return float(loss.item()), out


class TorchMambaStackHPN(torch.nn.Module):
    """nn.Module over mamba_forward_loss (PyTorch eager peer of bench/compare.py --layer mamba);
    parameters are created from a name -> numpy dict and keep the contract names (dots -> '__')."""

    def __init__(self, params: Mapping[str, np.ndarray], *, n_layers: int, d_state: int,
                 normalize_prototypes: bool = True, learnable_prototypes: bool = False,
                 scan: str = "vectorised", chunk: int = 8, dtype=torch.float32):
        super().__init__()
        self.n_layers, self.d_state = n_layers, d_state
        self.normalize_prototypes, self.scan, self.chunk = normalize_prototypes, scan, chunk
        self.names = list(params)
        for name, a in params.items():
            t = torch.tensor(np.asarray(a), dtype=dtype)
            if name == "head.prototypes" and not learnable_prototypes:
                self.register_buffer(name.replace(".", "__"), t)
            else:
                self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(t))
        self.optimizer: torch.optim.Optimizer | None = None
        self._loss_fn = self._loss

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "__")) for n in self.names}

    def _loss(self, ids, targets):
        return mamba_forward_loss(self.named_tensors(), ids, targets, n_layers=self.n_layers,
                                  d_state=self.d_state, normalize_prototypes=self.normalize_prototypes,
                                  scan=self.scan, chunk=self.chunk)

    def train_step(self, ids, targets) -> float:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        for q in self.parameters():
            q.grad = None
        loss = self._loss_fn(ids, targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def build_torch_mamba_model(params: Mapping[str, np.ndarray], *, n_layers: int, d_state: int,
                            normalize_prototypes: bool = True, learnable_prototypes: bool = False,
                            lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                            weight_decay: float = 0.01, decay_names=(), scan: str = "vectorised",
                            compile: bool = False) -> TorchMambaStackHPN:
    """The `mamba` stack as an nn.Module with AdamW (weight decay on `decay_names`)."""
    model = TorchMambaStackHPN(params, n_layers=n_layers, d_state=d_state,
                               normalize_prototypes=normalize_prototypes,
                               learnable_prototypes=learnable_prototypes, scan=scan)
    decay_names = set(decay_names)
    named = dict(model.named_parameters())
    groups = [
        {"params": [q for n, q in named.items() if n.replace("__", ".") in decay_names],
         "weight_decay": weight_decay},
        {"params": [q for n, q in named.items() if n.replace("__", ".") not in decay_names],
         "weight_decay": 0.0},
    ]
    model.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                        eps=eps, foreach=False)
    if compile:
        model._loss_fn = torch.compile(model._loss)
    return model
