"""Generation speed: tokens/s of the recurrent step mode (rtrainer/infer.py + kernels/step.pyx),
and the cost of a token against the length of the context before it.

    .venv/bin/python bench/bench_generate.py [--threads 1,2] [--contexts 0,1024,8192] [--tokens 200]
    .venv/bin/python -m pytest bench/bench_generate.py -p no:cacheprovider --benchmark-only

Widths: the quickstart (mamba-lite, d_model 128, V 126, 2 layers) and the baseline
(d_model 512, V 8192, 2 layers), both layer kinds, HPN head, batch 1 and 8 (the prompts of
--num-samples decode together). A generated token = one step of the model + the head's scores +
sampling (temperature 0.8, top-k 40), as `rtrainer generate` does it. For each context length c the
model is first fed c tokens (prefill), then the next --tokens are timed: with a recurrent state the
figure must not grow with c. Each figure is the fastest of 5 repeats of --tokens/5 tokens, in wall time and in the
process's CPU time (on a shared machine the CPU time of a 1-thread run is the better estimate of an
idle machine's wall time).
"""
from __future__ import annotations

import argparse
import time

import rtrainer  # noqa: F401  (before numpy: sets the thread-wait policy, see rtrainer/__init__.py)
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from rtrainer.generate import sample_next
from rtrainer.infer import InferenceState
from rtrainer.net import Net

WIDTHS = {"quickstart": (128, 126), "baseline": (512, 8192)}


def make(layer: str, width: str, threads: int, head: str = "hpn"):
    D, V = WIDTHS[width]
    cfg = {"model": {"layer": layer, "d_model": D, "d_state": 16, "d_conv": 4, "dt_rank": 0, "base_layers": 2,
                     "target_layers": 2, "vocab_size": V},
           "head": {"kind": head}}
    net = Net.build(cfg, n_threads=threads)
    net.model.init_params(0, "mamba")
    net.head.init_params(0, "reference" if head == "hpn" and V > 1000 else "mamba")   # skip spreading 8192 prototypes
    return net


def token_loop(st: InferenceState, n: int, rngs) -> None:
    z = st.z
    for _ in range(n):
        nxt = sample_next(st.scorer.sampling_logits(z), rngs, 0.8, 40, 1.0)
        z = st.step(nxt)


def measure(layer: str, width: str, batch: int, threads: int, contexts, tokens: int) -> list[dict]:
    net = make(layer, width, threads)
    rows = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for c in contexts:
            st = InferenceState(net, batch=batch)
            rngs = [np.random.default_rng([0, i]) for i in range(batch)]
            ids = np.random.default_rng(1).integers(0, net.model.V, size=(batch, max(c, 1)))
            st.prefill(ids)
            token_loop(st, 5, rngs)                          # warm up
            # the fastest of 5 repeats: on a shared machine the other processes only ever add time
            per = max(1, tokens // 5)
            dt = cpu = float("inf")
            for _ in range(5):
                t0, c0 = time.perf_counter(), time.process_time()
                token_loop(st, per, rngs)
                dt = min(dt, (time.perf_counter() - t0) / per)
                cpu = min(cpu, (time.process_time() - c0) / per)
            rows.append({"layer": layer, "width": width, "batch": batch, "threads": threads, "context": c,
                         "ms_per_step": dt * 1e3, "tokens_per_s": batch / dt,
                         "cpu_ms_per_step": cpu * 1e3, "tokens_per_cpu_s": batch / max(cpu, 1e-9)})
    return rows


# ------------------------------------------------------------------------------------------ pytest-benchmark

@pytest.mark.parametrize("layer", ["mamba-lite", "mamba"])
@pytest.mark.parametrize("width", ["quickstart", "baseline"])
@pytest.mark.parametrize("batch", [1, 8])
def test_generate_token(benchmark, layer, width, batch):
    st = InferenceState(make(layer, width, 1), batch=batch)
    rngs = [np.random.default_rng([0, i]) for i in range(batch)]
    st.prefill(np.zeros((batch, 4), np.int64))
    with threadpool_limits(limits=1, user_api="blas"):
        benchmark(token_loop, st, 1, rngs)


# ------------------------------------------------------------------------------------------ script

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--contexts", default="0,1024,8192")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", default="mamba-lite,mamba")
    ap.add_argument("--widths", default="quickstart,baseline")
    a = ap.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; fastest of 5 repeats")
    print(f"{'layer':<11} {'width':<10} {'batch':>5} {'thr':>3} " + " ".join(f"{'ctx ' + str(c):>24}" for c in contexts)
          + "   (tokens/s wall; ms per step wall; ms per step of process CPU time)")
    for layer in a.layers.split(","):
        for width in a.widths.split(","):
            for batch in (int(x) for x in a.batches.split(",")):
                for threads in (int(x) for x in a.threads.split(",")):
                    rows = measure(layer, width, batch, threads, contexts, a.tokens)
                    cells = " ".join(f"{r['tokens_per_s']:>8,.0f} {r['ms_per_step']:>6.2f}ms {r['cpu_ms_per_step']:>6.2f}cpu"
                                     for r in rows)
                    print(f"{layer:<11} {width:<10} {batch:>5} {threads:>3} {cells}", flush=True)


if __name__ == "__main__":
    main()
