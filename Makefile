# Front door. Every target bootstraps .venv on first use (python3 -m venv + pinned install).
SHELL := /bin/bash
# +B: no brace expansion, -f: no globbing. DATA='/d/{000..099}.tar' or ARGS="--set data.shards=/d/*.tar" reach the
# program as one argument (WebDataset expands braces itself) instead of being split or expanded by bash.
.SHELLFLAGS := +B -f -c
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

.PHONY: help setup lint test test-fast bench bench-data bench-distill bench-finetune pretrain distill retrieval-eval finetune tokenopt clean-venv gpu-check gpu-wheels

help:
	@echo "make pretrain        stage 1 + stage 2 on the synthetic corpus (demo scale)"
	@echo "make distill         stage 1 distillation (PRESET=smoke DATA= TEACHER= LAUNCH=launch/cpu.yaml)"
	@echo "make retrieval-eval  zero-shot retrieval of the pretrained model"
	@echo "make finetune        stage 3 Flux-Multi finetuning (PRESET=smoke; ARGS='--set k=v ...')"
	@echo "make tokenopt        Token Optimization table + plot of the finetuned model (CKPT=...)"
	@echo "make lint            ruff over fluxvit, benchmarks and tests (CI runs it before the tests)"
	@echo "make test            the CPU test suite (bootstraps .venv)"
	@echo "make bench           model benchmarks (selector cost, packed vs padded)"
	@echo "make bench-data      data pipeline benchmark"
	@echo "make bench-finetune  stage-3 claims on the synthetic corpus (the 3 shipped starts x 2 seeds, ~2 h on 2 cores; CLAIMS_ARGS=--tiny: 1 min)"
	@echo "make gpu-check       one GPU check: gpu tests, backends, S/B train steps, MFU, teacher, decode (<= 8 min)"
	@echo "make gpu-wheels      the wheels gpu-check installs offline on a bare GPU machine (wheels/gpu-check)"

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

lint: $(STAMP)
	$(PY) -m ruff check fluxvit benchmarks tests

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench_model

# One prepared GPU run (benchmarks/gpu_check.py): one table + benchmarks/results/gpu_check.json, with the machine's
# own python3 and no network: benchmarks/gpu_offline.sh installs what it lacks from wheels/gpu-check (made by
# `make gpu-wheels` where PyPI is reachable; TORCH_VERSION=2.11 picks the matching torchvision), no venv.
# ARGS='--cpu --tiny' runs it end to end on a CPU; PYTHON=.venv/bin/python uses this checkout's venv.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_offline.sh run $(ARGS)

gpu-wheels:
	PYTHON=$(PYTHON) bash benchmarks/gpu_offline.sh fetch

bench-data: $(STAMP)
	$(PY) -m benchmarks.bench_data

# TEACHER: a weights file for the preset's teacher architecture (path/to/file.{pt,pth,bin,safetensors}), or
# KIND:NAME[:WEIGHTS_OR_TAG] naming the architecture (teacher.kind, teacher.name), e.g. open_clip:ViT-L-14:openai,
# internvideo2:internvideo2_1b_patch14:/w/InternVideo2-stage2_1b-224p-f4.pt, open_clip:ViT-B-16:/w/vitb16.bin. Naming
# one resets teacher.vision_cfg / teacher.overrides (the tiny test towers of smoke presets). A third part with a "/"
# or a weights suffix is a file (teacher.weights), otherwise an open_clip pretrained tag.
_TW = $(subst :, ,$(TEACHER))
_T3 = $(word 3,$(_TW))
_T3_FILE = $(or $(findstring /,$(_T3)),$(filter %.pt %.pth %.bin %.safetensors,$(_T3)))
TEACHER_SETS = $(if $(TEACHER),$(if $(filter 1,$(words $(_TW))),\
  --set teacher.weights=$(TEACHER) --set teacher.pretrained=,\
  --set teacher.kind=$(word 1,$(_TW)) --set teacher.name=$(word 2,$(_TW)) --set teacher.vision_cfg={} \
  --set teacher.overrides={} \
  $(if $(_T3),$(if $(_T3_FILE),--set teacher.weights=$(_T3) --set teacher.pretrained=,--set teacher.pretrained=$(_T3)),\
  --set teacher.pretrained=)))

# Stage 1 distillation. PRESET=smoke|smoke_corpus|demo|paper_s|paper_b|umt_b16|umt_l14; DATA=shard pattern
# (data.source=shards); TEACHER= (above; paper_*: the official InternVideo2-stage2_1b-224p-f4.pt);
# LAUNCH=accelerate config in launch/ (cpu.yaml, gpu8.yaml, deepspeed_zero2_cpu.yaml, ...).
distill: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file $(LAUNCH) -m fluxvit.stages.distill --preset $(PRESET) \
	  --set train.run_dir=$(RUN_DIR)/distill_$(PRESET) \
	  $(if $(DATA),--set data.source=shards --set data.shards=$(DATA)) $(TEACHER_SETS) $(ARGS)

