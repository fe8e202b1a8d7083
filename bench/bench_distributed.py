"""Data-parallel figures on this machine (real mpirun, loopback): a script, not a pytest benchmark.

    .venv/bin/python bench/bench_distributed.py [--steps 12] [--only allreduce|train|accum]

1. allreduce: time of one in-place Allreduce (SUM) of a float32 buffer on 2 ranks against its
   size (the flat gradient of 0.1 M .. 100 M parameters), as one call and in buckets of 1/4/16 MB
   (non-blocking, all posted at once), median of repeats. Gives the bandwidth the scaling model of
   docs/distributed.md starts from.
2. train: tokens/s of the baseline run (B 8, T 64, D 512, N 16, 2 mamba-lite layers, V 8192) at
   K = 1 process x 2 threads against K = 2 processes x 1 thread (the same global batch), from
   metrics.jsonl of real `rtrainer run` / `rtrainer launch` runs.
3. accum: the same run on one process with train.micro_batch_size = B (no accumulation), B/2, B/4,
   B/8: what splitting the batch into micro-batches costs.
4. big: the step time of a ~100 M-parameter configuration (full mamba block, D 1024, 14 layers,
   V 8192: 101.8 M trainable parameters) on one process x 2 threads, for the scaling model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = [100_000, 1_000_000, 4_000_000, 10_000_000, 25_000_000, 100_000_000]   # parameters
BUCKETS_MB = [0, 1, 4, 16]


def _worker_allreduce(repeats: int) -> None:
    import numpy as np

    from rtrainer import distributed as dist

    c = dist.get_comm()
    rows = []
    for n in SIZES:
        buf = np.ones(n, np.float32)
        for mb in BUCKETS_MB:
            times = []
            for _ in range(repeats if n <= 25_000_000 else max(2, repeats // 3)):
                c.barrier()
                t = time.perf_counter()
                c.allreduce_(buf, bucket_bytes=mb * 2**20)
                times.append(time.perf_counter() - t)
                buf.fill(1.0)
            med = c.max([statistics.median(times)])[0]
            rows.append({"params": n, "bucket_mb": mb, "ms": med * 1e3,
                         "GB_per_s_bus": 2 * (c.size - 1) / c.size * n * 4 / med / 1e9})
    if c.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)


def _mpirun(n: int, args: list[str], threads_env: dict | None = None, timeout=1800) -> subprocess.CompletedProcess:
    from rtrainer.launch import build_command

    argv, env = build_command(n, "X")
    argv = argv[:argv.index(sys.executable)] + [sys.executable, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **env, **(threads_env or {})),
                          timeout=timeout, cwd=REPO)


def bench_allreduce(repeats: int) -> list[dict]:
    p = _mpirun(2, [__file__, "--worker", "allreduce", "--repeats", str(repeats)])
    if p.returncode != 0:
        raise SystemExit(p.stdout + p.stderr)
    rows = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    print("\nAllreduce (SUM, float32, in place), 2 ranks on one machine; bus bandwidth = 2(K-1)/K x bytes / time")
    print(f"{'params':>12} {'MB':>8} " + " ".join(f"{('one call' if b == 0 else f'{b} MB bkt'):>12}" for b in BUCKETS_MB))
    for n in SIZES:
        r = {x["bucket_mb"]: x for x in rows if x["params"] == n}
        print(f"{n:>12,} {n * 4 / 2**20:>8.1f} " + " ".join(f"{r[b]['ms']:>9.2f} ms" for b in BUCKETS_MB))
    best = max(x["GB_per_s_bus"] for x in rows if x["params"] >= 10_000_000)
    print(f"best bus bandwidth at >= 10 M parameters: {best:.2f} GB/s")
    return rows


BASE = """
[run]
out_dir = "{out}"
seed = 1
threads = {threads}
[model]
d_model = 512
d_state = 16
d_conv = 4
base_layers = 2
target_layers = 2
vocab_size = 8192
[train]
steps = {steps}
batch_size = 8
seq_len = 64
micro_batch_size = {micro}
[data]
train = "{data}"
format = "u16"
val_ratio = 0.0
[eval]
val_every = 0
[checkpoint]
save_every = 0
[log]
log_every = 1
"""


def _run_config(tmp: Path, name: str, steps: int, threads: int, micro: int = 0) -> Path:
    import numpy as np

    data = tmp / "tokens.u16"
    if not data.exists():
        np.random.default_rng(0).integers(0, 8192, size=400_000).astype(np.uint16).tofile(data)
    cfg = tmp / f"{name}.toml"
    cfg.write_text(BASE.format(out=tmp / name, threads=threads, steps=steps, micro=micro, data=data))
    return cfg


def _tokens_per_s(run_dir: Path, skip: int = 2) -> float:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r.get("kind") == "train"][skip:]
    return statistics.median(r["tokens_per_s"] for r in tr)


def bench_train(steps: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg1 = _run_config(tmp, "k1", steps, threads=2)
        p = subprocess.run([sys.executable, "-m", "rtrainer", "run", str(cfg1), "--headless"], capture_output=True,
                           text=True, cwd=REPO)
        if p.returncode:
            raise SystemExit(p.stderr)
        out["K=1 x 2 threads"] = _tokens_per_s(tmp / "k1")
        cfg2 = _run_config(tmp, "k2", steps, threads=0)
        p = _mpirun(2, ["-m", "rtrainer", "run", str(cfg2), "--headless"])
        if p.returncode:
            raise SystemExit(p.stdout + p.stderr)
        out["K=2 x 1 thread"] = _tokens_per_s(tmp / "k2")
    print("\nbaseline run (B 8, T 64, D 512, N 16, L 2, V 8192), tokens/s (median of steps 3..):")
    for k, v in out.items():
        print(f"  {k:<18} {v:>10,.0f} tok/s")
    return out



def bench_big(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = _run_config(tmp, "big", steps, threads=2)
        text = cfg.read_text().replace("d_model = 512", "d_model = 1024").replace(
            "base_layers = 2\ntarget_layers = 2", "base_layers = 14\ntarget_layers = 14\nlayer = \"mamba\"")
        cfg.write_text(text)
        p = subprocess.run([sys.executable, "-m", "rtrainer", "run", str(cfg), "--headless"], capture_output=True,
                           text=True, cwd=REPO)
        if p.returncode:
            raise SystemExit(p.stderr)
        tps = _tokens_per_s(tmp / "big", skip=1)
    out = {"tokens_per_s": tps, "step_s": 8 * 64 / tps}
    print(f"\n~100 M parameters (mamba, D 1024, 14 layers, V 8192), B 8 x T 64, 1 process x 2 threads: "
          f"{tps:,.0f} tok/s, {out['step_s']:.2f} s/step")
    return out


def bench_accum(steps: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for micro in (8, 4, 2, 1):
            cfg = _run_config(tmp, f"m{micro}", steps, threads=2, micro=micro)
            p = subprocess.run([sys.executable, "-m", "rtrainer", "run", str(cfg), "--headless"],
                               capture_output=True, text=True, cwd=REPO)
            if p.returncode:
                raise SystemExit(p.stderr)
            out[micro] = _tokens_per_s(tmp / f"m{micro}")
    print("\none process x 2 threads, global batch 8: tokens/s by train.micro_batch_size (8 = no accumulation)")
    for micro, v in out.items():
        print(f"  micro {micro} (accumulation {8 // micro}): {v:>10,.0f} tok/s  ({v / out[8]:.2f} x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default=None, choices=("allreduce", "train", "accum", "big"))
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args()
    if a.worker == "allreduce":
        return _worker_allreduce(a.repeats)
    res = {}
    if a.only in (None, "allreduce"):
        res["allreduce"] = bench_allreduce(a.repeats)
    if a.only in (None, "train"):
        res["train"] = bench_train(a.steps)
    if a.only in (None, "accum"):
        res["accum"] = bench_accum(a.steps)
    if a.only in (None, "big"):
        res["big"] = bench_big(max(3, a.steps // 4))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
