#!/usr/bin/env python
"""Side-by-side training-step benchmark: rtrainer vs PyTorch (eager / torch.compile) vs JAX.

    .venv/bin/python bench/compare.py                       # baseline shape, 1 and 2 threads,
                                                            # rtrainer, torch eager, torch.compile, jax
    .venv/bin/python bench/compare.py --shapes all --frameworks rtrainer,torch,torch-compile,jax \
        --threads 1,2 --steps 10 --json runs/compare.json
    .venv/bin/python bench/compare.py --shapes tiny --threads 1 --steps 3    # smoke test, seconds

Options: --layer mamba-lite | mamba (the full block: E 2, R = ceil(D/16)); --shapes baseline | all | tiny |
"B,T,D,N,L,V;B,T,D,N,L,V" (K 4, R 1 always for mamba-lite);
--threads 1,2; --frameworks rtrainer,torch,torch-compile,jax (default: all four, torch-compile only
at the baseline and tiny shapes: it compiles for minutes per shape; its compiled graphs are cached
under --cache-dir, default build/compare-cache, so later runs load them); --steps N timed steps (median; a measurement stops early after --max-seconds once
3 steps are timed); --warmup N untimed steps after the two parity steps; --timeout S per
subprocess (torch-compile gets 3x); --no-breakdown; --no-pin; --json PATH.

Method:
* Every (framework, shape, threads) runs in its OWN subprocess: peak RSS (ru_maxrss) is that
  framework's at that shape, and thread settings are clean. Each child is pinned to its first
  `threads` CPUs (sched_setaffinity; --no-pin disables) and gets OMP_NUM_THREADS = MKL_NUM_THREADS
  = OPENBLAS_NUM_THREADS = threads; rtrainer gets n_threads and threadpoolctl's BLAS cap (rtrainer
  is imported before numpy), torch gets torch.set_num_threads(threads) and one inter-op thread,
  JAX gets the CPU affinity (always pinned: XLA sizes its pool from it, see the "Threads" note of
  rtrainer/testing/parity_jax.py) plus XLA_FLAGS --xla_cpu_multi_thread_eigen=false when threads = 1,
  appended to the caller's XLA_FLAGS.
* Same initial weights everywhere: rtrainer's own initialisation (model.init_params(0, "mamba"),
  head.init_params(0, "mamba") as in bench/bench_step.make_step; the peers get the named tensors),
  the same batch (ids, targets from default_rng(0), as make_step), AdamW lr 1e-4, betas
  (0.9, 0.999), eps 1e-8, weight decay 0.01 on the tensors rtrainer decays, fixed unit-norm
  prototypes (normalize_prototypes, not learnable), no clipping.
* Parity first: the losses of the first two steps (step 1 = forward, step 2 = after one AdamW
  update, so it also checks the gradients and the optimizer) are compared with rtrainer's at the
  same shape; tolerance |d| <= 1e-5 + 2e-4*|loss| (float32 over a 2-layer stack). A mismatch is
  printed as "MISMATCH" in the table and in a banner below it, never hidden.
* Then --warmup more untimed steps, then the timed steps: median step time -> tokens/s = B*T /
  median; compile time (torch.compile, JAX jit) = first-call time minus the median step.
* Machine reference: numpy float32 GEMM 1024x1024x1024 in its own subprocess per thread count
  (median of 15 after 3 warm-up calls): GFLOP/s. Achieved GFLOP/s = bench/flops.py model FLOPs
  of the step / median step time, and its fraction of the GEMM rate.
* Breakdown of one rtrainer step (in the rtrainer child, after the clean timing): every kernel
  entry point and numpy.matmul are timed through rtrainer._kernels.timed, the package's public
  timing hook (restored after);
  data = TokenStream.next_batch over a random in-memory token array; the in-place numpy element-wise ops
  of model.py (residual adds, fills, gradient accumulation) cannot be wrapped, so they are replayed
  on arrays of the same shapes and reported as "numpy elementwise (replayed)"; Python overhead =
  instrumented step wall time minus everything above. Means over the instrumented steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

K_CONV, DT_RANK = 4, 1
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
SHAPE_KEYS = ("B", "T", "D", "N", "L", "V")
BASELINE = (8, 64, 512, 16, 2, 8192)
ALL_SHAPES = [
    BASELINE,
    (16, 64, 512, 16, 2, 8192),
    (8, 128, 512, 16, 2, 8192),
    (8, 64, 256, 16, 2, 8192),
    (8, 64, 768, 16, 2, 8192),
    (8, 64, 512, 16, 4, 8192),
    (8, 1024, 512, 16, 2, 8192),
    (4, 4096, 256, 16, 2, 8192),
]
TINY = (2, 16, 32, 16, 2, 256)
FRAMEWORKS = ("rtrainer", "torch", "torch-compile", "jax")
PEERS = ("torch", "torch-compile", "jax")
RESULT_TAG = "@@RESULT@@ "
LOSS_ATOL, LOSS_RTOL = 1e-5, 2e-4


def shape_str(s) -> str:
    return "x".join(str(v) for v in s)


# ============================================================================ child side

def _pin(threads: int) -> list[int]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > threads:
            cpus = cpus[:threads]
            os.sched_setaffinity(0, cpus)
        return cpus
    except (AttributeError, OSError):
        return []


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def rtrainer_init(shape, flat_params: bool, layer: str = "mamba-lite"):
    """rtrainer's initial weights at `shape`: (model, head, flat, params, decay, net).
    flat_params=True: model and head in a rtrainer.net.Net exactly as bench_step.make_step; False: a
    plain name -> array dict with the same values (peers: no gradient/moment buffers in their RSS),
    flat and net None."""
    import numpy as np
    from rtrainer.heads import HPNHead
    from rtrainer.model import MambaLiteStack
    from rtrainer.params import FlatParams

    B, T, D, N, L, V = shape
    return _build(np, MambaLiteStack, HPNHead, FlatParams, shape, flat_params, layer=layer)


def mamba_dt_rank(D: int) -> int:
    return -(-D // 16)


E_MAMBA = 2


def _build(np, MambaLiteStack, HPNHead, FlatParams, shape, flat_params, n_threads=1, layer="mamba-lite"):
    B, T, D, N, L, V = shape
    if layer == "mamba":
        from rtrainer.model import MambaStack

        model = MambaStack(V, D, N, K_CONV, mamba_dt_rank(D), L, expand=E_MAMBA, scan_chunk=64,
                           n_threads=n_threads)
    else:
        model = MambaLiteStack(V, D, N, K_CONV, DT_RANK, L, scan_chunk=64, n_threads=n_threads)
    head = HPNHead(V, D, normalize=True, learnable=False, n_threads=n_threads)
    specs = model.param_specs() + head.param_specs()
    if flat_params:
        from rtrainer.net import Net

        net = Net(model, head)
        net.init(0, "mamba")
        flat, params = net.flat, net.params
    else:
        flat = net = None
        params = {s.name: np.empty(s.shape, np.float32) for s in specs}
        model.bind(params, None)
        head.bind(params, None)
        model.init_params(0, "mamba")
        head.init_params(0, "mamba")
    decay = [s.name for s in specs if s.decay and s.trainable]
    return model, head, flat, params, decay, net


def _batch(np, shape):
    B, T, D, N, L, V = shape
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)
    return ids, targets


def _time_loop(step, warmup: int, steps: int, max_seconds: float) -> dict:
    """Two parity steps (first is also the compile call), `warmup` more, then timed steps."""
    t0 = time.perf_counter()
    l1 = float(step())
    first = time.perf_counter() - t0
    l2 = float(step())
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < steps:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    med = statistics.median(times)
    return dict(losses=[l1, l2], first_call_s=first, median_s=med, times_s=times,
                steps_timed=len(times))


def _rtrainer_step_fn(net, opt, ids, targets):
    from rtrainer.step import train_step

    def step():
        return train_step(net, opt, ids, targets, LR).loss
    return step


class _Acc:
    def __init__(self):
        self.t: dict[str, float] = {}
        self.shapes: list = []
        self.record_shapes = False

    def wrap(self, cat, fn):
        perf = time.perf_counter
        t = self.t

        def w(*a, **k):
            t0 = perf()
            try:
                return fn(*a, **k)
            finally:
                t[cat] = t.get(cat, 0.0) + (perf() - t0)
        return w


_CATEGORY = {"scan.scan_forward": "scan_fwd", "scan.scan_backward": "scan_bwd", "conv": "conv",
             "embed": "embed", "norm": "layernorm", "rmsnorm": "rmsnorm", "gate": "gate",
             "hpn": "hpn", "xent": "xent", "optim": "optimizer", "numpy.matmul": "matmul"}


def instrument_rtrainer(acc: _Acc):
    """Time every kernel call and numpy.matmul of rtrainer's step through the package's public
    hook rtrainer._kernels.timed (nothing private of the model, head or optimizer is touched).
    Returns a restore() callable."""
    from rtrainer._kernels import timed

    t = acc.t

    def on_call(name, seconds, args):
        cat = _CATEGORY.get(name) or _CATEGORY.get(name.split(".")[0], name.split(".")[0])
        t[cat] = t.get(cat, 0.0) + seconds
        if cat == "matmul" and acc.record_shapes:
            acc.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))

    cm = timed(on_call)
    cm.__enter__()
    return lambda: cm.__exit__(None, None, None)


def _replay_elementwise(np, shape, reps: int = 5, layer: str = "mamba-lite") -> float:
    """Seconds per step of the in-place numpy element-wise ops rtrainer/model.py runs outside any
    kernel or matmul (replayed on arrays of the same shapes; median of `reps`)."""
    B, T, D, N, L, V = shape
    if layer == "mamba":
        return _replay_elementwise_mamba(np, shape, reps)
    BT, W = B * T, 2 * N + DT_RANK
    f = np.float32
    r = np.ones((BT, D), f); x = np.ones((BT, D), f)
    dr = np.empty((B, T, D), f); du = np.empty((B, T, D), f); ddt = np.empty((B, T, D), f)
    tmp = np.ones((B, T, D), f); dxdbl = np.empty((B, T, W), f); dz = np.empty((BT, D), f)
    g1 = np.zeros((D, D), f); w1 = np.ones((D, D), f)
    g2 = np.zeros((DT_RANK, D), f); w2 = np.ones((DT_RANK, D), f)
    g3 = np.zeros((D, W), f); w3 = np.ones((D, W), f)
    out = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dz.fill(0.0)                       # the step's dz.fill (bench_step.make_step)
        for _ in range(L):
            r += x                         # forward residual
        dr.fill(0.0)
        for _ in range(L):
            g1 += w1; du.fill(0.0); ddt.fill(0.0); dxdbl.fill(0.0)
            g2 += w2; g3 += w3; du += tmp
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def _replay_elementwise_mamba(np, shape, reps: int = 5) -> float:
    """As _replay_elementwise, for MambaStack's forward/backward (C = E*D inner channels)."""
    B, T, D, N, L, V = shape
    BT, C, R = B * T, E_MAMBA * D, mamba_dt_rank(D)
    W = 2 * N + R
    f = np.float32
    r, x, dz, dr, dxn, tmpD = (np.ones((BT, D), f) for _ in range(6))
    sA, sC, dzg, du, sB = (np.ones((BT, C), f) for _ in range(5))
    dxdbl = np.empty((BT, W), f)
    gw = [(np.zeros(s, f), np.ones(s, f)) for s in ((C, D), (R, C), (C, W), (D, C), (D, C))]
    out = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dz.fill(0.0)
        for _ in range(L):
            r += x
        dr.fill(0.0)
        for _ in range(L):
            sC.fill(0.0); dzg.fill(0.0); du.fill(0.0); sA.fill(0.0); dxdbl.fill(0.0); sC.fill(0.0)
            for g, w in gw:
                g += w
            du += sB
            dxn += tmpD
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def _breakdown(np, shape, n_threads, model, head, flat, opt, steps: int, layer: str = "mamba-lite") -> dict:
    from rtrainer.shards import Shard
    from rtrainer.stream import TokenStream

    B, T, D, N, L, V = shape
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=B * T * 8 + 1).astype(np.uint16 if V <= 65536 else np.uint32)
    stream = TokenStream([Shard.from_array(tokens)], B, T)
    dz = np.empty((B * T, D), np.float32)
    acc = _Acc()
    perf = time.perf_counter
    walls = []
    restore = instrument_rtrainer(acc)
    try:
        for i in range(steps + 1):
            if i == 1:
                acc.t.clear()          # first instrumented step is a warm-up
                walls.clear()
            w0 = perf()
            t0 = perf()
            ids, targets = stream.next_batch()
            acc.t["data"] = acc.t.get("data", 0.0) + perf() - t0
            t0 = perf()
            flat.zero_grad()
            acc.t["optimizer"] = acc.t.get("optimizer", 0.0) + perf() - t0
            z = model.forward(ids)
            head.forward(z, targets)
            dz.fill(0.0)
            head.backward(dz)
            model.backward(dz)
            opt.step(LR, opt.clip_scale(opt.grad_norm()))
            walls.append(perf() - w0)
    finally:
        restore()
    n = len(walls)
    wall = sum(walls) / n
    per = {k: v / n for k, v in acc.t.items()}
    ew = _replay_elementwise(np, shape, layer=layer)
    other = sum(per.get(k, 0.0) for k in ("conv", "embed", "layernorm", "hpn", "rmsnorm", "gate"))
    rows = {
        "matmul": per.get("matmul", 0.0),
        "scan_fwd": per.get("scan_fwd", 0.0),
        "scan_bwd": per.get("scan_bwd", 0.0),
        "other_kernels": other,
        "optimizer": per.get("optimizer", 0.0),
        "data": per.get("data", 0.0),
        "numpy_elementwise": ew,
    }
    rows["python_overhead"] = wall - sum(rows.values())
    return dict(wall_s=wall, steps=n, parts_s=rows,
                other_kernels_s={k: per.get(k, 0.0) for k in ("conv", "embed", "layernorm", "hpn", "rmsnorm",
                                                              "gate")})


