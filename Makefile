# vfdetect — one target per pipeline stage.
#
#   make demo          install, then the whole chain on embedded synthetic phantoms
#   make test          install, then the test suite (what CI runs)
#   make reproduce DATA=path/to/manifest.csv [DATA_ROOT=...]   the paper's protocol on any manifest
#   make real-anatomy  leave-one-anatomy-out score on the real scans beside the repository (../shared/data/real)
#   make bundled-model train the bundled model's recipe and package it into vfdetect/models/
#   make model-selection-real  3d vs 5slices vs 1slice on the bundled model's data (after bundled-model)
#
# Installs into the active virtual environment when there is one, else creates ./.venv.

SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
VFD := $(VENV)/bin/vfdetect
STAMP := $(VENV)/.vfdetect-installed

# Demo settings (small enough for a 2-core laptop): small 1 mm phantoms, 12,800 training segments.
# The held-out set is drawn with 30 % fracture-free patients so that the patient-level ROC has
# negatives to work with at 10 cases.
DEMO := work/demo
DEMO_TRAIN_CASES ?= 16
DEMO_TEST_CASES ?= 10
DEMO_EPOCHS ?= 8
DEMO_SUBEPOCHS ?= 4
DEMO_SEGMENTS ?= 400

# Stage defaults (override on the command line)
DATA ?= $(DEMO)/train/manifest.csv
TEST_DATA ?= $(DEMO)/test/manifest.csv
LABELS ?= $(DEMO)/labels
RUN ?= $(DEMO)/run
PRED ?= $(DEMO)/predictions
EVAL ?= $(DEMO)/evaluation
CV_CONFIG ?= experiments/cv5.json
# Training precision: mixed_bfloat16 where the CPU computes bf16 natively (AVX512-BF16/AMX), else
# float32 (emulated bf16 trains many times slower). Evaluated when a recipe runs, after install.
TRAIN_PRECISION ?= $(shell $(PY) -c "from vfdetect.predictor import resolve_precision as r; \
                    print('mixed_bfloat16' if r('auto', gpu=False) == 'bfloat16' else 'float32')")
TRAIN_ARGS ?= --epochs $(DEMO_EPOCHS) --subepochs $(DEMO_SUBEPOCHS) --segments-per-subepoch $(DEMO_SEGMENTS) \
              --precision $(TRAIN_PRECISION) --validation-segments 1000 --lr-patience 3

.PHONY: install test test-all lint demo demo-clean demo-bundled phantoms labels train train-demo predict evaluate \
        figures cv reproduce reproduce-small real-anatomy bundled-model model-selection-real simulate benchmarks clean

install: $(STAMP)

$(STAMP): setup.py setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

# Two pytest-xdist workers, each test module on one (tests/conftest.py groups them).
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup

test: install
	$(PYTEST)

test-all: install
	$(PYTEST) -m "slow or long or not slow"

lint: install
	$(VENV)/bin/ruff check vfdetect tests benchmarks experiments
	$(VENV)/bin/mypy vfdetect

phantoms: install
	$(VFD) phantoms --out $(DEMO)/train --cases $(DEMO_TRAIN_CASES) --seed 1 --small --workers 2
	$(VFD) phantoms --out $(DEMO)/test --cases $(DEMO_TEST_CASES) --seed 2 --small --workers 2 --negative-fraction 0.3

labels: install
	$(VFD) synth-labels $(DATA) --out $(LABELS) --preview

train: install
	$(VFD) train $(DATA) --labels $(LABELS) --out $(RUN) $(TRAIN_ARGS)

train-demo: phantoms labels train

predict: install
	$(VFD) predict --model $(RUN) --manifest $(TEST_DATA) --out $(PRED)

evaluate: install
	$(VFD) evaluate $(TEST_DATA) $(PRED) --out $(EVAL)

figures: install
	$(VFD) figures $(EVAL)

demo-clean:
	rm -rf $(DEMO)

# The bundled model on a fresh adult-size phantom: seconds, no training.
demo-bundled: install
	$(VFD) phantoms --out $(DEMO)/bundled/phantom --cases 1 --seed 3 --config experiments/phantoms_adult.json --quiet
	$(VFD) predict $(DEMO)/bundled/phantom/phantom000_ct.nii.gz --out $(DEMO)/bundled/predictions
	@echo "bundled model: see $(DEMO)/bundled/predictions/phantom000/ (true grades: $(DEMO)/bundled/phantom/grades.csv)"

demo: demo-clean demo-bundled phantoms labels train predict evaluate figures
	@echo "demo finished: see $(EVAL)/metrics.md and the figures beside it"

cv: install
	$(VFD) cv $(DATA) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --out work/cv --folds 5 --config $(CV_CONFIG)

reproduce: install
	@test -n "$(DATA)" || { echo "usage: make reproduce DATA=manifest.csv [DATA_ROOT=dir]"; exit 2; }
	$(VFD) cv $(DATA) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --out work/reproduce --folds 5 --config experiments/cv5.json
	$(VFD) figures work/reproduce

reproduce-small: install
	$(VFD) phantoms --out work/reproduce-small/data --cases 30 --seed 7 --small --workers 2 --negative-fraction 0.4
	$(VFD) cv work/reproduce-small/data/manifest.csv --out work/reproduce-small --folds 5 --config experiments/cv5_small.json
	$(VFD) figures work/reproduce-small

# Real CT with simulated fractures (the real scans with vertebra masks beside the repository).
REAL_DATA ?= ../shared/data/real
simulate: install
	$(VFD) simulate-fractures data_manifests/real_anatomy.csv --data-root $(REAL_DATA) --out work/simulated \
	    --seed 1 --copies 4 --vary-acquisition --preview

real-anatomy: install
	$(PY) experiments/real_anatomy.py --config experiments/real_anatomy.json --out work/real-anatomy --data-root $(REAL_DATA)

bundled-model: install
	$(PY) experiments/real_anatomy.py --config experiments/bundled_model.json --out work/bundled-model --data-root $(REAL_DATA)
	$(PY) experiments/bundle_model.py work/bundled-model --name vfdetect-3d-realct

model-selection-real: install
	$(PY) experiments/real_anatomy.py --config experiments/model_selection_real.json --out work/bundled-model --data-root $(REAL_DATA)

benchmarks: install
	$(PY) benchmarks/bench_pipeline.py --out work/benchmarks/pipeline.json
	$(PY) benchmarks/bench_inference.py speed --out work/benchmarks/inference.json

clean:
	rm -rf work
