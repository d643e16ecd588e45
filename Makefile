# pollinate: common tasks. `make demo` sets up a fresh machine and runs the demo.
PY ?= .venv/bin/python
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1

.PHONY: setup demo simulate test bench clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: setup
	.venv/bin/pollinate simulate --preset demo --run-dir runs/demo

simulate: setup
	.venv/bin/pollinate simulate

test: setup
	scripts/check

bench: setup
	$(PY) benchmarks/simulation.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
