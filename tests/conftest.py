import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "shakespeare.txt"
TIMING_KEYS = {"tokens_per_s", "elapsed_s", "rss_mb"}


def tiny_config(tmp_path, *, steps=30, threads=1, extra="", train=None, data_format="u8", **sections):
    """A small run file (2 layers, width 16) on a slice of the bundled corpus."""
    if train is None:
        train = tmp_path / "corpus.txt"
        train.write_bytes(CORPUS.read_bytes()[:60_000])
    text = f"""
[run]
out_dir = "{tmp_path / 'run'}"
seed = 7
threads = {threads}
[model]
d_model = 16
d_state = 4
d_conv = 4
base_layers = 2
target_layers = 2
vocab_size = 128
scan_chunk = 8
[optim]
lr = 1e-2
grad_clip = 1.0
[schedule]
warmup_steps = 3
[train]
steps = {steps}
batch_size = 4
seq_len = 32
[data]
train = "{train}"
format = "{data_format}"
val_ratio = 0.1
[eval]
val_every = 10
eval_batches = 2
[checkpoint]
save_every = 10
[log]
log_every = 1
{extra}
"""
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def run_cli(*args, env_extra=None, cwd=None, check=False):
    env = dict(os.environ)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "rtrainer", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd or REPO, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def records_close(got, want, rel=1e-5):
    """The records of `want` (written by another build: a fixture made on another kind of CPU) and
    `got` are the same training up to float32 rounding: the same keys, kinds and steps, every float
    within `rel` except the lr (the schedule is exact), everything else equal. Returns the first
    pair that is not, or None."""
    if len(got) != len(want):
        return (len(got), len(want))
    for g, w in zip(got, want):
        if set(g) != set(w):
            return (g, w)
        for k, v in w.items():
            if isinstance(v, float) and k != "lr":
                if g[k] != pytest.approx(v, rel=rel, abs=rel * 1e-2):
                    return (g, w)
            elif g[k] != v:
                return (g, w)
    return None


def read_metrics(path):
    import orjson

    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines()]


def strip_timing(records):
    """What must agree between two runs of the same training: timings and event lines (warnings,
    integrity events) left out."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if r.get("kind") != "event"]


@pytest.fixture
def corpus_bytes():
    return CORPUS.read_bytes()


def step_dirs(run_dir):
    """The committed step checkpoints of a run directory, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir())


def latest_checkpoint(run_dir):
    dirs = step_dirs(run_dir)
    assert dirs, f"no step checkpoint in {run_dir}"
    return dirs[-1]


def checkpoint_tensors(path):
    """Tensors of a step directory (or of a checkpoint file), read with safetensors directly."""
    from safetensors.numpy import load_file

    path = Path(path)
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))
