"""pytest-benchmark fixtures for the rtrainer kernels (speed is measured here, never asserted in tests).

Run:  .venv/bin/python -m pytest bench/ -p no:cacheprovider --benchmark-only [--threads 1,2]
      [--rounds 30] [--shape B=8,T=64] [--torch-compile]
bench/pytest.ini makes pytest collect bench_*.py. At the end of the session a compact table is
printed: name, threads, median ms, tokens/s (= B*T / median: the throughput if the op runs once per
training step), peak RSS MB of the process while that benchmark ran (VmHWM, reset before each
benchmark via /proc/self/clear_refs; falls back to the process-lifetime ru_maxrss) and a note
(GFLOP/s for the GEMM reference).

Shapes default to the reference baseline: B 8, T 64, D 512, N 16, K 4, R 1, V 8192, chunk 64,
L 2 (layers, torch model only). Inputs are realistic: A_log = log(1..N), softplus(dt_bias)
log-uniform in [1e-3, 1e-1], u, Bt, Ct ~ N(0,1), small dt pre-activations, unit-norm prototypes.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import resource

import rtrainer  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see rtrainer/__init__.py)
import numpy as np
import pytest

_RESULTS: list[dict] = []


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int = 8
    T: int = 64
    D: int = 512
    N: int = 16
    K: int = 4
    R: int = 1
    V: int = 8192
    chunk: int = 64
    L: int = 2

    @property
    def tokens(self) -> int:
        return self.B * self.T

    @property
    def n_chunks(self) -> int:
        return -(-self.T // self.chunk)


def pytest_addoption(parser):
    g = parser.getgroup("rtrainer bench")
    g.addoption("--threads", default="1,2",
                help="comma-separated n_threads values to parametrise over (default 1,2)")
    g.addoption("--rounds", type=int, default=30, help="timed rounds per benchmark (default 30)")
    g.addoption("--shape", default="",
                help="override baseline sizes, e.g. B=4,T=128 (keys: B T D N K R V chunk L)")
    g.addoption("--torch-compile", action="store_true", default=False,
                help="also benchmark the torch.compile'd model (slow compile on first call)")


def pytest_generate_tests(metafunc):
    if "n_threads" in metafunc.fixturenames:
        for mark in metafunc.definition.iter_markers("parametrize"):
            names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            if "n_threads" in names:
                return  # the test parametrises n_threads itself
        raw = metafunc.config.getoption("--threads")
        try:
            values = [int(v) for v in str(raw).split(",") if v.strip()]
        except ValueError:
            raise pytest.UsageError(f"--threads must be comma-separated integers, got {raw!r}")
        if not values or min(values) < 1:
            raise pytest.UsageError(f"--threads needs integers >= 1, got {raw!r}")
        metafunc.parametrize("n_threads", values, ids=[f"t{v}" for v in values])


def _parse_shape(raw: str) -> Shape:
    over = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        key, _, val = item.partition("=")
        if key not in Shape.__dataclass_fields__ or not val.isdigit() or int(val) < 1:
            raise pytest.UsageError(f"--shape: bad item {item!r} (keys: B T D N K R V chunk L, "
                                    "values integers >= 1)")
        over[key] = int(val)
    return Shape(**over)


def pytest_configure(config):
    config._rtrainer_bench_shape = _parse_shape(config.getoption("--shape"))  # fail fast


@pytest.fixture(scope="session")
def shape(pytestconfig) -> Shape:
    return pytestconfig._rtrainer_bench_shape


def _inv_softplus(y):
    return y + np.log(-np.expm1(-y))


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.fixture(scope="session")
def inputs(shape) -> dict[str, np.ndarray]:
    """Realistic float32 C-contiguous inputs (int64 ids/targets), one set for the session."""
    s = shape
    rng = np.random.default_rng(1234)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    nrm = lambda *shp: rng.standard_normal(shp)  # noqa: E731
    d = {}
    d["ids"] = rng.integers(0, s.V, (s.B, s.T), dtype=np.int64)
    d["targets"] = rng.integers(0, s.V, (s.B, s.T), dtype=np.int64)
    d["E"] = f32(nrm(s.V, s.D))
    P = nrm(s.V, s.D)
    d["P"] = f32(P / np.linalg.norm(P, axis=1, keepdims=True))
    # conv: x is the layer input (residual stream), pre/u what conv_forward saves
    x = nrm(s.B, s.T, s.D)
    conv_w = nrm(s.D, s.K) / math.sqrt(s.K)
    conv_b = 0.1 * nrm(s.D)
    pre = np.broadcast_to(conv_b, x.shape).copy()
    for k in range(s.K):
        shift = s.K - 1 - k
        pre[:, shift:] += conv_w[:, k] * x[:, :s.T - shift]
    d.update(x=f32(x), conv_w=f32(conv_w), conv_b=f32(conv_b), pre=f32(pre), u_conv=f32(_silu(pre)))
    # scan
    dt_bias = _inv_softplus(np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), s.D)))
    d["dt_bias"] = f32(dt_bias)
    d["A_log"] = f32(np.broadcast_to(np.log(np.arange(1, s.N + 1)), (s.D, s.N)))
    d["D_skip"] = f32(np.ones(s.D))
    d["u"] = f32(nrm(s.B, s.T, s.D))
    xdbl = nrm(s.B, s.T, 2 * s.N + s.R)
    d["xdbl"] = f32(xdbl)
    dt_proj_w = 0.1 * nrm(s.R, s.D) / math.sqrt(s.R)
    d["dt"] = f32(xdbl[..., 2 * s.N:] @ dt_proj_w)        # pre-bias, pre-softplus
    d["x_proj_w"] = f32(nrm(s.D, 2 * s.N + s.R) / math.sqrt(s.D))
    d["dt_proj_w"] = f32(dt_proj_w)
    d["out_proj_w"] = f32(nrm(s.D, s.D) / math.sqrt(s.D))
    # cotangents
    for name in ("dout", "du", "dy", "dz_ln"):
        d[name] = f32(0.01 * nrm(s.B, s.T, s.D))
    d["dxdbl"] = f32(0.01 * nrm(s.B, s.T, 2 * s.N + s.R))
    # layernorm output (unit rows up to eps) for the norm backward and HPN
    r = nrm(s.B * s.T, s.D) * 2.0 + 0.5
    mu = r.mean(1, keepdims=True)
    rstd = 1.0 / np.sqrt(((r - mu) ** 2).mean(1, keepdims=True) + 1e-5)
    d["r"] = f32(r)
    d["z"] = f32((r - mu) * rstd)
    d["rstd"] = f32(rstd[:, 0])
    return d


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_ok: bool) -> float:
    if reset_ok:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


class Bench:
    """Wraps pytest-benchmark's fixture: pedantic timing with an untimed per-round setup."""

    def __init__(self, benchmark, request, shape: Shape):
        self.benchmark, self.request, self.shape = benchmark, request, shape
        self.rounds = request.config.getoption("--rounds")

    def __call__(self, fn, *, setup=None, threads: int, rounds: int | None = None,
                 warmup: int = 2, tokens: int | None = None, note_fn=None):
        """Time fn() (setup() runs before each round, untimed). Records a summary row."""
        self.benchmark.extra_info["threads"] = threads
        gc.collect()  # drop earlier benchmarks' garbage before the peak-RSS window opens
        reset_ok = _reset_peak_rss()

        def _setup():
            if setup is not None:
                setup()

        result = self.benchmark.pedantic(fn, setup=_setup, rounds=rounds or self.rounds,
                                         warmup_rounds=warmup, iterations=1)
        peak = _peak_rss_mb(reset_ok)
        st = getattr(self.benchmark, "stats", None)
        median = st.stats.median if st is not None else float("nan")
        tok = self.shape.tokens if tokens is None else tokens
        note = note_fn(median) if (note_fn is not None and st is not None) else ""
        self.benchmark.extra_info.update(peak_rss_mb=round(peak, 1), tokens=tok,
                                         tokens_per_s=tok / median if median == median else None)
        if note:
            self.benchmark.extra_info["note"] = note
        _RESULTS.append(dict(name=self.request.node.name.split("[")[0].removeprefix("test_"),
                             threads=threads, median_ms=median * 1e3,
                             tokens_per_s=tok / median if tok else float("nan"),
                             peak_mb=peak, note=note))
        return result


