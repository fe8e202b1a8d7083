"""`rtrainer parity`: the save/load/resume parity probe (strict: bitwise).

For the model, data and optimizer of a run file it trains, in a scratch directory, at the run's
thread count:

  A  N steps straight;
  B  the same run paused after N/2 steps (a checkpoint is written), then resumed from that checkpoint
     by a NEW Trainer to step N;

and requires A == B bitwise: every parameter and both AdamW moments, the optimizer step count, the
data cursor, the RNG state, and every deterministic metrics field (timings excluded). Then it
round-trips A's final checkpoint (load -> flat buffers -> save -> load) and requires the tensors and
the state to come back bitwise. The first difference is printed; the exit code is 0 on success and
1 on a mismatch (configuration or data errors keep their usual codes).
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import config as config_mod
from .metrics import read_metrics

TIMING_KEYS = ("tokens_per_s", "elapsed_s", "rss_mb")
# state fields that legitimately differ between two runs of the same training
_STATE_IGNORED = ("elapsed_s", "metrics_offset", "config")


class ParityMismatch(Exception):
    """A parity probe found a difference; the message names the first one."""


def first_tensor_difference(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str | None:
    """The first difference between two name -> array dicts (bitwise), as a sentence, or None."""
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            return f"tensor {name} exists only in {label_a if name in a else label_b}"
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"tensor {name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        # compare bit patterns: NaN == NaN and -0.0 != 0.0 are what "bitwise" means
        xb, yb = x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)
        if not np.array_equal(xb, yb):
            flat = np.flatnonzero(x.reshape(-1).view(f"u{x.itemsize}") != y.reshape(-1).view(f"u{y.itemsize}"))
            i = int(flat[0])
            idx = np.unravel_index(i, x.shape) if x.ndim else ()
            return (f"tensor {name}{list(map(int, idx))}: {x.reshape(-1)[i]!r} ({label_a}) vs "
                    f"{y.reshape(-1)[i]!r} ({label_b}); {flat.size} of {x.size} elements differ")
    return None


def _first_value_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}{k}: present only on one side"
            d = _first_value_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_value_difference(x, y, f"{path}{i}.")
            if d:
                return d
        return None
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return None if same else f"{path.rstrip('.')}: {a!r} vs {b!r}"


def run_parity(config, steps: int | None = None, workdir: str | None = None, say=print) -> dict:
    """Run the probe for a Config; returns a summary dict, raises ParityMismatch on a difference."""
    from .trainer import Trainer

    n = int(steps or min(config.train.steps, 20))
    if n < 2:
        from .errors import ConfigError

        raise ConfigError(f"--steps: the parity probe needs at least 2 steps, got {n}")
    half = n // 2
    with tempfile.TemporaryDirectory(prefix="rtrainer-parity-", dir=workdir) as tmp:
        def cfg_for(name):
            d = config_mod.config_to_dict(config)
            d["run"]["out_dir"] = str(Path(tmp) / name)
            d["train"]["steps"] = n
            return config_mod.config_from_dict(d)

        say(f"parity: A = {n} steps straight")
        Trainer(cfg_for("a"), console=False).fit()
        say(f"parity: B = {half} steps, checkpoint, a new trainer resumes to {n}")
        Trainer(cfg_for("b"), console=False, stop_at=half).fit()
        resumed = Trainer(cfg_for("b"), console=False, resume="auto")
        resumed.fit()
        if resumed.step != n:
            raise ParityMismatch(f"the resumed run ended at step {resumed.step}, not {n}")

        da, db = Path(tmp) / "a", Path(tmp) / "b"
        ta, sa = ckpt.load_checkpoint(ckpt.find_checkpoints(da / "checkpoints")[0][1])
        tb, sb = ckpt.load_checkpoint(ckpt.find_checkpoints(db / "checkpoints")[0][1])
        diff = first_tensor_difference(ta, tb, "straight", "resumed")
        if diff:
            raise ParityMismatch(f"straight vs resumed at step {n}: {diff}")
        strip = lambda s: {k: v for k, v in s.items() if k not in _STATE_IGNORED}  # noqa: E731
        diff = _first_value_difference(strip(sa), strip(sb))
        if diff:
            raise ParityMismatch(f"straight vs resumed at step {n}: checkpoint state {diff}")
        ma = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(da / "metrics.jsonl")]
        mb = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(db / "metrics.jsonl")]
        for i, (x, y) in enumerate(zip(ma, mb)):
            diff = _first_value_difference(x, y)
            if diff:
                raise ParityMismatch(f"straight vs resumed: metrics line {i + 1} (step {x.get('step')}): {diff}")
        if len(ma) != len(mb):
            raise ParityMismatch(f"straight vs resumed: {len(ma)} vs {len(mb)} metrics lines")
        say(f"parity: straight == resumed, bitwise: {len(ta)} tensors, checkpoint state, {len(ma)} metrics lines")

        # checkpoint round trip through a fresh Net's buffers
        from .net import Net

        net = Net.build(resumed.resolved, resumed.data.vocab_size)
        net.load_tensors(ta, source="round trip")
        path = ckpt.write_step_checkpoint(Path(tmp) / "a" / "checkpoints", n + 1, net.tensors(), sa)
        t2, s2 = ckpt.load_checkpoint(path)
        diff = first_tensor_difference(ta, t2, "saved", "re-saved") or _first_value_difference(sa, s2)
        if diff:
            raise ParityMismatch(f"checkpoint round trip: {diff}")
        say(f"parity: checkpoint round trip (load -> buffers -> save -> load) bitwise: {len(t2)} tensors and state")
    return {"steps": n, "tensors": len(ta), "metrics_lines": len(ma)}


def config_for_probe(path: str, overrides) -> "config_mod.Config":
    cfg = config_mod.load_config(path, list(overrides))
    # the probe never writes into the run's own directory; checkpoints every step are not needed
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save_every=0, keep_last=0))
