# Two commands do all set-up on a fresh clone:
#   make test    create .venv, install pinned packages, build the C++ extension, run the tests
#   make train   the same set-up, then the main job (train.py)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.ready-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: test train bench build data

$(READY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# the extension is rebuilt whenever csrc/ or setup.py changes (ninja rebuilds only what changed)
build: $(READY)
	MAX_JOBS=2 $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# CIFAR-10: this workplace's offline copy is unpacked into ./data when it is there; elsewhere
# train.py downloads the data set into ./data itself.
CIFAR_ARCHIVE ?= ../shared/data/cifar10/cifar10-jpeg.tar.gz
data:
	@if [ -f $(CIFAR_ARCHIVE) ] && [ ! -d data/train ]; then mkdir -p data && tar -xzf $(CIFAR_ARCHIVE) -C data; fi

train: build data
	$(PY) train.py $(TRAIN_ARGS)

bench: build
	$(PY) -m manualconv.bench $(BENCH_ARGS)
