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

.PHONY: setup tools demo test test-fast bench crds lint clean images image-base image-operator image-trainer-deps image-trainer test-images test-trainer-image

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
# TORCH_INSTALL: the pip arguments that put torch on a base without it (the Debian base). PyPI's Linux torch is the
# CUDA build (with its nvidia-* wheels, ~5 GB installed), which is what `make image-trainer` builds here; a CPU-only
# variant needs PyTorch's own index: TORCH_INSTALL="torch==2.14.1 torchvision==0.29.1 --index-url
# https://download.pytorch.org/whl/cpu" (not reachable from this project's machines, so not built here). The public
# default base (pytorch/pytorch) already has torch and gets TORCH_INSTALL="".
TORCH_INSTALL ?= torch==2.14.1 torchvision==0.29.1
# vfs works everywhere (no kernel overlay needed) but stores every layer as a full copy; where overlay mounts work,
# STORAGE_DRIVER=overlay (with CONTAINERS_STORAGE_CONF naming a store made with that driver) needs much less disk
# for the trainer image. The image tests read the same variable.
export STORAGE_DRIVER ?= vfs
BUILDAH := STORAGE_DRIVER=$(STORAGE_DRIVER) BUILDAH_ISOLATION=chroot buildah
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
test-images: $(STAMP) image-operator
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) $(BIN)/python -m pytest -q -ra tests/operator/test_operator_image.py

# The trainer image (every stage CLI's --help inside it, tini, UID 1000, torch and onnxruntime-gpu). Apart from
# test-images because of its size: PyPI's torch is the CUDA build, a 7.5 GB image (see README "Images").
test-trainer-image: $(STAMP) image-trainer
	TRAINER_IMAGE=$(TRAINER_IMAGE) $(BIN)/python -m pytest -q -ra tests/ship/test_trainer_image.py

# Left out of `make test`: they need the images, which the two targets above build.
IMAGE_TESTS := --ignore=tests/operator/test_operator_image.py --ignore=tests/ship/test_trainer_image.py

demo: $(STAMP)
	$(BIN)/nnunet-distill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25 --timeout=1800 $(IMAGE_TESTS) tests

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
