"""bench/flops.py's count of the `mamba` step and bench/compare.py --layer mamba, checked against
what rtrainer's MambaStack actually runs (no torch or jax needed)."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402
import flops  # noqa: E402

SHAPE = (2, 16, 32, 8, 2, 64)     # B, T, D, N, L, V


def test_mamba_flops_parts_and_matmul_shapes_match_what_rtrainer_runs():
    from rtrainer.optim import AdamW

    B, T, D, N, L, V = SHAPE
    R = compare.mamba_dt_rank(D)
    f = flops.mamba_step_flops(B, T, D, N, compare.K_CONV, R, L, V, compare.E_MAMBA)
    assert f["total"] == f["forward"] + f["backward"] + f["optimizer"] == sum(f["components"].values())
    assert f["matmul"] == sum(2 * m * k * n for m, k, n in f["matmul_shapes"])
    model, head, flat, _, decay, net = compare.rtrainer_init(SHAPE, flat_params=True, layer="mamba")
    assert type(model).__name__ == "MambaStack" and model.C == 2 * D and model.R == R
    assert f["params_trainable"] == flat.n_trainable
    opt = AdamW(flat)
    ids, targets = compare._batch(np, SHAPE)
    step = compare._rtrainer_step_fn(net, opt, ids, targets)
    acc = compare._Acc()
    acc.record_shapes = True
    restore = compare.instrument_rtrainer(acc)
    try:
        loss = step()
    finally:
        restore()
    assert np.isfinite(loss)
    got = Counter((a[0], a[1], b[1]) for a, b in acc.shapes)
    assert got == Counter(f["matmul_shapes"])
    assert {"matmul", "scan_fwd", "scan_bwd", "rmsnorm", "gate", "optimizer"} <= set(acc.t)


def test_compare_mamba_end_to_end_tiny(tmp_path):
    import json
    import subprocess

    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--layer", "mamba", "--shapes", "tiny",
                        "--threads", "1", "--steps", "2", "--frameworks", "rtrainer", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "layer: mamba" in p.stdout
    d = json.loads(out.read_text())
    (r,) = d["results"]
    assert r["status"] == "ok" and r["layer"] == "mamba" and r["model_gflop"] > 0
