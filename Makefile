# Set-up commands that work on a fresh CPU machine. The CPU build of torch is installed first so
# that no dependency can pull a CUDA build (several GB) from the registry.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	bash examples/demo.sh $(PY) outputs/demo

clean:
	rm -rf $(VENV) build *.egg-info