def _child_gemm(spec) -> dict:
    import rtrainer  # noqa: F401  (before numpy)
    import numpy as np
    from threadpoolctl import threadpool_limits

    n = 1024
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), np.float32)
    with threadpool_limits(limits=spec["threads"], user_api="blas"):
        for _ in range(3):
            np.matmul(a, b, out=c)
        ts = []
        for _ in range(spec.get("reps", 15)):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')}/{i.get('architecture')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return dict(status="ok", gflops=2 * n ** 3 / med / 1e9, median_ms=med * 1e3,
                peak_rss_mb=_peak_rss_mb(), blas=", ".join(blas) or "none",
                openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", "(unset)"))


def _child_rtrainer(spec) -> dict:
    import rtrainer  # noqa: F401  (before numpy: OPENBLAS_THREAD_TIMEOUT)
    import numpy as np
    from threadpoolctl import threadpool_limits
    from rtrainer.heads import HPNHead
    from rtrainer.model import MambaLiteStack
    from rtrainer.optim import AdamW
    from rtrainer.params import FlatParams

    shape, nt = tuple(spec["shape"]), spec["threads"]
    B, T, D, N, L, V = shape
    with threadpool_limits(limits=nt, user_api="blas"):
        layer = spec.get("layer", "mamba-lite")
        model, head, flat, _, _, net = _build(np, MambaLiteStack, HPNHead, FlatParams, shape, True, nt, layer=layer)
        opt = AdamW(flat, betas=BETAS, eps=EPS, weight_decay=WD, n_threads=nt)
        ids, targets = _batch(np, shape)
        step = _rtrainer_step_fn(net, opt, ids, targets)
        res = _time_loop(step, spec["warmup"], spec["steps"], spec["max_seconds"])
        res.update(status="ok", peak_rss_mb=_peak_rss_mb(),
                   activation_mb=model.activation_bytes() / 2 ** 20)
        if spec.get("breakdown"):
            res["breakdown"] = _breakdown(np, shape, nt, model, head, flat, opt, spec.get("bd_steps", 5),
                                          layer=layer)
    return res


