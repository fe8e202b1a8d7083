"""Thread-count resolution: one number for the OpenMP kernels and numpy's BLAS alike.

The kernels and the BLAS calls run one after the other, never at the same time, so both use the
same count; threadpoolctl caps BLAS to it so the two never oversubscribe the cores.
"""
from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int) -> int:
    """run.threads > 0 wins; 0 means OMP_NUM_THREADS if set, else every core this process may use."""
    if requested and requested > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()
