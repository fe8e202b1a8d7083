"""Fast checks of bench/flops.py (the FLOP count of one training step) and of bench/compare.py's
table, targets and JSON on a tiny shape. No torch or jax needed."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import flops  # noqa: E402
import compare  # noqa: E402

TINY = dict(B=2, T=16, D=32, N=16, K=4, R=1, L=2, V=256)


def test_total_is_the_sum_of_its_parts():
    f = flops.step_flops(**TINY)
    assert f["total"] == f["forward"] + f["backward"] + f["optimizer"] == sum(f["components"].values())
    assert f["matmul"] == sum(2 * m * k * n for m, k, n in f["matmul_shapes"])
    assert all(isinstance(v, int) and v > 0 for v in f["components"].values())
    assert flops.model_flops(**TINY) == f["total"]


def test_hand_counts_at_tiny_shape():
    B, T, D, N, K, R, L, V = TINY.values()
    BT, W = B * T, 2 * N + R
    c = flops.step_flops(**TINY)["components"]
    assert c["fwd.matmul.out_proj"] == L * 2 * BT * D * D
    assert c["bwd.matmul.out_proj"] == 2 * L * 2 * BT * D * D          # dW and dX
    assert c["fwd.matmul.x_proj"] == L * 2 * BT * D * W
    assert c["bwd.matmul.x_proj"] == 2 * L * 2 * BT * D * W
    assert c["fwd.matmul.dt_proj"] == L * 2 * BT * R * D
    assert c["fwd.scan"] == L * (D * N + 6 * BT * D + 7 * BT * D * N)
    assert c["bwd.scan"] == L * (15 * BT * D * N + 17 * BT * D + 2 * D * N)
    n_layer = D * K + D + D * W + R * D + D + D * N + D + D * D
    n_train = V * D + L * n_layer                                      # prototypes fixed
    n_decay = V * D + L * (D * K + D * W + R * D + D * D)
    f = flops.step_flops(**TINY)
    assert f["params_trainable"] == n_train and f["params_decay"] == n_decay
    assert c["opt.adamw"] == 15 * n_train + n_decay
    assert c["opt.grad_norm"] == 2 * n_train


def test_learnable_prototypes_add_their_update_and_gradient():
    a = flops.step_flops(**TINY)
    b = flops.step_flops(**TINY, learnable_prototypes=True)
    V, D, BT = TINY["V"], TINY["D"], TINY["B"] * TINY["T"]
    assert b["params_trainable"] - a["params_trainable"] == V * D
    assert b["optimizer"] - a["optimizer"] == 2 * V * D + 16 * V * D
    assert b["components"]["bwd.hpn"] - a["components"]["bwd.hpn"] == BT * (4 * D + 6)
    assert b["forward"] == a["forward"]


def test_activation_work_scales_with_tokens():
    a = flops.step_flops(**TINY)
    b = flops.step_flops(**dict(TINY, B=2 * TINY["B"]))
    # optimizer work is per parameter, the rest per token except per-layer constants/weight-grad sums
    assert b["optimizer"] == a["optimizer"]
    assert b["matmul"] == 2 * a["matmul"]
    for key in ("fwd.conv", "bwd.conv", "fwd.hpn", "bwd.layernorm"):
        assert b["components"][key] == 2 * a["components"][key]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="D"):
        flops.step_flops(**dict(TINY, D=0))


def test_matmul_shapes_match_what_rtrainer_runs():
    """The products flops.py counts are exactly the np.matmul calls of one rtrainer step."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("rtrainer._kernels.scan", reason="kernels not built")
    from rtrainer.optim import AdamW

    shape = (TINY["B"], TINY["T"], TINY["D"], TINY["N"], TINY["L"], TINY["V"])
    model, head, flat, _, _, net = compare.rtrainer_init(shape, flat_params=True)
    opt = AdamW(flat)
    ids, targets = compare._batch(np, shape)
    step = compare._rtrainer_step_fn(net, opt, ids, targets)
    acc = compare._Acc()
    acc.record_shapes = True
    restore = compare.instrument_rtrainer(acc)
    try:
        loss = step()
    finally:
        restore()
    import types

    import rtrainer.model as rm
    from rtrainer._kernels import scan as real_scan
    assert rm.np is np and rm._scan is real_scan and isinstance(rm._conv, types.ModuleType)
    assert np.isfinite(loss)
    got = Counter((a[0], a[1], b[1]) for a, b in acc.shapes)
    want = Counter(flops.step_flops(**TINY)["matmul_shapes"])
    assert got == want
    assert {"matmul", "scan_fwd", "scan_bwd", "optimizer"} <= set(acc.t)


