"""Hardening, through the real CLI in subprocesses: runs that cannot fit are refused up front,
every size and flag is bounded, the console can never kill a run, misleading messages, and
outputs that cannot be written found at start-up."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from conftest import REPO, latest_checkpoint, read_metrics, run_cli, tiny_config


def _error_line(p):
    """The process failed with exactly one `rtrainer: error:` line and no traceback."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in lines if ln.startswith("rtrainer: error: ")]
    assert len(errors) == 1, p.stderr
    return errors[0]


def _popen(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "rtrainer", *map(str, args)], cwd=REPO, **kw)


# ============================================================================ 1. sizes that cannot fit
def test_a_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path)
    p = run_cli("run", cfg, "--set", "train.batch_size=1048576", "--set", "train.seq_len=4096", "--headless")
    assert p.returncode == 2, p.stderr
    line = _error_line(p)
    assert "does not fit in memory" in line and "train.batch_size = 1048576" in line and "train.seq_len = 4096" in line
    assert not (tmp_path / "run").exists()


def test_an_absurd_width_is_one_error_line_naming_the_keys(tmp_path):
    cfg = tiny_config(tmp_path)
    p = run_cli("run", cfg, "--set", "model.d_model=60000", "--set", "model.target_layers=1000", "--headless")
    assert p.returncode == 2, p.stderr
    line = _error_line(p)
    assert "model.d_model = 60000" in line and "model.target_layers = 1000" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key, limit", [
    ("model.d_model=1000000", "model.d_model", 65536),
    ("train.batch_size=100000000", "train.batch_size", 1 << 20),
    ("train.steps=10000000000000", "train.steps", 10**12),
    ("model.vocab_size=100000000", "model.vocab_size", 1 << 24),
    ("eval.extra_lengths=[64, 100000000]", "eval.extra_lengths[1]", 1 << 22),
])
def test_every_size_has_a_limit_named_in_the_message(tmp_path, override, key, limit):
    cfg = tiny_config(tmp_path)
    p = run_cli("run", cfg, "--set", override)
    assert p.returncode == 2
    assert f"{key} = " in _error_line(p) and f"limit of {limit}" in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_negative_seed_is_a_config_error(tmp_path):
    p = run_cli("run", tiny_config(tmp_path), "--set", "run.seed=-1")
    assert p.returncode == 2 and "run.seed must be >= 0" in _error_line(p)


def test_a_stray_huge_token_id_does_not_size_the_vocabulary(tmp_path):
    data = np.random.default_rng(0).integers(0, 100, size=20_000).astype("<u4")
    data[12_345] = 4_000_000_000
    path = tmp_path / "tokens.bin"
    data.tofile(path)
    cfg = tiny_config(tmp_path, train=path, data_format="u32")
    p = run_cli("run", cfg, "--set", "model.vocab_size=0", "--headless")
    assert p.returncode == 3, p.stderr
    line = _error_line(p)
    assert str(path) in line and "4000000000" in line and "offset 12345" in line and "model.vocab_size" in line
    assert not (tmp_path / "run").exists()


# ============================================================================ 2. flags that make no sense
@pytest.mark.parametrize("value", ["0", "-3"])
def test_stop_at_below_one_is_refused(tmp_path, value):
    p = run_cli("run", tiny_config(tmp_path), "--stop-at", value)
    assert p.returncode == 2 and "--stop-at" in _error_line(p)
    assert not (tmp_path / "run").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    p = run_cli("run", cfg, "--resume", "auto", "--overwrite")
    assert p.returncode == 2
    line = _error_line(p)
    assert "--resume" in line and "--overwrite" in line
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_parity_steps_below_two_is_refused(tmp_path):
    p = run_cli("parity", tiny_config(tmp_path), "--steps", "0")
    assert p.returncode == 2 and "--steps" in _error_line(p)


