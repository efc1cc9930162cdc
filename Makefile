# Two commands on a fresh clone (Python 3.10+ and make): each installs what is missing, then runs.
#   make quickstart   # the main job: prepare the sample data, train on 2 CPU workers, export, generate
#   make test         # the linter, then the whole test suite (what CI runs)
PYTHON ?= python3

.PHONY: install quickstart test test-fast test-train lint

install:
	@bash scripts/install.sh

quickstart: install
	raysft train configs/quickstart.yaml
	raysft generate runs/quickstart/final "Reverse the word 'maple'."

test: install lint
	$(PYTHON) -m pytest -q --durations=25

test-fast: install lint
	$(PYTHON) -m pytest -q -m "not ray"

test-train: install lint
	$(PYTHON) -m pytest -q -m "not e2e"

lint: install
	ruff check .
