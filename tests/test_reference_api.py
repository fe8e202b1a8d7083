"""Every public kernel has a float64 reference with identical parameter names (thinc's
test_ops_consistency): a kernel added without its oracle fails here."""
import importlib
import inspect
import pkgutil

import rtrainer._kernels
from rtrainer import reference

MODULES = sorted(m.name for m in pkgutil.iter_modules(rtrainer._kernels.__path__) if m.name != "info")


def kernel_functions():
    for name in MODULES:
        mod = importlib.import_module(f"rtrainer._kernels.{name}")
        for fname, fn in vars(mod).items():
            if not fname.startswith("_") and callable(fn) and getattr(fn, "__module__", None) == mod.__name__:
                yield f"{name}.{fname}", fn


def test_all_kernel_modules_are_built():
    assert set(MODULES) == {"conv", "embed", "gate", "hpn", "norm", "optim", "rmsnorm", "scan", "xent"}


def test_every_kernel_has_a_reference_with_the_same_parameters():
    seen = 0
    for qual, fn in kernel_functions():
        ref = getattr(reference, qual.split(".")[1] + "_ref", None)
        assert ref is not None, f"kernel {qual} has no reference {qual.split('.')[1]}_ref"
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters), qual
        seen += 1
    assert seen >= 12, seen
