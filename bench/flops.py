"""The FLOP count of one training step lives in the package (rtrainer/flops.py, used by the run
plan); bench/ and its tests import it from here as before: `from flops import step_flops`."""
from rtrainer.flops import _mm, mamba_step_flops, model_flops, step_flops  # noqa: F401

if __name__ == "__main__":  # pragma: no cover - convenience
    import runpy

    runpy.run_module("rtrainer.flops", run_name="__main__")
