# Two commands on a fresh machine: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed from pip's configured index when the venv has no torch (which build: that index's;
# PyPI's Linux x86-64 wheels are CUDA builds); a torch>=2.10 already in the venv is kept.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: train test install clean

install: $(INSTALLED)

$(INSTALLED): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Trains the default (tiny) recipe end to end; pass Hydra overrides with ARGS="model=small ...".
train: $(INSTALLED)
	$(BIN)/dsv3-train $(ARGS)

# Runs the test suite on the CPU; pass pytest arguments with ARGS="-k router".
test: $(INSTALLED)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
