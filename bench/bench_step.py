"""One full rtrainer training step (rtrainer.step.train_step: forward, HPN loss, backward, grad norm,
AdamW) at the
reference trainer's baseline shape (B 8, T 64, D 512, N 16, 2 layers, V 8192), 1 and 2 threads.

    make bench            # or: pytest bench/bench_step.py --benchmark-only [--shape B=4,T=1024]

Its row in the summary table gives tokens/s (B*T / median step time) and peak RSS.
"""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack, MambaStack
from rtrainer.net import Net
from rtrainer.optim import AdamW
from rtrainer.step import train_step

def make_step(n_threads, B, T, D, N, K, R, L, V, learnable=False, layer="mamba-lite", expand=2):
    if layer == "mamba":
        model = MambaStack(V, D, N, K, R, L, expand=expand, scan_chunk=64, n_threads=n_threads)
    else:
        model = MambaLiteStack(V, D, N, K, R, L, scan_chunk=64, n_threads=n_threads)
    net = Net(model, HPNHead(V, D, normalize=True, learnable=learnable, n_threads=n_threads))
    net.init(0, "mamba")
    opt = AdamW(net.flat, n_threads=n_threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)

    def step():
        return train_step(net, opt, ids, targets, 1e-4).loss

    return step, model


def test_train_step(bench, shape, n_threads):
    """rtrainer: forward + HPN loss + backward + grad norm + AdamW, the shape of bench/conftest.py."""
    with threadpool_limits(limits=n_threads, user_api="blas"):
        step, model = make_step(n_threads, B=shape.B, T=shape.T, D=shape.D, N=shape.N, K=shape.K, R=shape.R,
                                L=shape.L, V=shape.V)
        step()  # allocates the workspace
        bench(step, threads=n_threads, rounds=15,
              note_fn=lambda m: f"activations {model.activation_bytes() / 2**20:.1f} MB")


def test_train_step_mamba(bench, shape, n_threads):
    """The same step with the full `mamba` block (E 2, dt_rank ceil(D/16)) instead of mamba-lite."""
    with threadpool_limits(limits=n_threads, user_api="blas"):
        step, model = make_step(n_threads, B=shape.B, T=shape.T, D=shape.D, N=shape.N, K=shape.K,
                                R=-(-shape.D // 16), L=shape.L, V=shape.V, layer="mamba", expand=2)
        step()  # allocates the workspace
        bench(step, threads=n_threads, rounds=15,
              note_fn=lambda m: f"activations {model.activation_bytes() / 2**20:.1f} MB")
