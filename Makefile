# Everything a fresh clone needs: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv chromium slurm demo test test-slow test-slurm test-rl test-ray llama-cpp test-export bench bench-estimate bench-serve bench-scheduler bench-peers bench-grpo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build first: an unpinned torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

# The dashboard's browser test drives Debian's Chromium through Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "chromium is missing and installing it needs root: the browser test will be skipped"; exit 0; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

# The Slurm backend's tests bring up a real one-node Slurm from Debian's packages (tests/slurm_cluster.py).
slurm:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	  && command -v munged >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "Slurm is missing and installing it needs root: the Slurm tests will be skipped"; exit 0; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	    --no-install-recommends -o DPkg::Lock::Timeout=600 slurmctld slurmd slurm-client munge; }

# The suite (under 10 minutes on 2 cores). The real-cluster and llama.cpp tests are their own targets, which
# .ci/run runs after it: test-slurm, test-ray, test-export.
test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Marked slow (each job is a real Slurm job: about 5 minutes in all), so run here explicitly.
test-slurm: $(STAMP) slurm
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow tests/test_slurm.py tests/test_multinode.py

# Marked slow (an SFT warm start then multi-turn GRPO: ~45 s idle, minutes on a loaded CPU), so run here explicitly.
test-rl: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow tests/test_multiturn_learning.py

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

# tunelab serve --backend ray against a local Ray head the tests start and stop (tests/ray_cluster.py); installs the
# optional extra tunelab[ray] first. Marked slow (a Ray head and three training jobs: about 3 minutes here).
test-ray: $(STAMP)
	$(BIN)/pip install -q -e '.[ray]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow tests/test_ray_backend.py

# llama-cpp-python from PyPI's source distribution (minutes: llama.cpp is compiled), its wheel cached in WHEELS (per
# user, so every checkout on the machine builds it once) and installed as tunelab[export]; llama.cpp's converter
# (convert_hf_to_gguf.py, conversion/, the gguf-py it vendors, not PyPI's gguf) unpacked to LLAMA_CPP_DIR, where
# `tunelab export` looks for it.
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/tunelab/wheels
LLAMA_CPP_DIR ?= $(HOME)/.cache/tunelab/llama.cpp-$(LLAMA_CPP_VERSION)
LLAMA_SDIST := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz

llama-cpp: $(STAMP)
	mkdir -p $(WHEELS)
	test -f $(LLAMA_SDIST) || $(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF" \
	  $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA_SDIST)
	$(BIN)/pip install -q --find-links $(WHEELS) --only-binary llama-cpp-python -e '.[export]'
	rm -rf $(LLAMA_CPP_DIR) && mkdir -p $(LLAMA_CPP_DIR)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_CPP_DIR) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_lora_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py

test-export: llama-cpp
	HF_HUB_OFFLINE=1 LLAMA_CPP_DIR=$(LLAMA_CPP_DIR) $(BIN)/python -m pytest -m export tests/test_export.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/estimate_check.py

# `tunelab estimate` against measured runs of the sft-lora workload, default and padded paths (also the end of `make bench`)
bench-estimate: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/estimate_check.py

bench-serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve.py

# What `tunelab serve` adds per job on each backend against `tunelab train` directly (Slurm when installed, as root)
bench-scheduler: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scheduler.py

# tunelab against LLaMA-Factory, axolotl, torchtune, litgpt, unsloth and TRL, each peer in its own venv under
# ~/.cache/tunelab/bench-peers (created on first use: about 90 minutes of installs)
bench-peers: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/peers.py

# GRPO step time and peak RSS against TRL's GRPOTrainer (its venv under ~/.cache/tunelab/bench-peers/trl, made on first use)
bench-grpo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/grpo.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
