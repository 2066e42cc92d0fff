# Two commands do all set-up on a fresh clone:
#   make test    create .venv, install pinned packages, build the C++ extension, run the tests
#   make train   the same set-up, then the main job (train.py)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
READY  := $(VENV)/.ready-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: test train bench build

$(READY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# the extension is rebuilt whenever csrc/ or setup.py changes (ninja rebuilds only what changed)
build: $(READY)
	MAX_JOBS=2 $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

train: build
	$(PY) train.py $(TRAIN_ARGS)

bench: build
	$(PY) -m manualconv.bench $(BENCH_ARGS)
