"""rtrainer: a CPU-first trainer for selective state-space (Mamba) models with an HPN head."""

__version__ = "0.1.0"


def openmp_enabled() -> bool:
    """Whether the compiled kernels were built with OpenMP."""
    from ._kernels import info

    return info.openmp_enabled()
