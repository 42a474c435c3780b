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

.PHONY: setup tools demo test test-fast bench crds lint clean images image-base image-operator image-trainer-deps image-trainer test-images

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

# Images with buildah (daemonless, rootful, vfs storage, chroot isolation: runs where no container engine does).
# The base comes from Debian packages (tools/images/base.sh, debootstrap) instead of a registry; each Dockerfile
# takes it as its base build ARG, whose default is the public base users pull.
VERSION ?= 0.1.0
BASE_IMAGE ?= localhost/nnunet-distill-base:bookworm
OPERATOR_IMAGE ?= localhost/nnunet-distill-operator:$(VERSION)
TRAINER_IMAGE ?= localhost/nnunet-distill-trainer:$(VERSION)
# CI builds the trainer image's dependency layer with a CPU torch (the CUDA wheels are several GB); a GPU build
# uses the default pytorch/pytorch base, which already has torch.
TORCH_INSTALL ?= torch==2.14.1 torchvision==0.29.1
BUILDAH := STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot buildah
BUD := $(BUILDAH) bud --layers --network host --build-arg VERSION=$(VERSION)

images: image-operator image-trainer

image-base:
	tools/images/base.sh $(BASE_IMAGE)

image-operator: image-base
	$(BUD) --build-arg PYTHON_IMAGE=$(BASE_IMAGE) -t $(OPERATOR_IMAGE) -f Dockerfile .

image-trainer-deps: image-base
	$(BUD) --target deps --build-arg TORCH_IMAGE=$(BASE_IMAGE) --build-arg WHEEL_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_INSTALL="$(TORCH_INSTALL)" -t $(TRAINER_IMAGE)-deps -f trainer_image/Dockerfile .

image-trainer: image-base
	$(BUD) --build-arg TORCH_IMAGE=$(BASE_IMAGE) --build-arg WHEEL_IMAGE=$(BASE_IMAGE) \
	  --build-arg TORCH_INSTALL="$(TORCH_INSTALL)" -t $(TRAINER_IMAGE) -f trainer_image/Dockerfile .

# Smoke tests of the built operator image (entrypoint, non-root, this checkout's code inside, a reconcile
# against kmock from inside it). `make test` leaves this file out: it needs the image, which this target builds.
IMAGE_TESTS := tests/operator/test_operator_image.py
test-images: $(STAMP) image-operator
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) $(BIN)/python -m pytest -q -ra $(IMAGE_TESTS)

demo: $(STAMP)
	$(BIN)/nnunet-distill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25 --timeout=1800 --ignore=$(IMAGE_TESTS) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench

crds: $(STAMP)
	$(BIN)/nnunet-distill crds --write

lint: $(STAMP)
	$(BIN)/ruff format --check operator trainer_image tests bench
	$(BIN)/ruff check operator trainer_image tests bench

clean:
	rm -rf $(VENV) .demo demo_output .pytest_cache
