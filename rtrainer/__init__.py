"""rtrainer: a CPU-first trainer for selective state-space (Mamba) models with an HPN head.

    from rtrainer import Trainer
    Trainer.from_file("examples/quickstart.toml").fit()

As a library (examples/library.py, docs/extending.md):

    import rtrainer
    net = rtrainer.Net.build({"model": {"vocab_size": 64, "d_model": 32}}, n_threads=1)
    opt = net.build_optimizer()
    r = rtrainer.train_step(net, opt, ids, targets, lr=1e-3)
    rtrainer.save(net, "model.safetensors", opt); net2 = rtrainer.load("model.safetensors")
"""

from __future__ import annotations

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Threading defaults, which only take effect if set before the libraries read them (numpy's
# OpenBLAS when numpy is first imported, libgomp when the first kernel module loads); a value
# the user set wins. Measured at the baseline shape, 2 threads on 2 cores (bench/compare.py):
# - OpenBLAS workers spin ~2^28 cycles after every matrix product and steal the cores the OpenMP
#   kernels run on next: the 2-thread step was slower than the 1-thread one. 2^4 stops that.
# - OpenMP workers that spin between kernels steal the cores BLAS runs on next: passive waiting
#   took the step from 69 to 61 ms (matrix products 26 -> 13 ms), and the quickstart from 57 to 51.
# - but a worker that sleeps at once pays a wake-up at every barrier inside a kernel (the scan
#   backward has two per batch row and chunk): libgomp's GOMP_SPINCOUNT, which overrides the wait
#   policy, lets it spin ~20000 rounds (tens of microseconds) first. Scan backward on 2 threads:
#   0.91x -> 1.6-1.7x its 1-thread speed; baseline step, 2 threads, median 33-35 -> 28-31 ms.
_LATE = [k for k, lib in (("OPENBLAS_THREAD_TIMEOUT", "numpy"),) if k not in _os.environ and lib in _sys.modules]
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
_os.environ.setdefault("OMP_WAIT_POLICY", "passive")
_os.environ.setdefault("GOMP_SPINCOUNT", "20000")


def threading_warning() -> str | None:
    """A hint when numpy was imported before rtrainer, so OpenBLAS kept its spin-waiting default."""
    if _LATE:
        return ("numpy was imported before rtrainer, so OpenBLAS threads spin-wait and slow the OpenMP "
                "kernels; import rtrainer first or set OPENBLAS_THREAD_TIMEOUT=4 in the environment")
    return None


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
    if name in ("Net", "save", "load"):
        from . import net

        return getattr(net, name)
    if name in ("train_step", "StepResult"):
        from . import step

        return getattr(step, name)
    if name in ("load_config", "config_from_dict"):
        from . import config

        return getattr(config, name)
    if name in ("load_config",):
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'rtrainer' has no attribute {name!r}")
