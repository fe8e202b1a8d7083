"""Which process group this process belongs to, read from the launcher's environment variables
(no MPI call, nothing imported): known before the run file is checked, so `config.py` can refuse a
global batch that does not split over the processes. `rtrainer.distributed` builds on it."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Launcher", "detect_launcher", "world_size"]


@dataclass(frozen=True)
class Launcher:
    """What the environment says about the process group this process belongs to."""

    name: str          # "none", "openmpi", "pmi" (MPICH / Intel MPI hydra), "pmix", "slurm"
    size: int          # processes in the job (world size)
    rank: int          # this process's rank
    local_size: int    # processes of the job on this machine (1 if unknown)
    local_rank: int


def _int_env(env, *names: str) -> int | None:
    for n in names:
        v = str(env.get(n, "")).strip()
        if v.isdigit():
            return int(v)
    return None


def detect_launcher(env=None) -> Launcher:
    """The launcher from its environment variables (no MPI call, nothing imported).

    Open MPI's mpirun/prterun: OMPI_COMM_WORLD_SIZE / _RANK / _LOCAL_SIZE / _LOCAL_RANK. MPICH and
    Intel MPI (hydra): PMI_SIZE / PMI_RANK (MPI_LOCALNRANKS / MPI_LOCALRANKID). A PMIx launcher:
    PMIX_SIZE / PMIX_RANK. Slurm's srun: SLURM_STEP_NUM_TASKS / SLURM_PROCID / SLURM_LOCALID; only
    inside a job step (srun) - a batch script itself also has SLURM_NTASKS but is one process, so
    SLURM_NTASKS alone counts only together with SLURM_STEP_ID.
    """
    env = os.environ if env is None else env
    size = _int_env(env, "OMPI_COMM_WORLD_SIZE")
    if size is not None:
        return Launcher("openmpi", size, _int_env(env, "OMPI_COMM_WORLD_RANK") or 0,
                        _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1, _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0)
    size = _int_env(env, "PMI_SIZE")
    if size is not None:
        return Launcher("pmi", size, _int_env(env, "PMI_RANK") or 0, _int_env(env, "MPI_LOCALNRANKS") or 1,
                        _int_env(env, "MPI_LOCALRANKID") or 0)
    size = _int_env(env, "PMIX_SIZE")
    if size is not None:
        return Launcher("pmix", size, _int_env(env, "PMIX_RANK") or 0, _int_env(env, "PMIX_LOCAL_SIZE") or 1,
                        _int_env(env, "PMIX_LOCAL_RANK") or 0)
    size = _int_env(env, "SLURM_STEP_NUM_TASKS")
    if size is None and "SLURM_STEP_ID" in env:
        size = _int_env(env, "SLURM_NTASKS")
    if size is not None:
        local = None
        tpn = str(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))).split("(")[0]
        if tpn.isdigit():
            local = int(tpn)
        return Launcher("slurm", size, _int_env(env, "SLURM_PROCID") or 0, local or 1,
                        _int_env(env, "SLURM_LOCALID") or 0)
    return Launcher("none", 1, 0, 1, 0)


def world_size(env=None) -> int:
    """Processes in this job (1 without a launcher): known before anything is imported or written."""
    return max(1, detect_launcher(env).size)