bench-distill: $(STAMP)
	$(PY) -m benchmarks.bench_distill

# The front door: synthetic corpus (generated once) -> stage 1 (distillation) -> stage 2 (video-text).
# Real data: DATA=video shards with captions, TEACHER= (as for distill), TEXT=text tower spec
# (hf:bert-base-uncased, a local folder, open_clip:MODEL[:PRETRAINED]), LAUNCH=launch/gpu8.yaml,
# PRETRAIN_PRESETS="paper_s paper_s" (stage 1 and stage 2 presets); ARGS: --set overrides for both
# stages (the keys they share: data.*, train.*, optim.*), ARGS1 / ARGS2: for stage 1 / stage 2 only.
SYNTH ?= data/synthetic
PRETRAIN_DIR ?= $(RUN_DIR)/pretrain
PRETRAIN_PRESETS ?= demo demo
ACCEL = $(VENV)/bin/accelerate launch --config_file $(LAUNCH)

$(SYNTH)/corpus.json: | $(STAMP)
	$(VENV)/bin/fluxvit-data synth --out $(SYNTH)

pretrain: $(STAMP) $(if $(DATA),,$(SYNTH)/corpus.json)
	$(ACCEL) -m fluxvit.stages.distill --preset $(word 1,$(PRETRAIN_PRESETS)) \
	  --set train.run_dir=$(PRETRAIN_DIR)/distill \
	  $(if $(DATA),--set data.source=shards --set data.shards=$(DATA),--set data.root=$(SYNTH)) $(TEACHER_SETS) $(ARGS) $(ARGS1)
	$(ACCEL) -m fluxvit.stages.videotext --preset $(word 2,$(PRETRAIN_PRESETS)) \
	  --set train.run_dir=$(PRETRAIN_DIR)/videotext \
	  --set model.init=$(PRETRAIN_DIR)/distill/student.safetensors \
	  $(if $(DATA),--set data.source=shards --set data.shards=$(DATA),--set data.root=$(SYNTH)) \
	  $(if $(TEXT),--set text.spec=$(TEXT)) $(ARGS) $(ARGS2)
	@echo "pretrained video-text model: $(PRETRAIN_DIR)/videotext/videotext.safetensors (make retrieval-eval)"

# Zero-shot retrieval of the pretrained model with its run's settings and protocol (config.json beside it: data,
# retrieval.budgets / settings / dual_softmax). EVAL_DATA=captioned video shards to evaluate instead (data.val_shards);
# EVAL_ARGS=more --set overrides, e.g. --set retrieval.dual_softmax=true.
retrieval-eval: $(STAMP)
	$(PY) -m fluxvit.stages.videotext.retrieval $(PRETRAIN_DIR)/videotext/videotext.safetensors \
	  $(if $(EVAL_DATA),--set data.source=shards --set data.val_shards=$(EVAL_DATA)) $(EVAL_ARGS)

clean-venv:
	rm -rf $(VENV)

# Stage 3: Flux-Multi finetuning, then Token Optimization on its export.
FT_RUN ?= $(RUN_DIR)/finetune_$(PRESET)
CKPT ?= $(FT_RUN)/model.safetensors
TO_ARGS ?= --set tokenopt.budgets=[128,64,32] --set tokenopt.frames=[2,4,8,16] --set tokenopt.resolutions=[42,56,70] \
  --set tokenopt.base_resolution=56 --set eval.max_videos=24

finetune: $(STAMP)
	$(PY) -m fluxvit.stages.finetune --preset $(PRESET) --set train.run_dir=$(FT_RUN) $(ARGS)

# The three stage-3 claims (selector vs random, Flux-Multi vs Flux-Single, Token Optimization), measured.
CLAIMS_ARGS ?= --shipped-starts --seeds 0 1
bench-finetune: $(STAMP)
	$(PY) -m benchmarks.finetune_claims $(CLAIMS_ARGS)

tokenopt: $(STAMP)
	@test -f $(CKPT) || { echo "make tokenopt: no checkpoint $(CKPT); run make finetune PRESET=$(PRESET) first" \
	  "or pass CKPT=path/to/model.safetensors" >&2; exit 2; }
	$(PY) -m fluxvit.stages.finetune.tokenopt $(CKPT) --out $(FT_RUN)/tokenopt $(TO_ARGS)
