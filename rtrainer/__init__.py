"""rtrainer: a CPU-first trainer for selective state-space (Mamba) models with an HPN head.

    from rtrainer import Trainer
    Trainer.from_file("examples/quickstart.toml").fit()
"""

__version__ = "0.1.0"


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