# ============================================================================ the plan
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, steps=40)
    p = run_cli("run", cfg, "--dry-run", check=True)
    assert not (tmp_path / "run").exists()
    for word in ("parameters", "memory", "activations", "adamw moments", "flops/step", "per epoch", "estimate",
                 "s/step"):
        assert word in p.stdout, (word, p.stdout)
    # the parameter count is the one the real run reports
    from rtrainer.config import load_config
    from rtrainer.plan import make_plan

    plan = make_plan(load_config(str(cfg)), 128)
    assert f"{plan['parameters']:,}" in p.stdout
    q = run_cli("run", cfg, "--headless", check=True)
    assert q.returncode == 0


def test_dry_run_refuses_what_does_not_fit(tmp_path):
    p = run_cli("run", tiny_config(tmp_path), "--dry-run", "--set", "train.batch_size=1048576",
                "--set", "train.seq_len=4096")
    assert p.returncode == 2 and "does not fit" in _error_line(p)
    assert not (tmp_path / "run").exists()


# ============================================================================ 4. the console
def test_a_closed_stdout_never_stops_training(tmp_path):
    """`rtrainer run x.toml | head -1`: the reader goes after one line; the run finishes every step."""
    cfg = tiny_config(tmp_path, steps=40)
    proc = _popen("run", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    assert first.startswith(b"step")
    proc.stdout.close()   # what head does after its line
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"error" not in err
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "completed" and summary["final_step"] == 40
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"] == \
        list(range(1, 41))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000040"


def test_closed_stderr_and_stdout_file_descriptors_never_stop_training(tmp_path):
    """Started with fd 1 and 2 closed (`>&- 2>&-`)."""
    cfg = tiny_config(tmp_path, steps=20)
    proc = _popen("run", cfg, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                  preexec_fn=lambda: (os.close(1), os.close(2)))
    assert proc.wait(timeout=600) == 0
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert summary["stop_reason"] == "completed" and summary["final_step"] == 20


def test_a_broken_stderr_pipe_never_stops_training(tmp_path):
    cfg = tiny_config(tmp_path, steps=20)
    proc = _popen("run", cfg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stderr.close()   # the first warning or start line meets a broken pipe
    assert proc.wait(timeout=600) == 0
    assert orjson.loads((tmp_path / "run" / "summary.json").read_bytes())["final_step"] == 20


@pytest.mark.parametrize("command", [["keys"], ["info"], ["run", "CFG", "--dry-run"]])
def test_printing_commands_exit_quietly_on_a_closed_pipe(tmp_path, command):
    """`rtrainer keys | head`: no traceback, exit 141 (as a command stopped by SIGPIPE)."""
    cfg = tiny_config(tmp_path)
    proc = _popen(*[str(cfg) if a == "CFG" else a for a in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # before the command writes anything: its first write fails
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 141, err.decode()
    assert err == b"", err.decode()


# ============================================================================ 5. misleading messages
def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    cfg = tiny_config(tmp_path)
    p = run_cli("run", cfg, "--set", f"run.out_dir='{f}'")
    assert p.returncode == 2 and "is a file, not a directory" in _error_line(p) and str(f) in p.stderr
    p = run_cli("run", cfg, "--set", f"run.out_dir='{f}/sub'")
    assert p.returncode == 2 and f"{f} is a file, not a directory" in _error_line(p)
    assert f.read_text() == "x"


def test_resume_on_a_different_data_file_says_so(tmp_path, corpus_bytes):
    cfg = tiny_config(tmp_path, steps=10, extra="")
    run_cli("run", cfg, "--set", "model.vocab_size=0", check=True)
    other = tmp_path / "other.txt"
    other.write_bytes(corpus_bytes[:30_000].upper())
    p = run_cli("run", cfg, "--set", "model.vocab_size=0", "--set", "train.steps=20", "--set",
                f"data.train='{other}'", "--resume", "auto")
    assert p.returncode == 2
    line = _error_line(p)
    assert "data.train" in line and str(other) in line and "not the data of the checkpoint" in line


def test_prepare_of_a_missing_directory_or_a_file(tmp_path):
    p = run_cli("prepare", tmp_path / "nope")
    assert p.returncode == 3 and "no such directory" in _error_line(p)
    f = tmp_path / "f.bin"
    f.write_bytes(b"\0\1")
    p = run_cli("prepare", f)
    assert p.returncode == 3 and "is a file, not a directory" in _error_line(p)


def test_prepare_names_the_changed_byte(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    np.random.default_rng(1).integers(0, 200, size=3_000_000, dtype="<u2").tofile(d / "a.bin")
    run_cli("prepare", d, check=True)
    with open(d / "a.bin", "r+b") as f:   # one flipped bit, in the second 4 MiB block
        f.seek(5_000_123)
        b = f.read(1)[0]
        f.seek(5_000_123)
        f.write(bytes([b ^ 0x04]))
    p = run_cli("prepare", d)
    assert p.returncode == 3
    assert "the byte at offset 5000123 changed" in _error_line(p)


# ============================================================================ 6. checked at start-up
@contextlib.contextmanager
def read_only(path):
    """Make a directory read-only for this user, root included (chattr +i), undone afterwards."""
    path = Path(path)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a directory read-only for root here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_checkpoint_directory_is_found_before_training(tmp_path):
    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--stop-at", "10", check=True)
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_bytes()
    summary = (run / "summary.json").read_bytes()
    with read_only(run / "checkpoints"):
        p = run_cli("run", cfg, "--resume", "auto", "--headless")
    assert p.returncode == 5, p.stderr
    line = _error_line(p)
    assert str(run / "checkpoints") in line and "not writable" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics      # no step was trained
    assert (run / "summary.json").read_bytes() == summary
    run_cli("run", cfg, "--resume", "auto", check=True)         # writable again: it continues


def test_a_run_directory_that_cannot_be_created(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    cfg = tiny_config(tmp_path)
    with read_only(parent):
        p = run_cli("run", cfg, "--set", f"run.out_dir='{parent}/run'")
    assert p.returncode == 5 and "cannot create run.out_dir" in _error_line(p)
    assert not (parent / "run").exists()


def test_a_second_quick_ctrl_c_exits_130(tmp_path):
    """However soon the second SIGINT follows the first, the status is 130, never a raw signal."""
    cfg = tiny_config(tmp_path, steps=100_000, extra="")
    codes = []
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        proc = _popen("run", cfg, "--headless", "--set", "checkpoint.save_every=0", "--set", "eval.val_every=0",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() or \
                (tmp_path / "run" / "metrics.jsonl").stat().st_size < 2000:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        codes.append(proc.returncode)
        assert b"Traceback" not in err, err.decode()
    assert codes == [130] * len(codes), codes


@pytest.mark.parametrize("edit", [
    lambda m, e: e.update(tokens=10**30), lambda m, e: e.update(header=-5), lambda m, e: e.update(dtype="zz"),
    lambda m, e: e.update(max_id="x"), lambda m, e: e.update(checksums=5), lambda m, e: e.update(bytes=None),
    lambda m, e: e.update(max_id=10**12), lambda m, e: m.update(shards=[5]), lambda m, e: e.update(dtype="<f4"),
])
def test_a_damaged_data_manifest_is_one_error_line(tmp_path, edit):
    import json

    d = tmp_path / "shards"
    d.mkdir()
    np.random.default_rng(0).integers(0, 120, size=30_000, dtype="<u2").tofile(d / "a.bin")
    run_cli("prepare", d, check=True)
    mpath = d / ".rtrainer" / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m, m["shards"][0])
    mpath.write_text(json.dumps(m))
    cfg = tiny_config(tmp_path, train=d, data_format="u16")
    p = run_cli("run", cfg, "--set", "model.vocab_size=0", "--headless")
    assert p.returncode == 3, p.stderr
    assert str(mpath) in _error_line(p) and "rebuild" in p.stderr


def test_summary_never_says_completed_when_the_last_checkpoint_failed(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    run_cli("run", cfg, check=True)
    summary = tmp_path / "run" / "summary.json"
    assert orjson.loads(summary.read_bytes())["stop_reason"] == "completed"
    # continued to 20 steps; the disk is full when the final checkpoint is committed
    p = run_cli("run", cfg, "--set", "train.steps=20", "--resume", "auto", "--headless",
                env_extra={"RTRAINER_FAULT": "enospc_at=ckpt.before_manifest:1"})
    assert p.returncode == 5, p.stderr
    assert "cannot write checkpoint" in _error_line(p)
    s = orjson.loads(summary.read_bytes())
    assert s["stop_reason"] == "io_error" and "cannot write checkpoint" in s["error"] and s["final_step"] == 20
    assert latest_checkpoint(tmp_path / "run").name == "step-00000010"


@pytest.mark.parametrize("layer, selective", [("mamba-lite", True), ("mamba-lite", False), ("mamba", True),
                                              ("mamba", False)])
def test_the_plan_counts_what_the_run_allocates(tmp_path, layer, selective):
    """The plan's parameter count is the flat buffer's size, its activation bytes what the stack's
    workspace holds after a forward pass (computed before either is allocated)."""
    from rtrainer import plan as plan_mod
    from rtrainer.config import load_config
    from rtrainer.params import FlatParams
    from rtrainer.trainer import Trainer

    sets = [f"model.layer='{layer}'", f"model.selective={str(selective).lower()}", "model.d_state=5",
            "train.seq_len=20"]
    cfg = load_config(str(tiny_config(tmp_path)), sets)
    tr = Trainer(cfg, console=False)
    V = 128
    model, head = tr.build_model(V), tr.build_head(V)
    plan = plan_mod.make_plan(cfg, V)
    flat = FlatParams(model.param_specs() + head.param_specs())
    assert plan["parameters"] == flat.size
    assert plan["memory"]["parameters"] == flat.data.nbytes and plan["memory"]["adamw_moments"] == 2 * flat.m.nbytes
    model.bind(flat.params, flat.grads)
    model.init_params(1, "mamba")
    B, T = cfg.train.batch_size, cfg.train.seq_len
    model.forward(np.zeros((B, T), np.int64))
    assert plan_mod.activation_bytes(cfg.model, B, T) == model.activation_bytes()


def test_the_refusal_names_the_largest_items_and_their_keys(tmp_path):
    from rtrainer import plan as plan_mod
    from rtrainer.config import load_config
    from rtrainer.errors import ConfigError

    cfg = load_config(str(tiny_config(tmp_path)), ["train.batch_size=512", "train.seq_len=2048"])
    plan = plan_mod.make_plan(cfg, 128)
    plan_mod.require_fits(plan, cfg, available=plan_mod._need(plan["memory"]["total"]))   # just fits
    with pytest.raises(ConfigError, match=r"activations .*train\.batch_size = 512, train\.seq_len = 2048"):
        plan_mod.require_fits(plan, cfg, available=plan_mod._need(plan["memory"]["total"]) - 1)


# ============================================================================ 3. events are never lost
def _events(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "event"]


def test_a_skipped_damaged_checkpoint_is_reported_even_headless(tmp_path):
    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--stop-at", "20", check=True)
    run = tmp_path / "run"
    newest = latest_checkpoint(run)
    (newest / "model.safetensors").write_bytes(b"garbage")        # step 20 is damaged
    (run / "checkpoints" / ".tmp-step-00000021-dead").mkdir()       # what a killed writer leaves
    p = run_cli("run", cfg, "--resume", "auto", "--headless")
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and str(newest) in p.stderr and ".tmp-step-00000021-dead" in p.stderr
    assert "step " not in p.stdout                                 # progress stays silent
    summary = orjson.loads((run / "summary.json").read_bytes())
    names = [e["event"] for e in summary["events"]]
    assert "leftovers_removed" in names and "checkpoint_skipped" in names and "checkpoint_set_aside" in names
    ev = {e["event"]: e for e in _events(run)}
    assert ev["checkpoint_skipped"]["path"] == str(newest) and ev["checkpoint_skipped"]["step"] == 10
    for e in ev.values():
        assert {"kind", "step", "event", "message"} <= set(e)


def test_changed_settings_on_resume_are_applied_with_a_warning(tmp_path):
    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--stop-at", "10", check=True)
    p = run_cli("run", cfg, "--resume", "auto", "--headless", "--set", "train.steps=60", "--set", "optim.lr=0.02",
                "--set", "run.seed=8", "--set", "log.log_every=5")
    assert p.returncode == 0, p.stderr
    for text in ("train.steps changed: 30 -> 60", "optim.lr changed: 0.01 -> 0.02", "run.seed changed: 7 -> 8",
                 "log.log_every changed: 1 -> 5"):
        assert text in p.stderr, p.stderr
    run = tmp_path / "run"
    changed = {e["key"]: (e["old"], e["new"]) for e in _events(run) if e["event"] == "setting_changed"}
    assert changed["train.steps"] == (30, 60) and changed["optim.lr"] == (0.01, 0.02)
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert train[-1]["step"] == 60 and [r["step"] for r in train if r["step"] > 10][:2] == [15, 20]
    from rtrainer.optim import lr_at

    first = next(r for r in train if r["step"] == 15)
    assert first["lr"] == pytest.approx(lr_at(14, 0.02, 3, 60, 0.1))   # the schedule of the new settings


def test_surprising_settings_are_warned_about_headless(tmp_path):
    cfg = tiny_config(tmp_path, steps=10, threads=os.cpu_count() + 2)
    p = run_cli("run", cfg, "--headless", "--set", "schedule.warmup_steps=50")
    assert p.returncode == 0, p.stderr
    assert "schedule.warmup_steps = 50 is not shorter than train.steps = 10" in p.stderr
    assert "threads on" in p.stderr
    names = {e["event"] for e in orjson.loads((tmp_path / "run" / "summary.json").read_bytes())["events"]}
    assert {"warmup_longer_than_run", "threads_exceed_cores"} <= names


@pytest.mark.parametrize("damage", ["flip", "garbage"])
def test_a_damaged_metrics_log_is_set_aside_on_resume(tmp_path, damage):
    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--stop-at", "20", check=True)
    run = tmp_path / "run"
    m = run / "metrics.jsonl"
    b = bytearray(m.read_bytes())
    if damage == "flip":
        i = b.index(b'"loss":') + 8
        b[i] ^= 0x01                      # one digit of a loss: still valid JSON
    else:
        b[100:140] = b"\x00" * 40
    m.write_bytes(bytes(b))
    p = run_cli("run", cfg, "--resume", "auto", "--headless")
    assert p.returncode == 0, p.stderr
    assert "metrics" in p.stderr and "damaged" in p.stderr
    moved = list(run.glob("metrics.jsonl.damaged-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == bytes(b)       # kept as it was
    recs = read_metrics(m)
    assert recs[0]["kind"] == "event"    # the new log starts with the events of the start-up
    ev = next(r for r in recs if r["kind"] == "event" and r["event"] == "metrics_set_aside")
    assert ev["moved_to"] == str(moved[0]) and ev["step"] == 20
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(21, 31))
    s = orjson.loads((run / "summary.json").read_bytes())
    assert "metrics_set_aside" in [e["event"] for e in s["events"]]


def test_an_intact_metrics_log_resumes_and_an_old_checkpoint_without_checksum_too(tmp_path):
    from rtrainer import checkpoint as ckpt

    cfg = tiny_config(tmp_path, steps=30)
    run_cli("run", cfg, "--stop-at", "20", check=True)
    run = tmp_path / "run"
    path = latest_checkpoint(run)
    tensors, state = ckpt.load_checkpoint(path)
    assert "metrics_sha256" in state
    del state["metrics_sha256"]                         # as written before the checksum existed
    ckpt.write_step_checkpoint(path.parent, 20, tensors, state)
    p = run_cli("run", cfg, "--resume", "auto", "--headless")
    assert p.returncode == 0 and "damaged" not in p.stderr, p.stderr
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 31))
    assert not list(run.glob("metrics.jsonl.damaged-*"))


def test_resume_auto_with_nothing_to_resume_is_a_warning_headless(tmp_path):
    cfg = tiny_config(tmp_path, steps=5)
    p = run_cli("run", cfg, "--resume", "auto", "--headless")
    assert p.returncode == 0 and "rtrainer: warning: --resume auto: no checkpoint yet" in p.stderr, p.stderr
    s = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert [e["event"] for e in s["events"]] == ["resume_found_nothing"] and s["events"][0]["step"] == 0
    assert _events(tmp_path / "run")[0]["event"] == "resume_found_nothing"
