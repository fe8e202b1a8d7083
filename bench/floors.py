"""Machine floors of the kernels: how fast each one could run on this machine, so the bench table
can show how far each piece is from the limit.

    from floors import machine_rates, kernel_floor_s, step_floor_s

Two limits, each measured on this machine, never assumed:
  * op rate: vector operations per second = half the measured float32 GEMM rate (numpy
    1024^3 at the same thread count; a GEMM runs one fused multiply-add = 2 FLOPs per lane per
    vector op at close to the peak issue rate). A kernel's op floor = its vector lane-ops / rate.
  * memory rate: bytes per second of a large numpy copy (64 MB, one thread; a lower bound on
    what the thread count moves). A kernel's byte floor = the bytes it must read + write / rate.
The floor of a kernel is the larger of the two. Op counts are for a minimal implementation
(one operation = one vector instruction on one lane; a fused multiply-add is one operation):

  scan forward,  per (b,t,d,n): delta*A 1, exp 12 (a degree-3 polynomial exp: range reduction 4,
                 polynomial 4, reconstruction 4), h update 2, readout 1             -> 16
  scan backward, per (b,t,d,n): recompute of the forward's h from the chunk state 15 (the
                 exp kept), then g 1, dCt 1, dBt 1, q 2, dA 1, sum g*Bt 1, sum A*q 1,
                 g*E 1                                                              -> 24
Byte counts (float32 = 4 bytes, n = B*T tokens, P = parameters): see BYTES below.
"""
from __future__ import annotations

import time

import numpy as np

SCAN_FWD_OPS = 16
SCAN_BWD_OPS = 24

_CACHE: dict = {}


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def machine_rates(n_threads: int, gemm_s: float | None = None) -> dict:
    """{'gemm_flops': FLOP/s, 'ops': vector lane-ops/s, 'bytes': B/s} at n_threads.
    gemm_s: a measured median of the 1024^3 float32 GEMM (the bench's own row) if there is one."""
    key = (n_threads, gemm_s)
    if key in _CACHE:
        return _CACHE[key]
    if gemm_s is None:
        from threadpoolctl import threadpool_limits

        rng = np.random.default_rng(0)
        a = rng.standard_normal((1024, 1024), dtype=np.float32)
        b = rng.standard_normal((1024, 1024), dtype=np.float32)
        c = np.empty_like(a)
        with threadpool_limits(limits=n_threads, user_api="blas"):
            gemm_s = _median_time(lambda: np.matmul(a, b, out=c), 9)
    gemm = 2.0 * 1024 ** 3 / gemm_s
    src = np.ones(16 * 2 ** 20, np.float32)
    dst = np.empty_like(src)
    copy_s = _median_time(lambda: np.copyto(dst, src), 7)
    rates = dict(gemm_flops=gemm, ops=gemm / 2.0, bytes=2.0 * src.nbytes / copy_s)
    _CACHE[key] = rates
    return rates


def _n_params(s) -> int:
    W = 2 * s.N + s.R
    per_layer = s.D * s.K + s.D + s.D * W + s.R * s.D + s.D + s.D * s.N + s.D + s.D * s.D
    return s.V * s.D + s.L * per_layer + s.V * s.D


def kernel_work(name: str, s) -> tuple[float, float] | None:
    """(vector lane-ops, bytes) that the kernel `name` (a bench row name) must do at shape s;
    None for rows that are not a kernel (references, peers, the step)."""
    n = s.B * s.T
    BTD = n * s.D
    C = 2 * s.D                                   # the mamba block's channels (E = 2)
    P = _n_params(s)
    f = 4.0
    table = {
        # reads + writes of float32 (ids and targets are int64: 8 bytes per token)
        "embed_forward": (0, f * 2 * BTD + 8 * n),                 # E rows, out
        "embed_backward": (0, f * 3 * BTD + 8 * n),                # dout, dE rows read + write
        "conv_forward": (0, f * 3 * BTD),                          # x -> pre, u
        "conv_backward": (0, f * 5 * BTD),                         # du, x, pre, dx read + write
        "layernorm_forward": (0, f * 2 * BTD),                     # x -> z (+ rstd)
        "layernorm_backward": (0, f * 4 * BTD),                    # dz, z, dx read + write
        "hpn_forward": (0, f * 2 * BTD + 8 * n),                   # z, P[y]
        "hpn_backward": (0, f * 4 * BTD + 8 * n),                  # z, P[y], dz read + write
        "softmax_xent": (0, f * 2 * n * s.V),                      # logits read + overwritten
        "optim_sumsq": (0, f * P),
        "optim_adamw_step": (0, f * 7 * P),                        # p, g, m, v read; p, m, v written
        "scan_forward": (SCAN_FWD_OPS * BTD * s.N, f * 4 * BTD),
        "scan_backward": (SCAN_BWD_OPS * BTD * s.N, f * 7 * BTD),
        "rmsnorm_forward": (0, f * 2 * BTD),
        "rmsnorm_backward": (0, f * 4 * BTD),
        "gate_forward": (0, f * 3 * n * C),                        # y, z -> out
        "gate_backward": (0, f * 5 * n * C),                       # dout, y, z -> dy, dz
        "mamba_scan_forward": (SCAN_FWD_OPS * n * C * s.N, f * 4 * n * C),
        "mamba_scan_backward": (SCAN_BWD_OPS * n * C * s.N, f * 7 * n * C),
    }
    return table.get(name)


def kernel_floor_s(name: str, s, rates: dict) -> float | None:
    w = kernel_work(name, s)
    if w is None:
        return None
    ops, nbytes = w
    return max(ops / rates["ops"], nbytes / rates["bytes"])


# the kernel calls of one mamba-lite training step (bench_step.test_train_step)
STEP_KERNELS = [("embed_forward", 1), ("embed_backward", 1), ("conv_forward", "L"),
                ("conv_backward", "L"), ("scan_forward", "L"), ("scan_backward", "L"),
                ("layernorm_forward", 1), ("layernorm_backward", 1), ("hpn_forward", 1),
                ("hpn_backward", 1), ("optim_sumsq", 1), ("optim_adamw_step", 1)]


def step_floor_s(s, rates: dict) -> dict:
    """Sum of the floors of one mamba-lite step: every kernel call plus the matrix products at
    the measured GEMM rate. {'total': s, 'kernels': s, 'matmul': s}."""
    from flops import step_flops

    kern = 0.0
    for name, times in STEP_KERNELS:
        kern += (s.L if times == "L" else times) * kernel_floor_s(name, s, rates)
    mm = step_flops(B=s.B, T=s.T, D=s.D, N=s.N, K=s.K, R=s.R, L=s.L, V=s.V)["matmul"]
    mm_s = mm / rates["gemm_flops"]
    return dict(total=kern + mm_s, kernels=kern, matmul=mm_s)
