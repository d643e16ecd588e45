"""``python -m pollinate`` runs the CLI."""

from pollinate.cli.main import main

main()
