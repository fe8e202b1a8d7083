"""End to end through the real CLI, in subprocesses, on real files: training, metrics, resume
after real signals, and the errors a user meets."""
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, checkpoint_tensors, latest_checkpoint, read_metrics, run_cli, strip_timing, tiny_config

TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "clipped", "skipped", "tokens_per_s", "elapsed_s", "rss_mb"}
VAL_KEYS = {"step", "val_loss", "val_acc", "best_val_loss"}


def test_cli_trains_writes_outputs_and_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, steps=60)
    p = run_cli("run", cfg, check=True)
    out = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "run_state.json", "summary.json",
                 "checkpoints/step-00000060/model.safetensors", "checkpoints/step-00000060/MANIFEST.json"):
        assert (out / name).exists(), name
    # keep_last 3: steps 40, 50, 60 remain; 10, 20, 30 were retired (best is the newest here)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best.json", "step-00000040", "step-00000050", "step-00000060"]
    recs = read_metrics(out / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert [r["step"] for r in val] == [10, 20, 30, 40, 50, 60]
    for r in train:
        assert TRAIN_KEYS <= set(r), set(r)
    for r in val:
        assert VAL_KEYS <= set(r), set(r)
    first = np.mean([r["loss"] for r in train[:5]])
    last = np.mean([r["loss"] for r in train[-5:]])
    assert last < 0.9 * first, (first, last)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["best_val_loss"] == min(r["val_loss"] for r in val)
    assert "step     60/60" in p.stdout


def _straight_and_interrupted(tmp_path, fault, expect_code, threads=1):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a = tiny_config(a, steps=25, threads=threads)
    cfg_b = tiny_config(b, steps=25, threads=threads)
    run_cli("run", cfg_a, check=True)
    p = run_cli("run", cfg_b, env_extra={"RTRAINER_FAULT": fault})
    assert p.returncode == expect_code, (p.returncode, p.stderr)
    partial = read_metrics(b / "run" / "metrics.jsonl")
    assert partial[-1]["step"] < 25
    p = run_cli("run", cfg_b, "--resume", "auto", check=True)
    assert "resuming at step" in p.stderr
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    rb = strip_timing(read_metrics(b / "run" / "metrics.jsonl"))
    assert ra == rb  # every loss, lr, grad_norm, val_loss: bitwise, and no step appears twice
    ta = checkpoint_tensors(latest_checkpoint(a / "run"))
    tb = checkpoint_tensors(latest_checkpoint(b / "run"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    # killed right after the checkpoint of step 10, with lines of step 10 already in metrics
    _straight_and_interrupted(tmp_path, "after_step=10:KILL", -signal.SIGKILL)


def test_resume_after_sigkill_between_checkpoints(tmp_path):
    # killed at step 13: steps 11-13 are in metrics.jsonl but not in the checkpoint; resume cuts them
    _straight_and_interrupted(tmp_path, "after_step=13:KILL", -signal.SIGKILL, threads=2)


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    _straight_and_interrupted(tmp_path, "after_step=7:TERM", 143)


def test_unknown_key_exit_2_nothing_written(tmp_path):
    cfg = tiny_config(tmp_path, extra="[train2]\nfoo = 1\n")
    p = run_cli("run", cfg)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("rtrainer: error:")
    assert "train2" in p.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_known_section(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("d_state = 4", "d_stat = 4"))
    p = run_cli("run", cfg)
    assert p.returncode == 2 and "model.d_stat" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_wrong_type_exit_2(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("d_model = 16", 'd_model = "16"'))
    p = run_cli("run", cfg)
    assert p.returncode == 2 and "model.d_model" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_missing_config_file_exit_2(tmp_path):
    p = run_cli("run", tmp_path / "nope.toml")
    assert p.returncode == 2 and "nope.toml" in p.stderr


def test_set_override_and_bad_override(tmp_path):
    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--set", "train.steps=4", "--set", "log.log_every=2", check=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [2, 4]
    resolved = (tmp_path / "run" / "config.toml").read_text()
    assert "steps = 4" in resolved and "vocab_size = 128" in resolved
    p = run_cli("run", cfg, "--set", "train.nope=1")
    assert p.returncode == 2 and "train.nope" in p.stderr


def test_out_of_range_token_names_file_and_offset(tmp_path):
    data = tmp_path / "tok.txt"
    toks = np.arange(400) % 50
    toks[123] = 999
    data.write_text(" ".join(map(str, toks)))
    cfg = tiny_config(tmp_path, train=data, data_format="txt")
    cfg.write_text(cfg.read_text().replace("vocab_size = 128", "vocab_size = 60"))
    p = run_cli("run", cfg)
    assert p.returncode == 3, p.stderr
    assert "tok.txt" in p.stderr and "123" in p.stderr and "999" in p.stderr
    assert not (tmp_path / "run").exists()


def test_uint16_bin_data_trains(tmp_path):
    data = tmp_path / "tok.bin"
    (np.arange(5000) % 37).astype("<u2").tofile(data)   # a learnable periodic sequence
    cfg = tiny_config(tmp_path, train=data, data_format="auto", steps=40)
    cfg.write_text(cfg.read_text().replace("vocab_size = 128", "vocab_size = 0"))
    run_cli("run", cfg, check=True)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r for r in recs if r["kind"] == "val"]
    assert val[-1]["val_acc"] > val[0]["val_acc"]
    assert "vocab_size = 37" in (tmp_path / "run" / "config.toml").read_text()


def test_existing_run_is_not_overwritten_without_asking(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    ck = tmp_path / "run" / "checkpoints" / "step-00000010" / "model.safetensors"
    before = ck.read_bytes()
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    p = run_cli("run", cfg, "--set", "run.seed=8")
    assert p.returncode == 2 and "--resume auto" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert ck.read_bytes() == before and (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics_before
    run_cli("run", cfg, "--set", "run.seed=8", "--overwrite", check=True)
    assert ck.read_bytes() != before


def test_resume_from_another_run_directory_starts_fresh_metrics(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    ck = latest_checkpoint(tmp_path / "run")
    run_cli("run", cfg, "--resume", ck, "--set", f'run.out_dir="{tmp_path / "b"}"', "--set", "train.steps=15",
            check=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [11, 12, 13, 14, 15]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) > 0  # the source run is untouched


def test_second_run_on_the_same_directory_exits_6_and_a_killed_holder_leaves_no_lock(tmp_path):
    import subprocess
    import time

    cfg = tiny_config(tmp_path, steps=100000)
    holder = subprocess.Popen([sys.executable, "-m", "rtrainer", "run", str(cfg), "--headless"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read()
            time.sleep(0.05)
        p = run_cli("run", cfg, "--resume", "auto")
        assert p.returncode == 6, p.stderr
        assert f"pid {holder.pid}" in p.stderr and "rtrainer: error:" in p.stderr
        assert holder.poll() is None  # the holder is untouched
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed holder: the kernel dropped its lock, a resumed run can go on
    p = run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=12", "--headless")
    assert p.returncode == 0, p.stderr


def test_fail_on_non_finite_exits_4_with_a_diagnostic_checkpoint(tmp_path):
    import orjson

    cfg = tiny_config(tmp_path, steps=30, extra="")
    p = run_cli("run", cfg, "--set", "train.fail_on_non_finite=true",
                env_extra={"RTRAINER_FAULT": "nan_param_after_step=5:layers.0.D_skip"})
    assert p.returncode == 4, p.stderr
    assert "step 6: non-finite loss" in p.stderr and "non-finite-step-6.safetensors" in p.stderr
    diag = checkpoint_tensors((tmp_path / "run" / "checkpoints" / "non-finite-step-6.safetensors"))
    assert np.isnan(diag["param/layers.0.D_skip"]).all() and "grad/layers.0.x_proj_w" in diag
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "non_finite" and summary["final_step"] == 5


def test_non_finite_steps_are_skipped_then_the_run_aborts(tmp_path):
    cfg = tiny_config(tmp_path, steps=30)
    p = run_cli("run", cfg, "--set", "train.max_consecutive_skips=3",
                env_extra={"RTRAINER_FAULT": "nan_param_after_step=5:layers.1.out_proj_w"})
    assert p.returncode == 4 and "4 consecutive steps up to step 9" in p.stderr, p.stderr
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert all(r["loss"] is None for r in train[5:])          # NaN is written as null
    assert all(isinstance(r["loss"], float) for r in train[:5])


def test_early_stopping_and_best_checkpoint(tmp_path):
    import orjson

    cfg = tiny_config(tmp_path, steps=60)
    # min_delta 10: only the first evaluation (from +inf) counts as an improvement
    p = run_cli("run", cfg, "--set", "eval.val_every=5", "--set", "eval.patience=2", "--set", "eval.min_delta=10.0",
                check=True)
    assert "early stopping at step 15" in p.stderr, p.stderr
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "early_stopping" and summary["final_step"] == 15
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [5, 10, 15]
    assert all(r["best_val_loss"] == val[0]["val_loss"] for r in val)
    best_dir = Path(summary["paths"]["best"])
    assert best_dir.name == "step-00000005" and Path(summary["paths"]["latest"]).name == "step-00000015"
    best = checkpoint_tensors(best_dir)
    latest = checkpoint_tensors(summary["paths"]["latest"])
    assert not np.array_equal(best["param/embedding"], latest["param/embedding"])  # step 5 vs step 15
    # retention (keep_last 3) never removed the best checkpoint
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == [
        "step-00000005", "step-00000010", "step-00000015"]
    # without min_delta the loss keeps improving and the run completes
    p = run_cli("run", cfg, "--overwrite", "--set", "eval.val_every=5", "--set", "eval.patience=2", check=True)
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "completed" and summary["final_step"] == 60


def test_resume_refuses_a_different_model(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    p = run_cli("run", cfg, "--resume", "auto", "--set", "model.d_model=32", "--set", "train.steps=20")
    assert p.returncode == 2 and "model.d_model" in p.stderr, p.stderr


def test_corrupt_checkpoint_is_a_named_error(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    ck = latest_checkpoint(tmp_path / "run")
    f = ck / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    p = run_cli("run", cfg, "--resume", str(ck), "--set", "train.steps=20")
    assert p.returncode == 3 and "step-00000010" in p.stderr and "checksum mismatch" in p.stderr, p.stderr


def test_softmax_head_example_subclass(tmp_path):
    import subprocess

    cfg = tiny_config(tmp_path, steps=40)
    p = subprocess.run([sys.executable, str(REPO / "examples" / "softmax_head.py"), str(cfg)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    # cross-entropy starts near ln(128) ~ 4.85 and must fall clearly below it
    assert train[0]["loss"] > 4.0 and val[-1]["val_loss"] < 3.6, (train[0]["loss"], val[-1])
    ck = checkpoint_tensors(latest_checkpoint(tmp_path / "run"))
    assert "param/head.W" in ck and "param/head.prototypes" not in ck


def test_help_and_info():
    p = run_cli("--help", check=True)
    assert "run" in p.stdout and "exit codes" in p.stdout
    p = run_cli("run", "--help", check=True)
    assert "--resume" in p.stdout and "--set" in p.stdout
    p = run_cli("info", check=True)
    assert "openmp:" in p.stdout
    p = run_cli("keys", check=True)
    assert "model.d_model" in p.stdout and "optim.lr" in p.stdout
    p = run_cli()
    assert p.returncode == 2


def test_stop_at_pauses_with_a_checkpoint_and_resume_continues(tmp_path):
    import orjson

    cfg = tiny_config(tmp_path, steps=20)
    p = run_cli("run", cfg, "--stop-at", "7", check=True)
    assert "paused after step 7" in p.stderr
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "paused" and summary["final_step"] == 7
    assert latest_checkpoint(tmp_path / "run").name == "step-00000007"
    # a closing validation at the pause, after the checkpoint, reported in the summary
    closing = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert closing["kind"] == "val" and closing["step"] == 7 and closing["closing"] is True
    assert summary["last_val"]["step"] == 7 and summary["last_val"]["val_loss"] == closing["val_loss"]
    run_cli("run", cfg, "--resume", "auto", check=True)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 21))
    assert [r["step"] for r in recs if r["kind"] == "val"] == [10, 20]   # the closing line was cut on resume


@pytest.mark.parametrize("fault", ["nan_loss_at_step=6", "nan_grad_at_step=6:layers.0.conv_w"])
def test_transient_non_finite_loss_or_gradient_is_skipped_and_counted(tmp_path, fault):
    cfg = tiny_config(tmp_path, steps=12)
    run_cli("run", cfg, check=True, env_extra={"RTRAINER_FAULT": fault})
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [0] * 5 + [1] * 7
    if fault.startswith("nan_loss"):
        assert train[5]["loss"] is None and isinstance(train[5]["grad_norm"], float)
    else:
        assert train[5]["grad_norm"] is None and isinstance(train[5]["loss"], float)
    assert all(isinstance(r["loss"], float) for r in train[6:])   # training went on
    # the skipped step changed nothing: parameters and moments after step 6 (skipped) are bitwise
    # those after step 5
    for name, stop, env in (("a", 6, {"RTRAINER_FAULT": fault}), ("b", 5, {})):
        run_cli("run", cfg, "--set", f'run.out_dir="{tmp_path / name}"', "--stop-at", stop, env_extra=env, check=True)
    ta, tb = checkpoint_tensors(latest_checkpoint(tmp_path / "a")), checkpoint_tensors(latest_checkpoint(tmp_path / "b"))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    p = run_cli("run", cfg, "--overwrite", "--set", "train.fail_on_non_finite=true", env_extra={"RTRAINER_FAULT": fault})
    assert p.returncode == 4 and "step 6: non-finite" in p.stderr, p.stderr


def test_checkpoint_without_a_later_added_model_key_resumes_at_its_default(tmp_path):
    from rtrainer import checkpoint as ckpt

    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    path = latest_checkpoint(tmp_path / "run")
    tensors, state = ckpt.load_checkpoint(path)
    del state["config"]["model"]["selective"]        # as written before the key existed
    ckpt.write_step_checkpoint(path.parent, 10, tensors, state)
    p = run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=12", check=True)
    assert "resuming at step 10" in p.stderr
    p = run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=14", "--set", "model.selective=false")
    assert p.returncode == 2 and "model.selective is True in the checkpoint but False" in p.stderr, p.stderr
