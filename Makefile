# Front door. Every target bootstraps .venv on first use (python3 -m venv + pinned install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= smoke
DATA ?=
TEACHER ?=
TEXT ?=
LAUNCH ?= launch/cpu.yaml
RUN_DIR ?= runs

.PHONY: help setup test test-fast bench bench-data bench-distill pretrain distill retrieval-eval tokenopt clean-venv

help:
	@echo "make pretrain        stage 1 + stage 2 on the synthetic corpus (demo scale)"
	@echo "make distill         stage 1 distillation (PRESET=smoke DATA= TEACHER= LAUNCH=launch/cpu.yaml)"
	@echo "make retrieval-eval  zero-shot retrieval of the pretrained model"
	@echo "make test            the CPU test suite (bootstraps .venv)"
	@echo "make bench           model benchmarks (selector cost, packed vs padded)"
	@echo "make bench-data      data pipeline benchmark"

$(STAMP): pyproject.toml constraints.txt
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system ffmpeg (torchcodec needs it)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null) \
	      || echo "warning: could not install ffmpeg; the torchcodec backend will be unavailable"; \
	  else echo "warning: ffmpeg not found; install it for the torchcodec backend"; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_model

bench-data: $(STAMP)
	$(PY) -m benchmarks.bench_data

# Stage 1 distillation. PRESET=smoke|smoke_corpus|small|base; DATA=shard pattern (data.source=shards);
# TEACHER=local open_clip weights file; LAUNCH=accelerate config in launch/ (cpu.yaml, gpu8.yaml, ...).
distill: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file $(LAUNCH) -m fluxvit.stages.distill --preset $(PRESET) \
	  --set train.run_dir=$(RUN_DIR)/distill_$(PRESET) \
	  $(if $(DATA),--set data.source=shards --set data.shards='$(DATA)') \
	  $(if $(TEACHER),--set teacher.weights=$(TEACHER) --set teacher.pretrained=)

bench-distill: $(STAMP)
	$(PY) -m benchmarks.bench_distill

pretrain: $(STAMP)
	@echo "make pretrain: stage 1 + stage 2 are not implemented yet (issues 4 and 5)"; exit 2

clean-venv:
	rm -rf $(VENV)
