# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv data demo test benchmark reproduce clean

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Fashion-MNIST ships offline as a Debian package: the built-in default dataset.
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi; }

demo: $(STAMP) data
	$(PY) -m fastclip.demo $(DEMO_ARGS)

test: $(STAMP) data
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The paper's SimpleConv comparison on Fashion-MNIST by the project's own commands
# (resumable: a rerun skips finished work). EPOCHS=N, SIZE=tiny for a smoke test.
EPOCHS ?= 3
SIZE ?= full
reproduce: $(STAMP) data
	$(PY) experiments/reproduce.py --size $(SIZE) $(if $(filter full,$(SIZE)),--epochs $(EPOCHS))

benchmark: $(STAMP)
	$(PY) benchmarks/spectral.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
