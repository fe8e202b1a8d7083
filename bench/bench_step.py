"""One full rtrainer training step (forward, HPN loss, backward, grad norm, AdamW) at the
reference trainer's baseline shape (B 8, T 64, D 512, N 16, 2 layers, V 8192), 1 and 2 threads.

    make bench            # or: pytest bench/bench_step.py --benchmark-only

Reports tokens/s (B*T / median step time) and the process's peak RSS in extra_info.
"""
import resource

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack
from rtrainer.optim import AdamW
from rtrainer.params import FlatParams

BASELINE = dict(B=8, T=64, D=512, N=16, K=4, R=1, L=2, V=8192)


def make_step(n_threads, B, T, D, N, K, R, L, V, learnable=False):
    model = MambaLiteStack(V, D, N, K, R, L, scan_chunk=64, n_threads=n_threads)
    head = HPNHead(V, D, normalize=True, learnable=learnable, n_threads=n_threads)
    flat = FlatParams(model.param_specs() + head.param_specs())
    model.bind(flat.params, flat.grads)
    head.bind(flat.params, flat.grads)
    model.init_params(0, "mamba")
    head.init_params(0, "mamba")
    opt = AdamW(flat, n_threads=n_threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)
    dz = np.empty((B * T, D), np.float32)

    def step():
        flat.zero_grad()
        z = model.forward(ids)
        loss = head.forward(z, targets)
        dz.fill(0.0)
        head.backward(dz)
        model.backward(dz)
        opt.step(1e-4, opt.clip_scale(opt.grad_norm()))
        return loss

    return step, model


@pytest.mark.parametrize("n_threads", [1, 2])
def test_train_step_baseline(benchmark, n_threads):
    shape = BASELINE
    with threadpool_limits(limits=n_threads, user_api="blas"):
        step, model = make_step(n_threads, **shape)
        step()  # warm-up: allocates the workspace
        benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    tokens = shape["B"] * shape["T"]
    benchmark.extra_info.update({
        "shape": "B{B} T{T} D{D} N{N} L{L} V{V}".format(**shape),
        "threads": n_threads,
        "tokens_per_s": round(tokens / median, 1),
        "activation_mb": round(model.activation_bytes() / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    print(f"\ntrain step {benchmark.extra_info['shape']} threads={n_threads}: {median * 1e3:.1f} ms, "
          f"{tokens / median:,.0f} tokens/s, peak RSS {benchmark.extra_info['peak_rss_mb']} MB")