def _child_torch(spec, compile_: bool) -> dict:
    import rtrainer  # noqa: F401
    import numpy as np

    try:
        import torch
    except ImportError:
        return dict(status="not installed")
    nt = spec["threads"]
    torch.set_num_threads(nt)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from rtrainer.testing.parity_torch import build_torch_mamba_model, build_torch_model

    shape = tuple(spec["shape"])
    B, T, D, N, L, V = shape
    layer = spec.get("layer", "mamba-lite")
    _, _, _, params, decay, _ = rtrainer_init(shape, flat_params=False, layer=layer)
    if layer == "mamba":
        model = build_torch_mamba_model(params, n_layers=L, d_state=N, normalize_prototypes=True,
                                        learnable_prototypes=False, lr=LR, betas=BETAS, eps=EPS,
                                        weight_decay=WD, decay_names=decay, scan="vectorised",
                                        compile=compile_)
    else:
        model = build_torch_model(vocab_size=V, d_model=D, n_layers=L, d_state=N, d_conv=K_CONV,
                              dt_rank=DT_RANK, params=params, normalize_prototypes=True,
                              learnable_prototypes=False, lr=LR, betas=BETAS, eps=EPS,
                              weight_decay=WD, decay_names=decay, scan="vectorised",
                              compile=compile_)
    del params
    ids, targets = _batch(np, shape)
    res = _time_loop(lambda: model.train_step(ids, targets), spec["warmup"], spec["steps"],
                     spec["max_seconds"])
    res.update(status="ok", peak_rss_mb=_peak_rss_mb(), version=torch.__version__)
    if compile_:
        res["compile_s"] = max(res["first_call_s"] - res["median_s"], 0.0)
    return res


