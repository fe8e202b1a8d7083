"""The streaming data pipeline (rtrainer.stream): ingestion throughput from memory-mapped shards, and
the share of a training step spent waiting for data.

    .venv/bin/python bench/bench_data.py [--shards 8] [--mib 32] [--steps 60] [--threads 2]
    make bench   # also collects the pytest-benchmark tests below

1. ingestion: tokens/s that TokenStream.next_batch() delivers (int64 (B, T) ids + targets) from a
   shard directory of u16 `.bin` files, with prefetch_workers 0 and 2, at the baseline batch
   (B 8, T 64) and at a large one (B 64, T 1024); page cache warm (the files were just written) or
   cold (the shards' pages dropped with posix_fadvise(DONTNEED) first: reads come from the disk).
2. waiting for data: the training loop at the baseline shape (B 8, T 64, D 512, N 16, L 2, V 8192):
   per step, the time in next_batch() / the whole step (next_batch + forward + backward + AdamW),
   with prefetch_workers 0 and 2 (prefetch_buffer 16): packed windows from a warm cache, and
   random windows (a random page per row) from a cold cache, the case prefetch is for.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import rtrainer  # noqa: F401  (before numpy: thread settings)
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rtrainer import shards as SH  # noqa: E402
from rtrainer import stream as S  # noqa: E402


def make_shards(d: str, n_shards: int, mib: int, V: int = 8192, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n = mib << 19  # u16 tokens per shard
    for i in range(n_shards):
        rng.integers(0, V, n, dtype=np.uint16).tofile(os.path.join(d, f"shard{i:03d}.bin"))
    SH.prepare_dir(d)
    return n_shards * n


def evict(d: str) -> None:
    """Drop the shards' pages from the page cache (posix_fadvise DONTNEED on our own files: no root
    needed, nothing else is touched), so the next reads come from the disk."""
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def ingest(d: str, B: int, T: int, workers: int, seconds: float = 2.0, cold: bool = False) -> float:
    """tokens/s (B*T per batch) over ~seconds of next_batch() calls."""
    if cold:
        evict(d)
    s = S.TokenStream(SH.open_source(d), B, T, seed=1, prefetch_workers=workers, prefetch_buffer=16)
    for _ in range(3):
        s.next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.next_batch()
        n += 1
    dt = time.perf_counter() - t0
    s.close()
    return n * B * T / dt


def wait_fraction(d: str, workers: int, steps: int, n_threads: int, B=8, T=64, D=512, N=16, L=2, V=8192,
                  random_windows: bool = False, cold: bool = False):
    """(wait / step time, median step ms, median and mean wait us) of the real training step fed by the
    stream."""
    from rtrainer.heads import HPNHead
    from rtrainer.model import MambaLiteStack
    from rtrainer.net import Net
    from rtrainer.optim import AdamW
    from rtrainer.step import train_step

    net = Net(MambaLiteStack(V, D, N, 4, 1, L, scan_chunk=64, n_threads=n_threads),
              HPNHead(V, D, normalize=True, learnable=False, n_threads=n_threads))
    net.init(0, "mamba")
    opt = AdamW(net.flat, n_threads=n_threads)
    if cold:
        evict(d)
    s = S.TokenStream(SH.open_source(d), B, T, seed=2, prefetch_workers=workers, prefetch_buffer=16,
                      random_windows=random_windows)
    waits, totals = [], []
    with threadpool_limits(limits=n_threads, user_api="blas"):
        for i in range(steps + 3):
            t0 = time.perf_counter()
            ids, targets = s.next_batch()
            t1 = time.perf_counter()
            train_step(net, opt, ids, targets, 1e-4)
            t2 = time.perf_counter()
            if i >= 3:  # the first steps allocate the workspace and start the workers
                waits.append(t1 - t0)
                totals.append(t2 - t0)
    s.close()
    return (sum(waits) / sum(totals), 1e3 * float(np.median(totals)), 1e6 * float(np.median(waits)),
            1e6 * float(np.mean(waits)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mib", type=int, default=32, help="MiB per shard")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="", help="use this directory for the shards (default: a temporary one)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir or None) as d:
        total = make_shards(d, a.shards, a.mib)
        print(f"{a.shards} shards x {a.mib} MiB u16 = {total:,} tokens (page cache warm)")
        print(f"{'B':>4} {'T':>5} {'cache':>5} {'workers':>7} {'tokens/s':>14}")
        for B, T, cold in ((8, 64, False), (64, 1024, False), (64, 1024, True)):
            for w in (0, 2):
                print(f"{B:>4} {T:>5} {'cold' if cold else 'warm':>5} {w:>7} {ingest(d, B, T, w, cold=cold):>14,.0f}")
        print(f"\ntraining step (8, 64, 512, 16, 2, 8192), {a.threads} threads, {a.steps} steps")
        print(f"{'windows':>10} {'cache':>5} {'workers':>7} {'waiting % of step':>18} {'median step ms':>15} "
              f"{'median wait us':>15} {'mean wait us':>13}")
        for rnd, cold in ((False, False), (True, True)):
            for w in (0, 2):
                frac, step_ms, wait_us, mean_us = wait_fraction(d, w, a.steps, a.threads, random_windows=rnd,
                                                                cold=cold)
                print(f"{'random' if rnd else 'packed':>10} {'cold' if cold else 'warm':>5} {w:>7} "
                      f"{100 * frac:>17.2f}% {step_ms:>15.1f} {wait_us:>15.1f} {mean_us:>13.0f}")


# ------------------------------------------------------------------ pytest-benchmark (make bench)
def test_ingest_baseline_batch(bench, tmp_path_factory):
    """next_batch() at (B 8, T 64) from memory-mapped shards, no prefetch."""
    d = str(tmp_path_factory.mktemp("shards"))
    make_shards(d, 4, 8)
    s = S.TokenStream(SH.open_source(d), 8, 64, seed=1)
    bench(s.next_batch, threads=1, rounds=2000, tokens=8 * 64)


def test_ingest_large_batch_prefetch(bench, tmp_path_factory):
    """next_batch() at (B 64, T 1024), 2 prefetch workers."""
    d = str(tmp_path_factory.mktemp("shards"))
    make_shards(d, 4, 8)
    s = S.TokenStream(SH.open_source(d), 64, 1024, seed=1, prefetch_workers=2, prefetch_buffer=16)
    bench(s.next_batch, threads=2, rounds=200, tokens=64 * 1024)
    s.close()


if __name__ == "__main__":
    main()
