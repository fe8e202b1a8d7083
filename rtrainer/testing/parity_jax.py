"""Independent JAX implementation of the rtrainer model: the second cross-framework oracle.

The mamba-lite model and the AdamW step written with `jax.numpy`, `jax.lax.scan` over time and
`jax.value_and_grad` only: no hand-written backward. It mirrors rtrainer/testing/parity_torch.py (same
parameter-name contract, same `loss_and_grads` signature) so that rtrainer's Cython kernels can
be checked against, and benchmarked beside, a second framework.
jax is an optional dependency (`pip install "jax[cpu]"`; written against jax/jaxlib 0.10.2);
this module imports it at import time, so callers guard with `pytest.importorskip("jax")`.

Glossary (notation): B batch, T time, D d_model, N d_state, K d_conv, R dt_rank, V vocab,
L layers. Parameter names (the contract shared with rtrainer's flat buffer and parity_torch):

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
                y_t = h_t . Ct_t + D_skip * u_t                             (lax.scan over t)
                r = r + y @ out_proj_w
    z = layer_norm(r) (no affine, eps 1e-5, biased variance)
    zhat = z / max(|z|, 1e-8);  Pt = P / max(|P_k|, 1e-8) if normalize_prototypes else P
    cos_i = zhat_i . Pt[y_i];   loss = mean over the B*T tokens of (1 - cos_i)^2
AdamW (PyTorch formulation, bias correction counted in updates, step s = 1, 2, ...):
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  p *= 1 - lr*wd  (decayed tensors only)
    p -= lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s) + eps)

Precision. Importing this module changes no JAX setting. The float64 paths
(`loss_and_grads(..., dtype="float64")`, `mamba_loss_and_grads`) turn on `jax_enable_x64` for the
duration of the call only (set and restored, :func:`float64`), so they really compute in float64
while the rest of the process keeps JAX's defaults. Every array is cast explicitly to the
requested dtype and all constants are Python scalars (weakly typed), so the float32 paths
(`dtype="float32"`, `build_jax_train_step`) stay float32 either way.

Threads. XLA:CPU (jaxlib 0.10.2) sizes its intra-op thread pool from the CPUs the process may
run on (sched_getaffinity), read once when the CPU client is created (first jax computation).
`XLA_FLAGS` has no thread-count flag in this version, and none of the flags limits the pool:
  * `--intra_op_parallelism_threads=1` is not an XLA flag: XLA aborts with
    "Unknown flag in XLA_FLAGS"; written without the dashes it is silently ignored;
  * `--xla_cpu_multi_thread_eigen=false` only makes Eigen's matmul/conv calls single-threaded;
    XLA still splits its own loops over every CPU (measured: 1.7-1.8 CPU-seconds per second).
What works is CPU affinity. Launch the benchmark subprocess for n threads as

    taskset -c 0 python ...      # 1 thread  (also XLA_FLAGS=--xla_cpu_multi_thread_eigen=false)
    taskset -c 0,1 python ...    # 2 threads

or call `limit_cpu_threads(n)` (os.sched_setaffinity) before the first jax computation.
Set OMP_NUM_THREADS=n and OPENBLAS_NUM_THREADS=n too, so nothing else in the process spins.
Verified at the baseline shape (B 8, T 64, D 512, N 16, K 4, R 1, L 2, V 8192, fixed
prototypes) on the 2-core machine, other jobs running: taskset -c 0 -> 1.00 CPU-s/s, median
step ~218 ms; taskset -c 0,1 -> 1.72 CPU-s/s, ~175 ms; the XLA_FLAGS above without affinity
-> 1.72 CPU-s/s (i.e. not limited).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator, Mapping

import numpy as np

import jax
import jax.numpy as jnp

__all__ = [
    "JAX_VERSION",
    "LAYER_PARAM_NAMES",
    "param_shapes",
    "default_decay_names",
    "limit_cpu_threads",
    "float64",
    "causal_conv",
    "selective_scan",
    "forward_loss",
    "loss_and_grads",
    "JaxTrainStep",
    "build_jax_train_step",
]

JAX_VERSION = jax.__version__
LAYER_PARAM_NAMES = (
    "conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w",
)
LN_EPS = 1e-5
NORM_EPS = 1e-8  # max(|z|, 1e-8) and max(|P_k|, 1e-8) in the HPN head
SOFTPLUS_THRESHOLD = 20.0
# tensors that rtrainer decays under weight_decay_scope = "matrices" (rtrainer/model.py, heads.py):
# the weight matrices, NOT A_log (D, N) although it is 2-D
_DECAY_LEAVES = ("embedding", "conv_w", "x_proj_w", "dt_proj_w", "out_proj_w", "prototypes")

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


def _jnp_dtype(dtype):
    key = np.dtype(dtype).name
    if key not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return _DTYPES[key]


@contextlib.contextmanager
def float64(enabled: bool = True) -> Iterator[None]:
    """Within the block, JAX computes in float64 (``jax_enable_x64``); the previous setting is
    restored on exit. ``enabled=False`` leaves everything as it is."""
    if not enabled:
        yield
        return
    prev = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def limit_cpu_threads(n: int) -> None:
    """Restrict this process (and so XLA's CPU thread pool) to the first n CPUs it may use.

    Must run before the first jax computation of the process: XLA reads the CPU count once
    when its CPU client is created. Equivalent to launching under `taskset -c 0..n-1`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:n])


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


