"""rtrainer: a CPU-first trainer for selective state-space (Mamba) models with an HPN head.

    from rtrainer import Trainer
    Trainer.from_file("examples/quickstart.toml").fit()
"""

import os as _os

__version__ = "0.1.0"

# OpenBLAS worker threads spin for 2^28 cycles (~0.1 s) after every matrix product, and on a
# machine with as many threads as cores that spinning steals the cores the OpenMP kernels run on
# next: measured 145 -> 85 ms per quickstart step at 2 threads on 2 cores with 2^4. Only takes
# effect when rtrainer is imported before numpy (the CLI always is); the user's value wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def openmp_enabled() -> bool:
    """Whether the compiled kernels were built with OpenMP."""
    from ._kernels import info

    return info.openmp_enabled()


def __getattr__(name):  # lazy: `import rtrainer` stays cheap and works before the kernels are built
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in ("RtrainerError", "ConfigError", "DataError", "CheckpointError", "RunIOError"):
        from . import errors

        return getattr(errors, name)
    if name in ("load_config",):
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'rtrainer' has no attribute {name!r}")