def _child_jax(spec) -> dict:
    import importlib

    import rtrainer  # noqa: F401
    import numpy as np

    try:
        mod = importlib.import_module("rtrainer.testing.parity_jax")
        import jax  # noqa: F401
    except ImportError as e:
        return dict(status="not installed", detail=str(e))
    shape = tuple(spec["shape"])
    B, T, D, N, L, V = shape
    layer = spec.get("layer", "mamba-lite")
    _, _, _, params, decay, _ = rtrainer_init(shape, flat_params=False, layer=layer)
    obj = mod.build_jax_train_step(params, n_layers=L, d_state=N,
                                   dt_rank=mamba_dt_rank(D) if layer == "mamba" else DT_RANK,
                                   normalize_prototypes=True, learnable_prototypes=False, lr=LR,
                                   betas=BETAS, eps=EPS, weight_decay=WD, decay_names=decay,
                                   layer=layer)
    del params
    ids, targets = _batch(np, shape)
    res = _time_loop(lambda: obj.step(ids, targets), spec["warmup"], spec["steps"],
                     spec["max_seconds"])
    res.update(status="ok", peak_rss_mb=_peak_rss_mb(), version=jax.__version__,
               compile_s=max(res["first_call_s"] - res["median_s"], 0.0))
    return res


def child_main(spec: dict) -> None:
    if spec.get("pin", True) or spec["kind"] == "jax":   # jax: affinity is its only thread knob
        spec["cpus"] = _pin(spec["threads"])
    kind = spec["kind"]
    if kind == "gemm":
        res = _child_gemm(spec)
    elif kind in ("rtrainer", "ref"):
        res = _child_rtrainer(spec)
    elif kind == "torch":
        res = _child_torch(spec, False)
    elif kind == "torch-compile":
        res = _child_torch(spec, True)
    elif kind == "jax":
        res = _child_jax(spec)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    res["cpus"] = spec.get("cpus", [])
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


