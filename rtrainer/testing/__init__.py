"""Test oracles, outside the runtime import path: ``import rtrainer`` (and training) never imports them.

* :mod:`rtrainer.testing.reference`: a float64 NumPy reference of every kernel (``<kernel>_ref``,
  same parameter names) and of the whole model;
* :mod:`rtrainer.testing.parity_torch`: an independent PyTorch (autograd) implementation;
* :mod:`rtrainer.testing.parity_jax`: the same in JAX (float64 only inside the calls that ask for
  it: importing it changes no process-wide JAX setting).

torch and jax are optional: import those two modules only where they are installed (the tests use
``pytest.importorskip``).
"""
