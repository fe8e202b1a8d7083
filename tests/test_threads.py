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


def test_importing_rtrainer_first_caps_openblas_spinning():
    code = "import os, rtrainer, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "4"
    env["OPENBLAS_THREAD_TIMEOUT"] = "10"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "10"


def test_build_is_the_one_expected():
    """`make test-no-openmp` sets RTRAINER_EXPECT_OPENMP=0: make sure its kernels are really the
    serial build (and the normal suite really the OpenMP one)."""
    import rtrainer

    expected = os.environ.get("RTRAINER_EXPECT_OPENMP", "1") != "0"
    assert rtrainer.openmp_enabled() is expected
