"""The crash suite (docs/checkpoints.md, "Crash safety"): real training processes killed with real
SIGKILLs at random steps, at random moments and at every named point inside the checkpoint commit;
fabricated crash states and damaged artefacts; a full disk. After each, `--resume auto` must either
finish the run bitwise equal to an uninterrupted one or stop with a named error, and no valid
checkpoint may ever be deleted.

Every case is a tiny model (2 layers, width 16) trained for 25 steps, so the whole suite takes well
under two minutes. The last test shows the suite can fail: with the commit protocol replaced by a
plain in-place write, the crash tests' invariant breaks.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, checkpoint_tensors, latest_checkpoint, read_metrics, run_cli, step_dirs, strip_timing, \
    tiny_config
from rtrainer import checkpoint as ckpt
from rtrainer import faults
from rtrainer.errors import CheckpointError

STEPS = 25
# save every 5 steps and keep only the newest 2 (+ best): retention runs at nearly every save
EXTRA_SETS = ("--set", "checkpoint.save_every=5", "--set", "checkpoint.keep_last=2", "--set", "eval.val_every=5")


def _config(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return tiny_config(d, steps=STEPS), d / "run"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every crashed-and-resumed run is compared with."""
    cfg, run = _config(tmp_path_factory.mktemp("straight"), "a")
    run_cli("run", cfg, *EXTRA_SETS, check=True)
    return run


def _assert_every_step_dir_is_valid(run):
    """The commit invariant: a directory named step-N is complete (its manifest verifies)."""
    for d in step_dirs(run):
        ckpt.verify_step_dir(d)


def _assert_same_as(run, reference):
    ra = strip_timing(read_metrics(reference / "metrics.jsonl"))
    rb = strip_timing(read_metrics(run / "metrics.jsonl"))
    assert ra == rb   # every loss, lr, grad_norm, val_loss bitwise; no step twice, none missing
    ta = checkpoint_tensors(latest_checkpoint(reference))
    tb = checkpoint_tensors(latest_checkpoint(run))
    assert ta.keys() == tb.keys()
    for k in ta:       # parameters and both AdamW moments
        assert np.array_equal(ta[k], tb[k]), k
    assert latest_checkpoint(run).name == f"step-{STEPS:08d}"


def _resume_to_end(cfg, run, max_attempts=1):
    for _ in range(max_attempts):
        p = run_cli("run", cfg, *EXTRA_SETS, "--resume", "auto")
        if p.returncode == 0:
            return p
    raise AssertionError(p.stderr)


