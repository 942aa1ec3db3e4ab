# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test benchmark clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fastclip.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(PY) benchmarks/spectral.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
