# Set-up in one command on a fresh machine: `make train` runs the main job, `make test` the test suite, each in a
# virtual environment (.venv) that it creates and fills first. `make docs` builds the documentation site.
#
# torch: with no NVIDIA GPU (no nvidia-smi), torch==$(TORCH_VERSION), the CPU build where the package index has it
# (point TORCH_INDEX_URL at PyTorch's CPU wheel index where it does not); with one, the default torch build.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin

ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH := torch==$(TORCH_VERSION)
else
TORCH := torch
endif

.PHONY: train test docs clean

train: $(VENV)/.installed-examples
	$(BIN)/python examples/train_cdrl.py $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(ARGS)

docs: $(VENV)/.installed-docs
	$(BIN)/python -m mkdocs build --strict --site-dir site

# torch first: a bare `torch` requirement of the package would pull a CUDA build of several GB.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	touch $@

$(VENV)/.installed-%: $(VENV)/.torch setup.py
	$(BIN)/python -m pip install -e ".[$*]"
	touch $@

clean:
	rm -rf $(VENV) site
