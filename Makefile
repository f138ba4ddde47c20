# The two commands a new machine needs:  `make demo`  and  `make test`.
# Each creates .venv (once) and installs rnnlab with what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The data mirror, when there is one beside the repo; otherwise loaders use the download cache.
export RNNLAB_DATA_MIRROR ?= $(wildcard $(CURDIR)/../shared/data)
# torch 2.13.0 is the CPU wheel on these machines; `make demo TORCH="torch==2.14.1"` (or a CUDA build) to choose.
TORCH  ?= torch==2.13.0
# W&B writes runs to disk unless you have logged in.
export WANDB_MODE ?= offline

.PHONY: demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, so the package's loose torch>=2.4 never pulls a multi-GB CUDA build by surprise.
	$(BIN)/pip install --quiet "$(TORCH)"
	# constraints.txt: the versions CI ran with, so a fresh clone next month installs what was tested.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed  ## train the three jobs briefly on the real data, serve them, query each once
	$(BIN)/python -m rnnlab.launch.demo

test: $(BIN)/.installed  ## the whole suite, real-data and multi-process tests included
	$(BIN)/python -m pytest

test-fast: $(BIN)/.installed  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.train_speed --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
