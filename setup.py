"""Build the Cython kernels in kernels/ into rtrainer._kernels.* with OpenMP.

Environment knobs (read at build time):
  RTRAINER_NO_OPENMP=1   build without OpenMP (prange runs serially; tests must still pass)
  RTRAINER_PORTABLE=1    do not pass -march=native (for wheels that move between machines)
  RTRAINER_ONLY=a,b      build only these kernel modules (development: parallel in-place builds)
"""
import os
import sys

from setuptools import Extension, setup
from Cython.Build import cythonize

KERNELS = ["info", "embed", "conv", "scan", "norm", "hpn", "xent", "optim", "rmsnorm", "gate", "step"]

use_openmp = os.environ.get("RTRAINER_NO_OPENMP", "") not in ("1", "true", "yes")
portable = os.environ.get("RTRAINER_PORTABLE", "") in ("1", "true", "yes")

# -fno-math-errno and -fno-trapping-math change no result (we never read errno or unmask FP traps);
# they let gcc if-convert and vectorise the branch-free exp of kernels/_common.pxd. No -ffast-math:
# reassociation and finite-math assumptions would change results and NaN handling.
compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function", "-Wno-unreachable-code"]
link_args = []
if not portable and sys.platform.startswith("linux"):
    # -march=native allows the machine's widest vectors; gcc's tuning for many CPUs still prefers
    # 256-bit ones, so ask for the full width (the kernels' channel blocks are one register wide,
    # RTRAINER_LANES in kernels/_common.pxd)
    compile_args += ["-march=native", "-mprefer-vector-width=512"]
if use_openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

extensions = [
    Extension(
        f"rtrainer._kernels.{name}",
        [f"kernels/{name}.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # link libm explicitly: without it expf binds to glibc's slower compatibility symbol
        libraries=["m"] if sys.platform.startswith("linux") else [],
    )
    for name in KERNELS
    if os.path.exists(f"kernels/{name}.pyx")
    and (not os.environ.get("RTRAINER_ONLY") or name in os.environ["RTRAINER_ONLY"].split(","))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
        include_path=["kernels"],
    ),
)