# ============================================================================ parent side

CACHE_DIR = ""      # set by main (--cache-dir)


def child_env(kind: str, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # what `import rtrainer` sets anyway
    if kind == "jax":
        flags = [env.get("XLA_FLAGS", "").strip()]
        # rtrainer/testing/parity_jax.py ("Threads"): XLA has no thread-count flag in this version; its
        # pool is sized from the CPU affinity (the child pins itself, always for jax), plus
        # single-threaded Eigen for n = 1
        if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags[0]:
            flags.append("--xla_cpu_multi_thread_eigen=false")
        env["XLA_FLAGS"] = " ".join(f for f in flags if f)
        env.setdefault("JAX_PLATFORMS", "cpu")
    if kind == "torch-compile" and CACHE_DIR:
        # Inductor's FX-graph and AOT-autograd caches on disk: a second run at the same shape loads
        # the compiled graph instead of compiling it again (the first call is then seconds)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(CACHE_DIR) / "inductor"))
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    return env


def run_child(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; never raises (errors become a status)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(spec["kind"], spec["threads"]), cwd=str(REPO),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)    # the child and its compile workers, by id
        except OSError:
            pass
        proc.communicate()
        return dict(status=f"timeout after {timeout:.0f} s", wall_s=time.perf_counter() - t0,
                    loadavg_before=load)
    res = None
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
    if res is None:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()]
        msg = tail[-1] if tail else f"exit code {proc.returncode}"
        res = dict(status=f"error: {msg[:160]}", stderr_tail=tail[-15:])
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_before"] = load      # 1-min load average: other processes compete for the cores
    return res


def loss_parity(got: list, ref: list) -> dict:
    if not got or not ref:
        return dict(ok=None, text="no reference")
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    ok = all(math.isfinite(a) and d <= LOSS_ATOL + LOSS_RTOL * abs(b)
             for a, b, d in zip(got, ref, diffs))
    dmax = max(diffs)
    return dict(ok=ok, max_abs_diff=dmax,
                text=(f"ok {dmax:.1e}" if ok else f"MISMATCH {dmax:.2e}"))


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return dict(cpu=cpu, cores=cores, python=platform.python_version(), platform=platform.platform())


