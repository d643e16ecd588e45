"""The ``pollinate`` command line (Typer); ``pollinate.cli.main:main`` is the entry point."""

from pollinate.cli._process import tune_process

# Before any command module imports torch: libgomp reads its settings when torch loads it.
tune_process()