@pytest.mark.parametrize("point", faults.POINTS)
def test_kill_at_each_named_point_of_the_checkpoint_commit(tmp_path, straight, point):
    cfg, run = _config(tmp_path, "b")
    # the 3rd time the point is reached (a commit at step 15, or the 3rd retention), with older checkpoints on disk
    p = run_cli("run", cfg, *EXTRA_SETS, env_extra={"RTRAINER_FAULT": f"kill_at={point}:3"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    _assert_every_step_dir_is_valid(run)
    p = _resume_to_end(cfg, run)
    assert "resuming at step" in p.stderr
    if point in ("ckpt.after_tensors", "ckpt.before_manifest", "ckpt.after_manifest", "ckpt.before_rename"):
        assert "removed 1 leftover temporary checkpoint" in p.stderr, p.stderr   # the .tmp-step-* dir
    if point == "ckpt.mid_retention":
        assert "removed 1 leftover temporary checkpoint" in p.stderr and ".trash-step-" in p.stderr, p.stderr
    _assert_same_as(run, straight)
    assert not [q for q in (run / "checkpoints").iterdir() if q.name.startswith((".tmp-", ".trash-"))]


def test_sigkill_at_ten_random_steps(tmp_path, straight):
    """One run killed at 10 random steps in turn, resumed each time; at the end it equals the straight run."""
    cfg, run = _config(tmp_path, "b")
    kills = sorted(random.Random(1234).sample(range(1, STEPS), 10))
    p = run_cli("run", cfg, *EXTRA_SETS, env_extra={"RTRAINER_FAULT": f"after_step={kills[0]}:KILL"})
    assert p.returncode == -signal.SIGKILL
    for k in kills[1:]:
        p = run_cli("run", cfg, *EXTRA_SETS, "--resume", "auto", env_extra={"RTRAINER_FAULT": f"after_step={k}:KILL"})
        if p.returncode == 0:   # k lies before the resume point: nothing to kill, the run finished
            break
        assert p.returncode == -signal.SIGKILL, p.stderr
        _assert_every_step_dir_is_valid(run)
    _resume_to_end(cfg, run)
    _assert_same_as(run, straight)


def test_sigkill_from_the_parent_at_random_moments(tmp_path):
    """Kills sent by this process at random wall-clock moments (mid-step, mid-write, mid-start-up),
    on a longer run (3,000 steps, about 6 s) so that the moments land everywhere."""
    long = ("--set", "train.steps=3000", "--set", "log.log_every=10", "--set", "eval.val_every=50",
            "--set", "checkpoint.save_every=5", "--set", "checkpoint.keep_last=2")
    cfg_a, run_a = _config(tmp_path, "a")
    run_cli("run", cfg_a, *long, check=True)
    cfg, run = _config(tmp_path, "b")
    rng = random.Random(99)
    cmd = [sys.executable, "-m", "rtrainer", "run", str(cfg), *long, "--headless"]
    kills = 0
    for attempt in range(7):    # 6 attempts killed at a random moment (unless finished), the last one finishes
        proc = subprocess.Popen(cmd + (["--resume", "auto"] if attempt else []), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 6:
            time.sleep(rng.uniform(0.1, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait()
        err = proc.stderr.read().decode()
        assert proc.returncode in (0, -signal.SIGKILL), err
        _assert_every_step_dir_is_valid(run)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and kills >= 3, kills
    ra = strip_timing(read_metrics(run_a / "metrics.jsonl"))
    assert ra == strip_timing(read_metrics(run / "metrics.jsonl"))
    ta, tb = checkpoint_tensors(latest_checkpoint(run_a)), checkpoint_tensors(latest_checkpoint(run))
    assert all(np.array_equal(ta[k], tb[k]) for k in ta) and ta.keys() == tb.keys()


# ------------------------------------------------------------------ fabricated crash states

def _crashed_run(tmp_path):
    """A run killed right after step 17: checkpoints 10 and 15 on disk (+ best), metrics up to 17."""
    cfg, run = _config(tmp_path, "b")
    p = run_cli("run", cfg, *EXTRA_SETS, env_extra={"RTRAINER_FAULT": "after_step=17:KILL"})
    assert p.returncode == -signal.SIGKILL
    assert [d.name for d in step_dirs(run)] == ["step-00000010", "step-00000015"]
    return cfg, run


def _flip(path, where=-20):
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0x55
    path.write_bytes(bytes(raw))


DAMAGE = {
    # name: (what to do to the newest checkpoint step-15, text the warning must contain)
    "tensor file deleted": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "tensor file truncated": (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors is 1000 bytes"),
    "tensor file bit-flipped": (lambda d: _flip(d / "model.safetensors"), "model.safetensors checksum mismatch"),
    "tensor file replaced": (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 100),
                             "model.safetensors is 700 bytes"),
    "manifest deleted": (lambda d: (d / "MANIFEST.json").unlink(), "MANIFEST.json is missing"),
    "manifest truncated": (lambda d: os.truncate(d / "MANIFEST.json", 30), "MANIFEST.json is unreadable"),
    "manifest bit-flipped": (lambda d: _flip(d / "MANIFEST.json", 40), "MANIFEST.json"),
    "manifest replaced": (lambda d: (d / "MANIFEST.json").write_text("{}"), "not an rtrainer manifest"),
    "manifest and tensors consistently rewritten": (
        lambda d: ((d / "model.safetensors").write_bytes(b"x" * 10),
                   (d / "MANIFEST.json").write_text((d / "MANIFEST.json").read_text().replace('"size": ', '"size": 1'))),
        "MANIFEST.json checksum mismatch"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, case):
    cfg, run = _crashed_run(tmp_path)
    damage, message = DAMAGE[case]
    damage(run / "checkpoints" / "step-00000015")
    p = _resume_to_end(cfg, run)
    assert "rtrainer: warning: skipping" in p.stderr and "step-00000015" in p.stderr and message in p.stderr, p.stderr
    assert "resuming at step 10" in p.stderr
    # the damaged directory is set aside for inspection, not deleted, and never resumed again
    assert [q.name.startswith("superseded-step-00000015") for q in (run / "checkpoints").iterdir()].count(True) == 1
    _assert_same_as(run, straight)


def test_every_checkpoint_damaged_is_a_named_error_and_nothing_is_deleted(tmp_path):
    cfg, run = _crashed_run(tmp_path)
    for d in step_dirs(run):
        _flip(d / "model.safetensors")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics_before = (run / "metrics.jsonl").read_bytes()
    p = run_cli("run", cfg, *EXTRA_SETS, "--resume", "auto")
    assert p.returncode == 3, p.stderr
    assert "rtrainer: error: no valid checkpoint in" in p.stderr and "step-00000010" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "metrics.jsonl").read_bytes() == metrics_before


def test_leftover_temp_and_trash_directories_are_swept(tmp_path, straight):
    cfg, run = _crashed_run(tmp_path)
    tmp = run / "checkpoints" / ".tmp-step-00000020-deadbeef"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half a file")
    trash = run / "checkpoints" / ".trash-step-00000005-cafe0000"
    shutil.copytree(run / "checkpoints" / "step-00000010", trash)
    p = _resume_to_end(cfg, run)
    assert "removed 2 leftover temporary checkpoint file(s)" in p.stderr and "resuming at step 15" in p.stderr
    _assert_same_as(run, straight)


def test_stale_or_broken_run_state_is_only_a_hint(tmp_path, straight):
    cfg, run = _crashed_run(tmp_path)
    (run / "run_state.json").write_text('{"step": 10, "checkpoint": "nowhere"')   # stale and truncated
    p = _resume_to_end(cfg, run)
    assert "resuming at step 15" in p.stderr
    _assert_same_as(run, straight)


def test_half_a_metrics_line_is_cut_back(tmp_path, straight):
    cfg, run = _crashed_run(tmp_path)
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"kind": "train", "step": 18, "lo')
    _resume_to_end(cfg, run)
    _assert_same_as(run, straight)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_metrics_shorter_than_the_checkpoint_is_a_named_error(tmp_path, damage):
    cfg, run = _crashed_run(tmp_path)
    m = run / "metrics.jsonl"
    if damage == "deleted":
        m.unlink()
    else:
        os.truncate(m, 100)
    p = run_cli("run", cfg, *EXTRA_SETS, "--resume", "auto")
    assert p.returncode == 3 and "metrics.jsonl" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert [d.name for d in step_dirs(run)] == ["step-00000010", "step-00000015"]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "replaced"])
def test_damaged_training_data_is_a_named_error(tmp_path, damage):
    cfg, run = _crashed_run(tmp_path)
    data = run.parent / "corpus.txt"
    if damage == "deleted":
        data.unlink()
    elif damage == "truncated":
        os.truncate(data, 30_000)
    else:
        data.write_bytes(bytes(range(256)) * 300)   # ids up to 255 >= vocab_size 128
    p = run_cli("run", cfg, *EXTRA_SETS, "--resume", "auto")
    assert p.returncode == 3 and "corpus.txt" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert [d.name for d in step_dirs(run)] == ["step-00000010", "step-00000015"]


def test_explicit_older_checkpoint_sets_the_newer_timeline_aside(tmp_path, straight):
    cfg, run = _crashed_run(tmp_path)
    p = run_cli("run", cfg, *EXTRA_SETS, "--resume", run / "checkpoints" / "step-00000010", check=True)
    assert "resuming at step 10" in p.stderr and "step-00000015 is newer" in p.stderr
    assert len(list((run / "checkpoints").glob("superseded-step-00000015-*"))) == 1
    _assert_same_as(run, straight)


# ------------------------------------------------------------------ disk full

def test_disk_full_while_checkpointing_exits_5_and_a_resume_finishes(tmp_path, straight):
    cfg, run = _config(tmp_path, "b")
    p = run_cli("run", cfg, *EXTRA_SETS, env_extra={"RTRAINER_FAULT": "enospc_at=ckpt.after_tensors:3"})
    assert p.returncode == 5, p.stderr
    assert "rtrainer: error: cannot write checkpoint" in p.stderr and "No space left on device" in p.stderr, p.stderr
    assert "step-00000015" in p.stderr and "Traceback" not in p.stderr
    assert [d.name for d in step_dirs(run)] == ["step-00000005", "step-00000010"]
    _assert_every_step_dir_is_valid(run)
    assert not list((run / "checkpoints").glob(".tmp-*"))   # the failed write cleaned up after itself
    _resume_to_end(cfg, run)
    _assert_same_as(run, straight)


def _unshare_works():
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user+mount namespaces (unshare -rm)")
def test_real_full_tmpfs_exits_5_keeps_the_previous_checkpoint_and_resumes(tmp_path, straight):
    """A real ENOSPC: the run directory is a tmpfs too small for a second checkpoint."""
    cfg, run = _config(tmp_path, "b")
    run.mkdir()
    script = f"""
set -u
mount -t tmpfs -o size=128k tmpfs {run}
{sys.executable} -m rtrainer run {cfg} {' '.join(EXTRA_SETS)} --headless
echo "first-exit=$?"
ls {run}/checkpoints
mount -o remount,size=64m {run}
{sys.executable} -m rtrainer run {cfg} {' '.join(EXTRA_SETS)} --headless --resume auto
echo "second-exit=$?"
mkdir -p {tmp_path}/copy && cp -r {run}/. {tmp_path}/copy/
"""
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert "first-exit=5" in p.stdout and "No space left on device" in p.stderr, (p.stdout, p.stderr)
    assert "second-exit=0" in p.stdout, (p.stdout, p.stderr)
    copy = tmp_path / "copy"
    _assert_every_step_dir_is_valid(copy)
    _assert_same_as(copy, straight)


# ------------------------------------------------------------------ the suite can fail

UNSAFE_DRIVER = """
import json, os, sys
from rtrainer import checkpoint as ckpt, faults

def inplace_writer(ckpt_dir, step, tensors, state, extra=None):
    # what the commit protocol replaces: write straight into the final directory, manifest last,
    # no temporary name, no rename
    final = os.path.join(ckpt_dir, ckpt.step_dir_name(step))
    os.makedirs(final, exist_ok=True)
    ckpt.save_checkpoint(os.path.join(final, ckpt.TENSOR_FILE), tensors, state)
    faults.point("ckpt.after_tensors", final)
    size, digest = ckpt._file_digest(os.path.join(final, ckpt.TENSOR_FILE))
    m = {"format": ckpt.MANIFEST_FORMAT, "schema": 1, "step": step,
         "files": {ckpt.TENSOR_FILE: {"size": size, "sha256": digest}}}
    m["manifest_sha256"] = ckpt._manifest_hash(m)
    open(os.path.join(final, ckpt.MANIFEST_FILE), "w").write(json.dumps(m))
    return final

ckpt.write_step_checkpoint = inplace_writer
from rtrainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_crash_invariant_catches_an_in_place_writer(tmp_path):
    cfg, run = _config(tmp_path, "b")
    p = subprocess.run([sys.executable, "-c", UNSAFE_DRIVER, "run", str(cfg), *EXTRA_SETS],
                       env={**os.environ, "RTRAINER_FAULT": "kill_at=ckpt.after_tensors:3"},
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        _assert_every_step_dir_is_valid(run)