def evaluate(results: list, gemm: dict, baseline=BASELINE) -> list:
    """Fill derived columns in place (GFLOP/s, % GEMM, speed-up, target) and return the
    performance-target checks (docs/performance.md) as rows {target, value, pass}."""
    sys.path.insert(0, str(HERE))
    from flops import mamba_step_flops, step_flops

    for r in results:
        B, T, D, N, L, V = r["shape"]
        r["tokens"] = B * T
        if r.get("layer", "mamba-lite") == "mamba":
            r["model_gflop"] = mamba_step_flops(B, T, D, N, K_CONV, mamba_dt_rank(D), L, V, E_MAMBA)["total"] / 1e9
        else:
            r["model_gflop"] = step_flops(B, T, D, N, K_CONV, DT_RANK, L, V)["total"] / 1e9
        if r.get("status") == "ok":
            r["tokens_per_s"] = B * T / r["median_s"]
            r["ms_per_step"] = r["median_s"] * 1e3
            r["gflops"] = r["model_gflop"] / r["median_s"]
            g = gemm.get(str(r["threads"]), {}).get("gflops")
            r["frac_gemm"] = r["gflops"] / g if g else None
    key = lambda r: (tuple(r["shape"]), r["threads"])  # noqa: E731
    by = {}
    for r in results:
        by.setdefault(key(r), {})[r["framework"]] = r
    for k, group in by.items():
        rt = group.get("rtrainer")
        peers = [p for f, p in group.items() if f in PEERS and p.get("status") == "ok"]
        if rt is None or rt.get("status") != "ok" or not peers:
            continue
        best = max(peers, key=lambda p: p["tokens_per_s"])
        rt["fastest_peer"] = best["framework"]
        rt["speedup"] = rt["tokens_per_s"] / best["tokens_per_s"]
        need = 4.0 if tuple(k[0]) == tuple(baseline) else 3.0
        rt["target"] = f">={need:g}x " + ("PASS" if rt["speedup"] >= need else "MISS")

    checks = []

    def rt_at(shape, thr):
        r = by.get((tuple(shape), thr), {}).get("rtrainer")
        return r if r and r.get("status") == "ok" else None

    for (shape, thr), group in sorted(by.items()):
        rt = group.get("rtrainer")
        if thr == 2 and rt is not None and "speedup" in rt:
            need = 4.0 if tuple(shape) == tuple(baseline) else 3.0
            checks.append(dict(target=f"{shape_str(shape)} 2 thr: >= {need:g}x fastest peer "
                                      f"({rt['fastest_peer']})",
                               value=f"{rt['speedup']:.2f}x", ok=rt["speedup"] >= need))
    b2, b1 = rt_at(baseline, 2), rt_at(baseline, 1)
    if b2 and b2.get("frac_gemm") is not None:
        checks.append(dict(target=f"{shape_str(baseline)} 2 thr: model FLOP/s >= 45% of GEMM",
                           value=f"{b2['frac_gemm']:.1%}", ok=b2["frac_gemm"] >= 0.45))
    if b2 and b1:
        sc = b2["tokens_per_s"] / b1["tokens_per_s"]
        checks.append(dict(target=f"{shape_str(baseline)}: 2 thr >= 1.7x 1 thr", value=f"{sc:.2f}x",
                           ok=sc >= 1.7))
    if b2 and "breakdown" in b2:
        bd = b2["breakdown"]
        frac = bd["parts_s"]["python_overhead"] / bd["wall_s"]
        checks.append(dict(target=f"{shape_str(baseline)} 2 thr: Python overhead < 5% of step",
                           value=f"{frac:.1%}", ok=frac < 0.05))
    # per-token time flat (within 20%) from T=64 to long T, at equal D (and N, L, V)
    thr_set = sorted({r["threads"] for r in results})
    for thr in thr_set:
        for short, longs in (((8, 64, 512, 16, 2, 8192), [(8, 128, 512, 16, 2, 8192),
                                                          (8, 1024, 512, 16, 2, 8192)]),
                             ((8, 64, 256, 16, 2, 8192), [(4, 4096, 256, 16, 2, 8192)])):
            s = rt_at(short, thr)
            for lg in longs:
                r = rt_at(lg, thr)
                if s and r:
                    ratio = (r["median_s"] / r["tokens"]) / (s["median_s"] / s["tokens"])
                    checks.append(dict(target=f"{thr} thr: per-token time {shape_str(lg)} within "
                                              f"20% of {shape_str(short)}",
                                       value=f"{ratio:.2f}x", ok=abs(ratio - 1.0) <= 0.2))
    long_shape = (4, 4096, 256, 16, 2, 8192)
    for thr in thr_set:
        group = by.get((long_shape, thr), {})
        rt = group.get("rtrainer")
        peers = [p for f, p in group.items() if f in PEERS and p.get("status") == "ok"]
        if rt and rt.get("status") == "ok" and peers:
            best = max(peers, key=lambda p: p["tokens_per_s"])
            checks.append(dict(target=f"{shape_str(long_shape)} {thr} thr: peak RSS below fastest "
                                      f"peer ({best['framework']} {best['peak_rss_mb']:.0f} MB)",
                               value=f"{rt['peak_rss_mb']:.0f} MB",
                               ok=rt["peak_rss_mb"] < best["peak_rss_mb"]))
    return checks


def _fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def format_table(results: list, gemm: dict) -> str:
    hdr = (f"{'framework':<14} {'shape B,T,D,N,L,V':<22} {'thr':>3} {'tokens/s':>10} {'ms/step':>9} "
           f"{'GFLOP/s':>8} {'%GEMM':>6} {'peakMB':>7} {'speedup':>8} {'target':<11} "
           f"{'parity (loss)':<16} note")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        s = ",".join(str(v) for v in r["shape"])
        if r.get("status") != "ok":
            lines.append(f"{r['framework']:<14} {s:<22} {r['threads']:>3} {r['status']}")
            continue
        note = []
        if r.get("compile_s") is not None:
            note.append(f"compile {r['compile_s']:.1f}s")
        if r.get("steps_timed") is not None:
            note.append(f"{r['steps_timed']} steps")
        if r.get("times_s"):
            note.append(f"min {1e3 * min(r['times_s']):.1f}ms")
        if r.get("loadavg_before") is not None:
            note.append(f"load {r['loadavg_before']:.1f}")
        if r.get("activation_mb") is not None:
            note.append(f"act {r['activation_mb']:.0f}MB")
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        par = r.get("parity", {}).get("text", "-")
        fg = f"{100 * r['frac_gemm']:.1f}" if r.get("frac_gemm") is not None else "-"
        lines.append(f"{r['framework']:<14} {s:<22} {r['threads']:>3} {r['tokens_per_s']:>10.0f} "
                     f"{r['ms_per_step']:>9.2f} {r['gflops']:>8.2f} {fg:>6} "
                     f"{r['peak_rss_mb']:>7.0f} {sp:>8} {r.get('target', '-'):<11} {par:<16} "
                     f"{', '.join(note)}")
    g = ", ".join(f"{t} thr {v['gflops']:.1f} GFLOP/s" for t, v in sorted(gemm.items())
                  if v.get("status") == "ok")
    blas = sorted({f"{v.get('blas')} (OPENBLAS_CORETYPE={v.get('openblas_coretype')})"
                   for v in gemm.values() if v.get("blas")})
    if blas:
        g += f" [BLAS kernel: {'; '.join(blas)}]"
    lines.append(f"numpy float32 GEMM 1024^3: {g or 'not measured'}; GFLOP/s = bench/flops.py model "
                 "FLOPs / median step; speedup = rtrainer tokens/s / fastest peer's")
    loads = [r["loadavg_before"] for r in list(results) + list(gemm.values())
             if r.get("loadavg_before") is not None]
    if loads:
        lines.append(f"1-min load average before each run: {min(loads):.1f}-{max(loads):.1f} on "
                     f"{machine_info()['cores']} cores (above ~0.5 other processes competed for the "
                     "cores: treat the numbers, 2-thread ones most, as noisy)")
    return "\n".join(lines)


