"""Compiled Cython kernels (sources in the repository's kernels/ folder).

`timed(on_call)` is the supported way to time the kernels inside a real training step (the
benchmarks' step breakdown): while the context is open, every public function of every kernel
module, and numpy.matmul, goes through a wrapper that calls on_call(name, seconds, args) after
each call (name = "module.function" or "numpy.matmul"). The model, the heads and the optimizer
call the kernels as attributes of these module objects (and numpy.matmul as an attribute of
numpy), so nothing else needs to know. Everything is restored on exit, also on an exception.
Not thread-safe against other code that rebinds the same attributes at the same time.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import time

# the kernel modules and their public entry points (info is build information, not a kernel)
_SKIP = {"info"}


def kernel_modules() -> dict:
    """{module name: module} of every built kernel module except info."""
    mods = {}
    for m in pkgutil.iter_modules(__path__):
        if m.name not in _SKIP and not m.name.startswith("_"):
            mods[m.name] = importlib.import_module(f"{__name__}.{m.name}")
    return mods


def _public_functions(mod) -> dict:
    return {n: f for n, f in vars(mod).items()
            if not n.startswith("_") and callable(f) and getattr(f, "__module__", None) == mod.__name__}


@contextlib.contextmanager
def timed(on_call):
    """Time every kernel call and numpy.matmul while open (see the module docstring)."""
    import numpy as np

    perf = time.perf_counter
    saved = []

    def wrap(name, fn):
        def timed_call(*args, **kw):
            t0 = perf()
            try:
                return fn(*args, **kw)
            finally:
                on_call(name, perf() - t0, args)
        timed_call.__wrapped__ = fn
        return timed_call

    try:
        for mname, mod in kernel_modules().items():
            for fname, fn in _public_functions(mod).items():
                saved.append((mod, fname, fn))
                setattr(mod, fname, wrap(f"{mname}.{fname}", fn))
        saved.append((np, "matmul", np.matmul))
        np.matmul = wrap("numpy.matmul", np.matmul)
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)
