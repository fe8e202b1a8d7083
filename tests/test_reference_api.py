"""Every public kernel has a float64 reference with identical parameter names (thinc's
test_ops_consistency): a kernel added without its oracle fails here."""
import importlib
import inspect
import pkgutil

import rtrainer._kernels
from rtrainer.testing import reference

MODULES = sorted(m.name for m in pkgutil.iter_modules(rtrainer._kernels.__path__) if m.name != "info")


def kernel_functions():
    for name in MODULES:
        mod = importlib.import_module(f"rtrainer._kernels.{name}")
        for fname, fn in vars(mod).items():
            if not fname.startswith("_") and callable(fn) and getattr(fn, "__module__", None) == mod.__name__:
                yield f"{name}.{fname}", fn


def test_all_kernel_modules_are_built():
    assert set(MODULES) == {"conv", "embed", "gate", "hpn", "norm", "optim", "rmsnorm", "scan", "step", "xent"}


def test_every_kernel_has_a_reference_with_the_same_parameters():
    seen = 0
    for qual, fn in kernel_functions():
        ref = getattr(reference, qual.split(".")[1] + "_ref", None)
        assert ref is not None, f"kernel {qual} has no reference {qual.split('.')[1]}_ref"
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters), qual
        seen += 1
    assert seen >= 12, seen


def _run(code: str) -> str:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_the_runtime_never_imports_the_oracles():
    """Training, the CLI and the data layer run without rtrainer.testing (nor torch / jax)."""
    out = _run("import sys, rtrainer, rtrainer.trainer, rtrainer.cli, rtrainer.stream, rtrainer.tasks, rtrainer.probe\n"
               "print(sorted(m for m in sys.modules if m.startswith('rtrainer.testing') or m in ('torch', 'jax')))")
    assert out == "[]", out


def test_importing_the_jax_oracle_changes_no_jax_setting():
    import pytest

    pytest.importorskip("jax")
    out = _run("import jax; before = bool(jax.config.jax_enable_x64)\n"
               "import rtrainer.testing.parity_jax as pj\n"
               "import jax.numpy as jnp\n"
               "after = bool(jax.config.jax_enable_x64)\n"
               "with pj.float64():\n"
               "    inside = str(jnp.asarray(1.0, dtype=jnp.float64).dtype)\n"
               "print(before, after, inside, bool(jax.config.jax_enable_x64), jnp.asarray(1.0).dtype)")
    assert out == "False False float64 False float32", out