BD_COLS = ("matmul", "scan_fwd", "scan_bwd", "other_kernels", "optimizer", "data",
           "numpy_elementwise", "python_overhead")


def format_breakdown(results: list) -> str:
    hdr = (f"{'shape B,T,D,N,L,V':<22} {'thr':>3} {'step ms':>8} " +
           " ".join(f"{c[:11]:>11}" for c in BD_COLS))
    lines = ["rtrainer step breakdown: ms (% of the instrumented step)", hdr, "-" * len(hdr)]
    for r in results:
        bd = r.get("breakdown")
        if r["framework"] != "rtrainer" or not bd:
            continue
        w = bd["wall_s"]
        cells = " ".join(f"{1e3 * bd['parts_s'][c]:>5.2f}({100 * bd['parts_s'][c] / w:>3.0f}%)"
                         for c in BD_COLS)
        lines.append(f"{','.join(map(str, r['shape'])):<22} {r['threads']:>3} {1e3 * w:>8.2f} {cells}")
    lines.append("other_kernels = conv + embed + layernorm + hpn (+ rmsnorm + gate for mamba); optimizer = zero_grad + grad norm + "
                 "AdamW; numpy_elementwise = model.py's in-place adds/fills (replayed); "
                 "python_overhead = step wall - all of the above")
    return "\n".join(lines)


def format_checks(checks: list) -> str:
    if not checks:
        return "targets: (not enough measurements for any performance target)"
    lines = ["performance targets (docs/performance.md):"]
    for c in checks:
        lines.append(f"  [{'PASS' if c['ok'] else 'MISS'}] {c['target']}: {c['value']}")
    return "\n".join(lines)


def parse_shapes(raw: str) -> list:
    if raw == "baseline":
        return [BASELINE]
    if raw == "all":
        return list(ALL_SHAPES)
    if raw == "tiny":
        return [TINY]
    out = []
    for item in filter(None, (s.strip() for s in raw.split(";"))):
        vals = [int(v) for v in item.split(",")]
        if len(vals) != 6 or min(vals) < 1:
            raise SystemExit(f"--shapes: {item!r} is not B,T,D,N,L,V (six positive integers)")
        out.append(tuple(vals))
    if not out:
        raise SystemExit("--shapes: no shape given")
    return out


