# Every target but `setup` runs inside .venv, which `setup` builds once (a stamp file tracks pyproject.toml).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# nnU-Net on a CPU machine: no DA worker processes, one process for pools (see README "Performance knobs").
export nnUNet_n_proc_DA ?= 0
export nnUNet_def_n_proc ?= 1
export nnUNet_compile ?= false

.PHONY: setup tools demo test test-fast bench crds lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch and torchvision first and together: the pair nnU-Net's trainer lookup (timm -> torchvision) needs.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[operator,trainer,dev]'
	touch $(STAMP)

# Test servers that are not Python packages: Azurite (the Azure Storage emulator, pinned in tools/azurite/
# package-lock.json) for the az:// publish tests. Needs Node.js >= 20 and npm; about 190 MB in node_modules.
tools:
	npm ci --prefix tools/azurite --no-audit --no-fund

demo: $(STAMP)
	$(BIN)/nnunet-distill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --timeout=1800 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench

crds: $(STAMP)
	$(BIN)/nnunet-distill crds --write

lint: $(STAMP)
	$(BIN)/ruff check operator trainer_image tests bench

clean:
	rm -rf $(VENV) .demo demo_output .pytest_cache