@pytest.fixture
def bench(benchmark, request, shape) -> Bench:
    return Bench(benchmark, request, shape)


def _floor_columns(s, threads_seen):
    """{(name, threads): floor ms} and {threads: step floor dict}, measured machine rates per thread
    count (bench/floors.py); empty when the floors cannot be computed."""
    try:
        import floors
    except ImportError:
        return {}, {}, {}
    gemm = {r["threads"]: r["median_ms"] / 1e3 for r in _RESULTS if r["name"] == "numpy_gemm_1024"}
    rates = {t: floors.machine_rates(t, gemm.get(t)) for t in threads_seen}
    per = {}
    for r in _RESULTS:
        fl = floors.kernel_floor_s(r["name"], s, rates[r["threads"]])
        if fl is not None:
            per[(r["name"], r["threads"])] = fl * 1e3
    step = {t: floors.step_floor_s(s, rates[t]) for t in threads_seen}
    return per, step, rates


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    s = getattr(config, "_rtrainer_bench_shape", None)
    tr = terminalreporter
    per, step, rates = _floor_columns(s, sorted({r["threads"] for r in _RESULTS})) if s else ({}, {}, {})
    tr.write_sep("-", "rtrainer bench summary" + (f"  {s}" if s else ""))
    tr.write_line(f"{'name':<28} {'thr':>3} {'median ms':>10} {'floor ms':>9} {'x floor':>7} "
                  f"{'tokens/s':>12} {'peak MB':>8}  note")
    for r in _RESULTS:
        tps = f"{r['tokens_per_s']:12.4g}" if r["tokens_per_s"] == r["tokens_per_s"] else f"{'-':>12}"
        fl = per.get((r["name"], r["threads"]))
        if fl is None and r["name"] == "train_step" and r["threads"] in step:
            fl = step[r["threads"]]["total"] * 1e3
        fcol = f"{fl:9.3f} {r['median_ms'] / fl:7.2f}" if fl else f"{'':>9} {'':>7}"
        tr.write_line(f"{r['name']:<28} {r['threads']:>3} {r['median_ms']:10.3f} {fcol} {tps} "
                      f"{r['peak_mb']:8.1f}  {r['note']}")
    tr.write_line("accumulating backward kernels: gradient buffers are zeroed in the untimed "
                  "per-round setup; peak MB = process VmHWM during that benchmark "
                  f"(pid {os.getpid()}).")
    for t, rt in sorted(rates.items()):
        st = step[t]
        tr.write_line(f"floors at {t} thread(s) (bench/floors.py): op rate {rt['ops'] / 1e9:.1f} G lane-ops/s "
                      f"(= GEMM {rt['gemm_flops'] / 1e9:.1f} GFLOP/s / 2), memory {rt['bytes'] / 1e9:.1f} GB/s "
                      f"(numpy copy); train_step floor = kernels {st['kernels'] * 1e3:.3f} ms + matmuls "
                      f"{st['matmul'] * 1e3:.3f} ms = {st['total'] * 1e3:.3f} ms")
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i.get('internal_api')}/{i.get('architecture')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        tr.write_line("BLAS: " + (", ".join(blas) or "none found") +
                      f"; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    except Exception as exc:  # noqa: BLE001 - the summary must not fail on a report line
        tr.write_line(f"BLAS: unknown ({exc})")