def default_decay_names(names) -> list[str]:
    """rtrainer's default weight-decay set ("matrices"): embedding, conv_w, x_proj_w,
    dt_proj_w, out_proj_w and (when trained) head.prototypes; not A_log, biases, D_skip."""
    return [n for n in names if n.rsplit(".", 1)[-1] in _DECAY_LEAVES]


# ----------------------------------------------------------------------------- building blocks

def _softplus(x):
    """x if x > 20 else log1p(exp(x)); the unused branch never sees a large argument, so both
    value and gradient (1 above the threshold, sigmoid(x) below) are finite and exact."""
    big = x > SOFTPLUS_THRESHOLD
    return jnp.where(big, x, jnp.log1p(jnp.exp(jnp.where(big, 0.0, x))))


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _floored_norm(a):
    """max(|a|, 1e-8) over the last axis, written as sqrt(max(|a|^2, 1e-16)) so that the
    gradient at a = 0 is 0 through the floor (never 0 * inf)."""
    s = jnp.sum(a * a, axis=-1, keepdims=True)
    eps2 = NORM_EPS * NORM_EPS
    return jnp.sqrt(jnp.where(s > eps2, s, eps2))


def causal_conv(x, conv_w, conv_b):
    """pre[b,t,d] = conv_b[d] + sum_k conv_w[d,k] * x[b, t+k-(K-1), d], zero left pad.
    x (B,T,D), conv_w (D,K), conv_b (D) -> (B,T,D)."""
    T = x.shape[1]
    K = conv_w.shape[1]
    xp = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    pre = conv_b
    for k in range(K):
        pre = pre + conv_w[:, k] * xp[:, k:k + T, :]
    return pre


