# The two commands a new user needs: `make demo` and `make test`.
# Each creates (once) its own virtual environment in .venv from pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RAW := data/demo_raw
DEMO_DATA := data/prepared
DEMO_RUN := runs/demo
DEMO_TIMELINE := data/demo_timeline.mkv

.PHONY: demo demo-data test test-slow test-all test-ci lint bench drill asan clean

# uv installs into the venv what pip would (the same versions) in a quarter of the time:
# 29 s instead of 123 s on 2 cores, a third of a fresh `make test`.
# --compile-bytecode writes every module's .pyc now (27 s on 2 cores). Without them, where
# PYTHONDONTWRITEBYTECODE is set (as in many containers and CI images), every process
# compiles jax, flax and tensorflow from source again: 13-15 s more for each of the dozens of
# processes the tests and the demo start.
UV := $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sora_jax needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(UV) -e ".[test]"
	$(BIN)/python -m sora_jax.kernels.build  # oneDNN CPU kernels (else built on first use)
	touch $@

# The built-in demo dataset: real mp4s made with PyAV, prepared into ArrayRecords.
demo-data: $(STAMP)
	$(BIN)/sora-prep demo $(DEMO_RAW) --timeline $(DEMO_TIMELINE)
	$(BIN)/sora-prep $(DEMO_RAW) --out $(DEMO_DATA) --name sora_demo --fps 8 --short-side 40

# Prepare the demo dataset, train, evaluate, export, predict on raw files, and follow a
# long file of the classes in turn (a timeline, drawn in runs/demo/timeline.png).
demo: demo-data
	rm -rf $(DEMO_RUN)
	$(BIN)/sora-train --config configs/demo.py --workdir $(DEMO_RUN) \
		--config.data.dir=$(DEMO_DATA) --config.data.name=sora_demo
	$(BIN)/sora-eval --workdir $(DEMO_RUN)
	$(BIN)/sora-export --workdir $(DEMO_RUN) --output $(DEMO_RUN)/export
	$(BIN)/sora-predict --export $(DEMO_RUN)/export \
		$(DEMO_RAW)/test/red_high/red_high_000.mp4 $(DEMO_RAW)/test/blue_low/blue_low_000.mp4
	$(BIN)/sora-predict --export $(DEMO_RUN)/export --timeline $(DEMO_TIMELINE) \
		--plot $(DEMO_RUN)/timeline.png | tail -n 1

# Every part, in minutes: the tests marked `slow` (trainings held to a quality, drills of
# several processes and runs, the benchmark scripts, a TPU compile) wait for test-slow.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 -m 'not slow and not bench' tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 -m 'slow and not bench' tests

# Both, in one session (shared fixtures built once).
test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 -m 'not bench' tests

# What CI runs (.ci/run): test-all but the one test marked `long` (the pretraining claim,
# a quarter of test-all's time), so CI stays well inside its 30 minutes on 2 cores.
test-ci: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 -m 'not bench and not long' tests

# Every benchmark, results in bench/results/*.json (see BENCHMARKS.md), and the kill drill.
# About three hours on 2 cores, not measured whole: the run of 2026-11-25 took
# 9 min before the seeds (~12, and ~10 for the demo's with and without the wide preset),
# storage (~1), av_sync (~6), ann (~6) and curate (~80) scripts, the peers held to AVX2
# (~4), the drill (~5) and the TPU compiles (~60: four production steps) joined it.
bench: demo-data
	$(UV) -e ".[test,bench]"
	$(BIN)/python -m pytest -n 2 -m bench tests/test_bench.py  # bfloat16 variants, and the PyTorch peers
	$(BIN)/python bench/train_step.py --out bench/results/train_step.json
	$(BIN)/python bench/peers.py --out bench/results/peers.json
	$(BIN)/python bench/peers.py --config.model.dtype=bfloat16 --out bench/results/peers_bf16.json
	$(BIN)/python bench/peers.py --max-isa AVX2 --out bench/results/peers.json  # as an AVX2 host
	$(BIN)/python bench/conv_layers.py --out bench/results/conv_layers.json
	$(BIN)/python bench/conv_layers.py --dtype bfloat16 --out bench/results/conv_layers_bf16.json
	$(BIN)/python bench/input_pipeline.py --train-steps 300 --out bench/results/input_pipeline.json
	$(BIN)/python bench/compile_time.py --out bench/results/compile_time.json
	$(BIN)/python bench/memory.py --out bench/results/memory.json
	$(BIN)/python bench/pretrain.py --out bench/results/pretrain.json
	$(BIN)/python bench/storage.py --out bench/results/storage.json
	$(BIN)/python bench/av_sync.py --seeds 0 1 --out bench/results/av_sync.json
	$(BIN)/python bench/ann.py --out bench/results/ann.json
	$(BIN)/python bench/curate.py --seeds 0 1 --out bench/results/curate.json  # ~40 min a seed
	$(BIN)/python bench/tpu_compile.py --out bench/results/tpu_compile.json  # adds to the file
	$(BIN)/python bench/tpu_branch.py --out bench/results/tpu_branch.json  # adds to the file
	$(BIN)/python bench/seeds.py --out bench/results/seeds.json  # ~12 min: three seeds of four trainings
	$(BIN)/python bench/seeds.py --demo-only --out bench/results/seeds_demo.json  # ~5 min each
	$(BIN)/python bench/seeds.py --demo-only --preset wide --out bench/results/seeds_demo_wide.json
	$(BIN)/python bench/seeds.py --demo-only --config.model.visual.conv_bias_before_norm=False \
	  --out bench/results/seeds_demo_no_conv_bias.json
	test -f $(DEMO_RUN)/export/model.jax || $(MAKE) demo
	$(BIN)/python bench/timeline.py --out bench/results/timeline.json
	$(MAKE) drill

# SIGKILL a training run at random moments, rerun it each time, and check that nothing was
# lost (same losses, no orphan processes, nothing stale, checkpoints intact); ~5 min.
drill: demo-data
	$(BIN)/python bench/kill_drill.py --kills 12 --out bench/results/kill_drill.json

# The oneDNN kernels built with AddressSanitizer, at this CPU's own ISA and held to AVX2 (the
# kernels an AVX2-only host runs): the convolution and LSTM tests, then a demo training run
# with each; any ASan report fails it. ~3 min. (Python is not built with ASan: libasan is
# preloaded, with libstdc++ so that its C++ exception interceptor finds the real one.)
ASAN_PRELOAD = $(shell g++ -print-file-name=libasan.so) $(shell g++ -print-file-name=libstdc++.so.6)
ASAN_TESTS = tests/test_onednn_conv.py tests/test_onednn_lstm.py tests/test_conv.py tests/test_lstm.py tests/test_gru.py
asan: demo-data
	SORA_JAX_SANITIZE=address $(BIN)/python -m sora_jax.kernels.build
	set -e; for isa in ALL AVX2; do \
	  echo "== oneDNN ISA: $$isa"; \
	  rm -rf $(DEMO_RUN)-asan; \
	  export SORA_JAX_SANITIZE=address ONEDNN_MAX_CPU_ISA=$$isa LD_PRELOAD="$(ASAN_PRELOAD)" \
	    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1; \
	  $(BIN)/python -m pytest -p no:cacheprovider -q $(ASAN_TESTS); \
	  $(BIN)/sora-train --config configs/demo.py:runlocal --workdir $(DEMO_RUN)-asan \
	    --config.data.dir=$(DEMO_DATA) --config.data.name=sora_demo; \
	done; rm -rf $(DEMO_RUN)-asan

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data runs
