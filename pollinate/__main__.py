"""``python -m pollinate`` runs the CLI."""

from pollinate.cli import main

main()