def framework_available(fw: str) -> str | None:
    """None if it can run, else the reason (checked without importing the framework)."""
    import importlib.util

    if fw in ("torch", "torch-compile"):
        return None if importlib.util.find_spec("torch") else "not installed"
    if fw == "jax":
        if importlib.util.find_spec("jax") is None:
            return "not installed (jax)"
        try:
            if importlib.util.find_spec("rtrainer.testing.parity_jax") is None:
                return "not installed (rtrainer.testing.parity_jax)"
        except ImportError:
            return "not installed (rtrainer.testing.parity_jax)"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="baseline")
    ap.add_argument("--layer", default="mamba-lite", choices=("mamba-lite", "mamba"),
                    help="layer kind of every framework's model (mamba: E 2, dt_rank ceil(D/16))")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--frameworks", default="",
                    help="comma-separated (default: rtrainer,torch,jax everywhere plus torch-compile "
                         "at the baseline and tiny shapes)")
    ap.add_argument("--cache-dir", default=str(REPO / "build" / "compare-cache"),
                    help="torch.compile's graph caches (TORCHINDUCTOR_CACHE_DIR), kept between runs")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop timing a measurement after this long once 3 steps are timed")
    ap.add_argument("--timeout", type=float, default=900.0, help="per subprocess (torch-compile: 3x)")
    ap.add_argument("--bd-steps", type=int, default=5, help="instrumented steps of the breakdown")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--gemm-reps", type=int, default=15)
    ap.add_argument("--json", default="")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--report", default="", help="re-print the tables of a saved --json file")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        child_main(json.loads(a._worker))
        return 0
    if a.report:
        d = json.loads(Path(a.report).read_text())
        res, gemm = d["results"], d["gemm"]
        checks = evaluate(res, gemm)
        print(f"machine: {d.get('machine')}")
        print(format_table(res, gemm))
        print()
        print(format_breakdown(res))
        print()
        print(format_checks(checks))
        return 0

    shapes = parse_shapes(a.shapes)
    try:
        threads = [int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated integers, got {a.threads!r}")
    if not threads or min(threads) < 1:
        raise SystemExit("--threads needs integers >= 1")
    global CACHE_DIR
    CACHE_DIR = a.cache_dir
    auto_fws = not a.frameworks.strip()
    fws = ([f.strip() for f in a.frameworks.split(",") if f.strip()] if not auto_fws
           else ["rtrainer", "torch", "torch-compile", "jax"])
    bad = [f for f in fws if f not in FRAMEWORKS]
    if bad:
        raise SystemExit(f"--frameworks: unknown {bad}; choose from {', '.join(FRAMEWORKS)}")
    if a.steps < 1:
        raise SystemExit("--steps must be >= 1")

    def log(msg):
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    base = dict(steps=a.steps, warmup=a.warmup, max_seconds=a.max_seconds, pin=not a.no_pin, layer=a.layer)
    gemm = {}
    for t in threads:
        log(f"[compare] numpy GEMM, {t} thread(s)")
        gemm[str(t)] = run_child(dict(base, kind="gemm", threads=t, reps=a.gemm_reps), a.timeout)

    results = []
    for shape in shapes:
        ref = None
        if "rtrainer" not in fws and any(f in PEERS for f in fws):
            log(f"[compare] {shape_str(shape)}: rtrainer reference losses")
            r = run_child(dict(base, kind="ref", shape=shape, threads=threads[0], steps=1,
                               warmup=0), a.timeout)
            ref = r.get("losses")
        for t in threads:
            for fw in fws:
                if auto_fws and fw == "torch-compile" and tuple(shape) not in (BASELINE, TINY):
                    continue   # compiles for minutes per shape: by default only at the baseline
                why = framework_available(fw)
                if why:
                    results.append(dict(framework=fw, shape=list(shape), threads=t, status=why, layer=a.layer))
                    continue
                log(f"[compare] {fw} {shape_str(shape)} {t} thread(s)")
                spec = dict(base, kind=fw, shape=list(shape), threads=t,
                            breakdown=(fw == "rtrainer" and not a.no_breakdown), bd_steps=a.bd_steps)
                r = run_child(spec, a.timeout * (3 if fw == "torch-compile" else 1))
                r.update(framework=fw, shape=list(shape), threads=t, layer=a.layer)
                if fw == "rtrainer" and r.get("status") == "ok" and ref is None:
                    ref = r["losses"]
                    r["parity"] = dict(ok=True, text="reference")
                elif fw == "rtrainer" and r.get("status") == "ok":
                    r["parity"] = loss_parity(r["losses"], ref)
                elif r.get("status") == "ok":
                    r["parity"] = loss_parity(r["losses"], ref)
                results.append(r)
                if r.get("status") == "ok":
                    log(f"          {B_T(shape) / r['median_s']:.0f} tokens/s, "
                        f"{r['median_s'] * 1e3:.2f} ms/step, loss {r['losses'][0]:.6f}")
                else:
                    log(f"          {r.get('status')}")

    checks = evaluate(results, gemm)
    print(f"layer: {a.layer}")
    print(format_table(results, gemm))
    mism = [r for r in results if r.get("parity", {}).get("ok") is False]
    if mism:
        print("!" * 78)
        for r in mism:
            print(f"!!! LOSS MISMATCH: {r['framework']} {shape_str(r['shape'])} {r['threads']} thr: "
                  f"losses {r['losses']} vs rtrainer {ref_of(results, r)}")
        print("!" * 78)
    print()
    print(format_breakdown(results))
    print()
    print(format_checks(checks))
    if a.json:
        out = dict(machine=machine_info(), args=vars(a), gemm=gemm, results=results,
                   checks=checks, loss_tolerance=dict(atol=LOSS_ATOL, rtol=LOSS_RTOL))
        out["args"].pop("_worker", None)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
        log(f"[compare] wrote {a.json}")
    return 1 if mism else 0


def B_T(shape) -> int:
    return shape[0] * shape[1]


def ref_of(results, r):
    for q in results:
        if (q["framework"] == "rtrainer" and q["shape"] == r["shape"] and q.get("parity", {}).get("text")
                == "reference"):
            return q["losses"]
    return "(reference run)"


if __name__ == "__main__":
    sys.exit(main())