def selective_scan(u, delta, A, Bt, Ct, D_skip):
    """y (B,T,D) from u, delta (B,T,D), A (D,N) (already -exp(A_log)), Bt, Ct (B,T,N), D_skip (D).

    One `lax.scan` over time; each step forms exp(delta_t*A) and (delta_t*u_t) outer Bt_t for
    its own t, updates h (B,D,N) and emits y_t = h_t.Ct_t. Forming the (B,D,N) factors inside
    the step measured ~1.5x faster than precomputing them for all t as (B,T,D,N) tensors (the
    memory traffic dominates), and `unroll` > 1 gained nothing (baseline shape, jax 0.10.2).
    jax.grad of the scan keeps h_t per step (B*T*D*N floats), as torch autograd does.
    """
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (u, delta, Bt, Ct))   # time-major

    def step(h, x):
        u_t, d_t, B_t, C_t = x                                      # (B,D) (B,D) (B,N) (B,N)
        h = jnp.exp(d_t[:, :, None] * A) * h + (d_t * u_t)[:, :, None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    h0 = jnp.zeros(u.shape[:1] + A.shape, u.dtype)                  # h_{-1} = 0, (B,D,N)
    _, ys = jax.lax.scan(step, h0, xs)                              # (T,B,D)
    return jnp.moveaxis(ys, 0, 1) + D_skip * u


def mamba_lite_layer(x, p: Mapping, prefix: str, *, d_state: int):
    """The mamba-lite layer for x (B,T,D): returns y @ out_proj_w (B,T,D), the residual branch."""
    N = d_state
    u = _silu(causal_conv(x, p[prefix + "conv_w"], p[prefix + "conv_b"]))
    xdbl = u @ p[prefix + "x_proj_w"]                           # (B,T,2N+R)
    Bt, Ct, draw = xdbl[..., :N], xdbl[..., N:2 * N], xdbl[..., 2 * N:]
    delta = _softplus(draw @ p[prefix + "dt_proj_w"] + p[prefix + "dt_proj_b"])
    A = -jnp.exp(p[prefix + "A_log"])
    y = selective_scan(u, delta, A, Bt, Ct, p[prefix + "D_skip"])
    return y @ p[prefix + "out_proj_w"]


def layer_norm(r):
    """(r - mean) / sqrt(var + 1e-5) over the last axis, biased variance, no affine."""
    mu = jnp.mean(r, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(r - mu), axis=-1, keepdims=True)
    return (r - mu) / jnp.sqrt(var + LN_EPS)


def hpn_loss(z, P, targets, *, normalize_prototypes: bool = True):
    """z (n,D), P (V,D), targets (n) -> (loss, cos (n)). loss = mean (1 - zhat.Pt[y])^2."""
    zhat = z / _floored_norm(z)
    Py = P[targets]                                             # (n,D)
    if normalize_prototypes:
        # normalising only the gathered rows equals normalising all of P, then gathering
        Py = Py / _floored_norm(Py)
    cos = jnp.sum(zhat * Py, axis=-1)
    return jnp.mean(jnp.square(1.0 - cos)), cos


def forward_loss(p: Mapping, ids, targets, *, n_layers: int, d_state: int,
                 normalize_prototypes: bool = True):
    """Whole model: ids, targets (B,T) int -> scalar loss. p: name -> jax array."""
    r = p["embedding"][ids]                                     # (B,T,D)
    for i in range(n_layers):
        r = r + mamba_lite_layer(r, p, f"layers.{i}.", d_state=d_state)
    z = layer_norm(r)
    loss, _ = hpn_loss(z.reshape(-1, z.shape[-1]), p["head.prototypes"], targets.reshape(-1),
                       normalize_prototypes=normalize_prototypes)
    return loss


# ----------------------------------------------------------------------------- numpy entry points

def _check_ids(name: str, a, V: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D integer array (B,T), got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= V):
        # jax clamps out-of-range gather indices silently: reject them here
        raise ValueError(f"{name} out of range [0, {V}): min {a.min()}, max {a.max()}")
    return a.astype(np.int32, copy=False)


def _check_params(params: Mapping, n_layers: int, d_state: int, dt_rank: int):
    if "embedding" not in params:
        raise ValueError("missing parameter 'embedding'")
    V, D = np.shape(params["embedding"])
    K = (np.shape(params["layers.0.conv_w"])[1]
         if n_layers and "layers.0.conv_w" in params else 1)
    expected = param_shapes(vocab_size=V, d_model=D, n_layers=n_layers, d_state=d_state,
                            d_conv=K, dt_rank=dt_rank)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r}")
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {np.shape(params[name])}")
    return V, expected


def _split(names, learnable_prototypes):
    train = [n for n in names if n != "head.prototypes" or learnable_prototypes]
    fixed = [n for n in names if n not in train]
    return train, fixed


_GRAD_FNS: dict = {}


def _grad_fn(n_layers, d_state, normalize_prototypes, fast_compile):
    key = (n_layers, d_state, normalize_prototypes, fast_compile)
    if key not in _GRAD_FNS:
        # LLVM -O0 (xla_backend_optimization_level 0) compiles ~40% faster; XLA:CPU does not use
        # fast-math by default, so the numbers are the same, only the code is slower
        opts = {"xla_backend_optimization_level": 0} if fast_compile else None

        def loss_fn(train, fixed, ids, targets):
            return forward_loss({**train, **fixed}, ids, targets, n_layers=n_layers,
                                d_state=d_state, normalize_prototypes=normalize_prototypes)
        _GRAD_FNS[key] = jax.jit(jax.value_and_grad(loss_fn), compiler_options=opts)
    return _GRAD_FNS[key]


