import os
import subprocess
import sys

from rtrainer.threads import resolve_threads


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(5) == 5


def test_zero_means_omp_num_threads_then_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(0) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads(0) == len(os.sched_getaffinity(0))


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def test_importing_rtrainer_first_sets_threading_defaults_user_values_win():
    code = ("import os, rtrainer, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'], "
            "os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'], rtrainer.threading_warning())")
    names = ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in names}
    assert _run(code, env) == "4 passive 20000 None"
    env.update(OPENBLAS_THREAD_TIMEOUT="10", OMP_WAIT_POLICY="active", GOMP_SPINCOUNT="0")
    assert _run(code, env) == "10 active 0 None"


def test_numpy_imported_first_is_reported():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = _run("import numpy, rtrainer; print(rtrainer.threading_warning())", env)
    assert "import rtrainer first" in out


def test_build_is_the_one_expected():
    """`make test-no-openmp` sets RTRAINER_EXPECT_OPENMP=0: make sure its kernels are really the
    serial build (and the normal suite really the OpenMP one)."""
    import rtrainer

    expected = os.environ.get("RTRAINER_EXPECT_OPENMP", "1") != "0"
    assert rtrainer.openmp_enabled() is expected
