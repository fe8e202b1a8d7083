"""`model.layer = "mamba"` (and `model.selective = false`) end to end through the real CLI, in
subprocesses: training, the resolved config, bitwise resume after SIGKILL, resume refusing another
layer kind."""
import signal

import numpy as np
import pytest

from conftest import checkpoint_tensors, latest_checkpoint, read_metrics, run_cli, strip_timing, tiny_config

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def mamba_config(tmp_path, model_keys='layer = "mamba"\nexpand = 2\n', **kw):
    cfg = tiny_config(tmp_path, **kw)
    cfg.write_text(cfg.read_text().replace("[model]\n", "[model]\n" + model_keys, 1))
    return cfg


def test_mamba_run_trains_and_resolves_dt_rank(tmp_path):
    cfg = mamba_config(tmp_path, steps=40)
    p = run_cli("run", cfg, check=True)
    out = tmp_path / "run"
    resolved = tomllib.loads((out / "config.toml").read_text())["model"]
    assert resolved["layer"] == "mamba" and resolved["dt_rank"] == 1 and resolved["selective"] is True  # ceil(16/16)
    ckpt = checkpoint_tensors(latest_checkpoint(out))
    # the mamba block's tensors, by name, with E*D = 32 inner channels
    assert ckpt["param/layers.1.in_proj_w"].shape == (16, 64)
    assert ckpt["param/layers.1.out_proj_w"].shape == (32, 16)
    assert ckpt["param/layers.0.norm_w"].shape == (16,)
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    val = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"]
    first = np.mean([r["loss"] for r in train[:5]])
    last = np.mean([r["loss"] for r in train[-5:]])
    assert last < 0.9 * first, (first, last)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert "step     40/40" in p.stdout


def test_lite_run_resolves_dt_rank_to_one(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    run_cli("run", cfg, check=True)
    resolved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]
    assert resolved["layer"] == "mamba-lite" and resolved["dt_rank"] == 1


@pytest.mark.parametrize("model_keys,fault,threads", [
    ('layer = "mamba"\n', "after_step=13:KILL", 2),
    ('layer = "mamba"\nselective = false\n', "after_step=10:KILL", 1),
], ids=["mamba", "mamba-lti"])
def test_mamba_resume_after_sigkill_is_bitwise_identical(tmp_path, model_keys, fault, threads):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a = mamba_config(a, model_keys, steps=25, threads=threads)
    cfg_b = mamba_config(b, model_keys, steps=25, threads=threads)
    run_cli("run", cfg_a, check=True)
    p = run_cli("run", cfg_b, env_extra={"RTRAINER_FAULT": fault})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert read_metrics(b / "run" / "metrics.jsonl")[-1]["step"] < 25
    p = run_cli("run", cfg_b, "--resume", "auto", check=True)
    assert "resuming at step" in p.stderr
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    rb = strip_timing(read_metrics(b / "run" / "metrics.jsonl"))
    assert ra == rb
    ta = checkpoint_tensors(latest_checkpoint(a / "run"))
    tb = checkpoint_tensors(latest_checkpoint(b / "run"))
    assert ta.keys() == tb.keys()
    assert ("param/layers.0.B_lti" in ta) == ("selective = false" in model_keys)
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k


def test_resume_refuses_another_layer_kind(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    run_cli("run", cfg, check=True)
    p = run_cli("run", cfg, "--resume", "auto", "--set", 'model.layer="mamba"', "--set", "train.steps=8")
    assert p.returncode == 2 and "model.layer" in p.stderr, p.stderr


def test_lite_non_selective_run(tmp_path):
    cfg = mamba_config(tmp_path, 'selective = false\n', steps=20)
    run_cli("run", cfg, check=True)
    out = tmp_path / "run"
    resolved = tomllib.loads((out / "config.toml").read_text())["model"]
    assert resolved["layer"] == "mamba-lite" and resolved["selective"] is False
    ckpt = checkpoint_tensors(latest_checkpoint(out))
    assert ckpt["param/layers.0.B_lti"].shape == (4,) and "param/layers.0.x_proj_w" not in ckpt
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