def loss_and_grads(params: Mapping[str, np.ndarray], ids, targets, *, n_layers: int,
                   d_state: int, dt_rank: int, normalize_prototypes: bool = True,
                   learnable_prototypes: bool = True, dtype: str = "float64",
                   fast_compile: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and jax.value_and_grad gradients for every parameter, as numpy arrays of `dtype`.

    Same contract as rtrainer.testing.parity_torch.loss_and_grads: `head.prototypes` is in the gradient
    dict only if `learnable_prototypes`; inputs are never modified; ValueError for missing or
    mis-shaped parameters and for ids or targets outside [0, V). The jit-compiled function is
    cached per (n_layers, d_state, normalize_prototypes, fast_compile) and input shape/dtype;
    `fast_compile=True` compiles with LLVM -O0 (same numbers, quicker compile, slower run: for
    tests on tiny shapes).
    """
    jdt = _jnp_dtype(dtype)
    V, expected = _check_params(params, n_layers, d_state, dt_rank)
    ids_a = _check_ids("ids", ids, V)
    tg_a = _check_ids("targets", targets, V)
    if ids_a.shape != tg_a.shape:
        raise ValueError(f"ids {ids_a.shape} and targets {tg_a.shape} differ")
    train_names, fixed_names = _split(expected, learnable_prototypes)
    np_dtype = np.dtype(dtype)
    with float64(np_dtype == np.float64):
        train = {n: jnp.asarray(np.asarray(params[n]), dtype=jdt) for n in train_names}
        fixed = {n: jnp.asarray(np.asarray(params[n]), dtype=jdt) for n in fixed_names}
        loss, grads = _grad_fn(n_layers, d_state, normalize_prototypes, fast_compile)(
            train, fixed, jnp.asarray(ids_a), jnp.asarray(tg_a))
        out = {n: np.array(grads[n], dtype=np_dtype) for n in train_names}
        return float(loss), out


# ----------------------------------------------------------------------------- training step

class JaxTrainStep:
    """Forward + backward + AdamW in one jit-compiled float32 function; state on the object.

    step(ids, targets) -> float loss (blocks until the update is done, so wall time is honest).
    params() -> {name: float32 numpy array} (all parameters, fixed prototypes included).
    moments() -> (exp_avg, exp_avg_sq) of the trained tensors, as numpy.
    `compile_seconds` is the time of the first call (trace + XLA compile + one step).
    """

    def __init__(self, params: Mapping[str, np.ndarray], *, n_layers: int, d_state: int,
                 dt_rank: int, normalize_prototypes: bool, learnable_prototypes: bool, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, decay_names,
                 fast_compile: bool = False, layer: str = "mamba-lite"):
        if layer == "mamba":   # the full block: names and shapes as given (see mamba_layer)
            self.V = int(np.shape(params["embedding"])[0])
            expected = {n: tuple(np.shape(a)) for n, a in params.items()}
        else:
            self.V, expected = _check_params(params, n_layers, d_state, dt_rank)
        self.names = list(expected)
        train_names, fixed_names = _split(expected, learnable_prototypes)
        if decay_names is None:
            decay_names = default_decay_names(train_names)
        decay = frozenset(decay_names)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), \
            float(weight_decay)
        self.t = 0
        self.compile_seconds: float | None = None
        f32 = jnp.float32
        self._train = {n: jnp.array(np.asarray(params[n]), dtype=f32) for n in train_names}
        self._fixed = {n: jnp.array(np.asarray(params[n]), dtype=f32) for n in fixed_names}
        self._m = {n: jnp.zeros(expected[n], f32) for n in train_names}
        self._v = {n: jnp.zeros(expected[n], f32) for n in train_names}
        b1, b2 = self.betas
        wd = {n: (self.weight_decay if n in decay else 0.0) for n in train_names}
        lr_ = self.lr
        eps_ = self.eps

        def loss_fn(train, fixed, ids, targets):
            if layer == "mamba":
                return mamba_forward_loss({**train, **fixed}, ids, targets, n_layers=n_layers,
                                          d_state=d_state, normalize_prototypes=normalize_prototypes)
            return forward_loss({**train, **fixed}, ids, targets, n_layers=n_layers,
                                d_state=d_state, normalize_prototypes=normalize_prototypes)

        def update(train, m, v, fixed, ids, targets, step_size, bc2_sqrt):
            loss, g = jax.value_and_grad(loss_fn)(train, fixed, ids, targets)
            new_p, new_m, new_v = {}, {}, {}
            for n, p in train.items():
                mn = b1 * m[n] + (1.0 - b1) * g[n]
                vn = b2 * v[n] + (1.0 - b2) * jnp.square(g[n])
                if wd[n]:
                    p = p * (1.0 - lr_ * wd[n])
                new_p[n] = p - step_size * mn / (jnp.sqrt(vn) / bc2_sqrt + eps_)
                new_m[n], new_v[n] = mn, vn
            return loss, new_p, new_m, new_v

        # donate params and moments: the update writes into their buffers
        opts = {"xla_backend_optimization_level": 0} if fast_compile else None
        self._update = jax.jit(update, donate_argnums=(0, 1, 2), compiler_options=opts)

    def step(self, ids, targets) -> float:
        ids_a = _check_ids("ids", ids, self.V)
        tg_a = _check_ids("targets", targets, self.V)
        self.t += 1
        b1, b2 = self.betas
        # bias corrections on the host in float64, as torch.optim.AdamW does
        step_size = np.float32(self.lr / (1.0 - b1 ** self.t))
        bc2_sqrt = np.float32(math.sqrt(1.0 - b2 ** self.t))
        t0 = time.perf_counter()
        loss, self._train, self._m, self._v = self._update(
            self._train, self._m, self._v, self._fixed, ids_a, tg_a, step_size, bc2_sqrt)
        loss = jax.block_until_ready(loss)
        jax.block_until_ready(self._train)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        return float(loss)

    def params(self) -> dict[str, np.ndarray]:
        out = {**self._train, **self._fixed}
        return {n: np.array(out[n]) for n in self.names}

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return ({n: np.array(a) for n, a in self._m.items()},
                {n: np.array(a) for n, a in self._v.items()})


def build_jax_train_step(params: Mapping[str, np.ndarray], *, n_layers: int, d_state: int,
                         dt_rank: int, normalize_prototypes: bool = True,
                         learnable_prototypes: bool = False, lr: float = 1e-4,
                         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                         weight_decay: float = 0.01, decay_names=None,
                         fast_compile: bool = False, layer: str = "mamba-lite") -> JaxTrainStep:
    """The benchmark's JAX training step (float32): see JaxTrainStep.

    `params` are numpy arrays under the contract names (copied to float32 device arrays).
    `decay_names` defaults to rtrainer's "matrices" set (`default_decay_names`; unlike
    parity_torch's ndim >= 2 default it excludes A_log, as rtrainer does). With
    `learnable_prototypes=False` the prototypes are a fixed input: no gradient, no moments.
    `fast_compile=True` (tests only) compiles with LLVM -O0: same numbers, slower steps.
    """
    return JaxTrainStep(params, n_layers=n_layers, d_state=d_state, dt_rank=dt_rank,
                        normalize_prototypes=normalize_prototypes,
                        learnable_prototypes=learnable_prototypes, lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, decay_names=decay_names,
                        fast_compile=fast_compile, layer=layer)


# ============================================================================ the `mamba` block
#
# The full Mamba block in jax.numpy (the same contract as rtrainer/testing/parity_torch.py's mamba_* functions):
#     xn = r / sqrt(mean(r^2) + 1e-5) * norm_w ; [xin | zg] = xn @ in_proj_w (D, 2C), C = E*D
#     u = silu(conv(xin)) ; y = scan(...) ; r = r + (y * silu(zg)) @ out_proj_w (C, D)
# selective=False: B_lti, C_lti (N,) replace x_proj_w and dt_proj_w; delta = softplus(dt_proj_b).

RMS_EPS = 1e-5


def _ssm(u, p: Mapping, prefix: str, *, d_state: int, selective: bool):
    N = d_state
    if selective:
        xdbl = u @ p[prefix + "x_proj_w"]
        Bt, Ct, draw = xdbl[..., :N], xdbl[..., N:2 * N], xdbl[..., 2 * N:]
        delta = _softplus(draw @ p[prefix + "dt_proj_w"] + p[prefix + "dt_proj_b"])
    else:
        Bt = jnp.broadcast_to(p[prefix + "B_lti"], u.shape[:2] + (N,))
        Ct = jnp.broadcast_to(p[prefix + "C_lti"], u.shape[:2] + (N,))
        delta = jnp.broadcast_to(_softplus(p[prefix + "dt_proj_b"]), u.shape)
    A = -jnp.exp(p[prefix + "A_log"])
    return selective_scan(u, delta, A, Bt, Ct, p[prefix + "D_skip"])


def mamba_layer(x, p: Mapping, prefix: str, *, d_state: int, selective: bool = True):
    """The full Mamba block for x (B,T,D): the residual branch (y * silu(zg)) @ out_proj_w."""
    C = p[prefix + "conv_w"].shape[0]
    xn = x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + RMS_EPS) * p[prefix + "norm_w"]
    xz = xn @ p[prefix + "in_proj_w"]
    xin, zg = xz[..., :C], xz[..., C:]
    u = _silu(causal_conv(xin, p[prefix + "conv_w"], p[prefix + "conv_b"]))
    y = _ssm(u, p, prefix, d_state=d_state, selective=selective)
    return (y * _silu(zg)) @ p[prefix + "out_proj_w"]


def _lite_layer(x, p, prefix, *, d_state, selective):
    u = _silu(causal_conv(x, p[prefix + "conv_w"], p[prefix + "conv_b"]))
    return _ssm(u, p, prefix, d_state=d_state, selective=selective) @ p[prefix + "out_proj_w"]


def mamba_forward_loss(p: Mapping, ids, targets, *, n_layers: int, d_state: int, layer: str = "mamba",
                       selective: bool = True, normalize_prototypes: bool = True):
    fn = mamba_layer if layer == "mamba" else _lite_layer
    r = p["embedding"][ids]
    for i in range(n_layers):
        r = r + fn(r, p, f"layers.{i}.", d_state=d_state, selective=selective)
    z = layer_norm(r)
    loss, _ = hpn_loss(z.reshape(-1, z.shape[-1]), p["head.prototypes"], targets.reshape(-1),
                       normalize_prototypes=normalize_prototypes)
    return loss


def mamba_loss_and_grads(params: Mapping[str, np.ndarray], ids, targets, *, n_layers: int, d_state: int,
                         layer: str = "mamba", selective: bool = True, normalize_prototypes: bool = True,
                         learnable_prototypes: bool = True, dtype: str = "float64",
                         fast_compile: bool = True) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and jax.value_and_grad gradients of a `mamba` (or LTI mamba-lite) stack; the tensor
    names are taken from `params` (shapes are checked by the jit trace). Same contract as
    loss_and_grads; compiled per call (tests only)."""
    jdt = _jnp_dtype(dtype)
    V = np.shape(params["embedding"])[0]
    ids_a = _check_ids("ids", ids, V)
    tg_a = _check_ids("targets", targets, V)
    train_names, fixed_names = _split(list(params), learnable_prototypes)
    opts = {"xla_backend_optimization_level": 0} if fast_compile else None

    def loss_fn(tr, fx, i, t):
        return mamba_forward_loss({**tr, **fx}, i, t, n_layers=n_layers, d_state=d_state, layer=layer,
                                  selective=selective, normalize_prototypes=normalize_prototypes)
    np_dtype = np.dtype(dtype)
    with float64(np_dtype == np.float64):
        train = {n: jnp.asarray(np.asarray(params[n]), dtype=jdt) for n in train_names}
        fixed = {n: jnp.asarray(np.asarray(params[n]), dtype=jdt) for n in fixed_names}
        loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=opts)(
            train, fixed, jnp.asarray(ids_a), jnp.asarray(tg_a))
        return float(loss), {n: np.array(grads[n], dtype=np_dtype) for n in train_names}
