# pollinate: common tasks. `make demo` sets up a fresh machine and runs the demo.
PY ?= .venv/bin/python
export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1

.PHONY: setup litert demo simulate test bench clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

# litert-torch (PyTorch -> TFLite) pins packages that break flwr: it gets its own venv,
# which `pollinate export --format tflite` calls as a subprocess.
litert: .venv-litert/.pollinate-litert

.venv-litert/.pollinate-litert: scripts/setup-litert
	scripts/setup-litert

# The demo starts afresh each time (its previous run directory is replaced).
demo: setup
	rm -rf runs/demo
	.venv/bin/pollinate simulate --preset demo --run-dir runs/demo

simulate: setup
	.venv/bin/pollinate simulate

test: setup litert
	scripts/check

bench: setup
	$(PY) benchmarks/simulation.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