def _fake(fw, shape, thr, ms, rss=100.0, losses=(1.0, 0.9)):
    return dict(framework=fw, shape=list(shape), threads=thr, status="ok", median_s=ms / 1e3,
                peak_rss_mb=rss, losses=list(losses), steps_timed=5)


def test_evaluate_and_table_on_synthetic_results():
    base = compare.BASELINE
    res = [_fake("rtrainer", base, 1, 20.0), _fake("torch", base, 1, 100.0),
           _fake("rtrainer", base, 2, 10.0), _fake("torch", base, 2, 60.0),
           _fake("jax", base, 2, 50.0, losses=(1.1, 0.9)),
           dict(framework="torch-compile", shape=list(base), threads=2, status="timeout after 5 s")]
    ref = res[0]["losses"]
    for r in res[1:]:
        if r["status"] == "ok":
            r["parity"] = compare.loss_parity(r["losses"], ref)
    res[0]["parity"] = dict(ok=True, text="reference")
    gemm = {"1": dict(status="ok", gflops=100.0), "2": dict(status="ok", gflops=180.0)}
    checks = compare.evaluate(res, gemm)
    rt2 = res[2]
    assert rt2["fastest_peer"] == "jax" and rt2["speedup"] == pytest.approx(5.0)
    assert rt2["target"].endswith("PASS")
    assert res[0]["speedup"] == pytest.approx(5.0)
    tot = flops.model_flops(8, 64, 512, 16, 4, 1, 2, 8192)
    assert rt2["gflops"] == pytest.approx(tot / 1e9 / 0.010)
    assert rt2["frac_gemm"] == pytest.approx(rt2["gflops"] / 180.0)
    assert res[4]["parity"]["ok"] is False and res[3]["parity"]["ok"] is True
    names = {c["target"]: c for c in checks}
    scal = [c for t, c in names.items() if "1.7x" in t]
    assert scal and scal[0]["ok"] is True                               # 2.0x
    table = compare.format_table(res, gemm)
    assert "MISMATCH" in table and "timeout after 5 s" in table and "5.00x" in table
    assert "PASS" in compare.format_checks(checks)


def test_parse_shapes():
    assert compare.parse_shapes("baseline") == [compare.BASELINE]
    assert len(compare.parse_shapes("all")) == 8
    assert compare.parse_shapes("2,16,32,16,2,256;4,8,16,4,1,64") == [(2, 16, 32, 16, 2, 256),
                                                                       (4, 8, 16, 4, 1, 64)]
    with pytest.raises(SystemExit):
        compare.parse_shapes("1,2,3")


def test_harness_end_to_end_tiny(tmp_path):
    """The real script: rtrainer only, tiny shape, 1 thread; table, breakdown and JSON."""
    pytest.importorskip("threadpoolctl")
    out = tmp_path / "cmp.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--shapes", "tiny",
                        "--threads", "1", "--frameworks", "rtrainer", "--steps", "2",
                        "--gemm-reps", "2", "--bd-steps", "2", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rtrainer" in p.stdout and "step breakdown" in p.stdout
    d = json.loads(out.read_text())
    assert d["gemm"]["1"]["gflops"] > 0
    (r,) = d["results"]
    assert r["status"] == "ok" and r["framework"] == "rtrainer" and r["threads"] == 1
    assert r["shape"] == list(compare.TINY)
    assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["gflops"] > 0
    assert len(r["losses"]) == 2 and r["losses"][1] < r["losses"][0] + 1e-3
    bd = r["breakdown"]
    assert set(bd["parts_s"]) == set(compare.BD_COLS)
    assert sum(bd["parts_s"].values()) == pytest.approx(bd["wall_s"])
