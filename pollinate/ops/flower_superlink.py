"""Flower's SuperLink, patient with its SQLite state: ``python -m pollinate.ops.flower_superlink``.

``flower-superlink`` with the same arguments and behaviour, except that

- its SQLite connections wait up to 60 s for the write lock instead of 5 s
  (:func:`pollinate._flower.patient_sqlite`): on a busy host Flower's 5 s answered "database
  is locked" and lost replies;
- a device's request does not ask the database whether its run was stopped when that was
  asked less than 0.5 s ago and the run went on (:func:`pollinate._flower.quick_abort_checks`).

``pollinate server start`` runs the SuperLink through this.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Make the SQLite state patient and the abort checks quick, then run
    ``flower-superlink`` with this argv."""
    from flwr.superlink.cli import flower_superlink

    from pollinate._flower import patient_sqlite, quick_abort_checks, run_flower

    if not quick_abort_checks():
        print("pollinate superlink: Flower's fleet handlers changed; every request asks the "
              "database whether its run was stopped", file=sys.stderr)  # fmt: skip
    run_flower(
        "flower-superlink",
        flower_superlink,
        patched=patient_sqlite(),
        fallback="Flower's SQLite settings changed; using Flower's lock timeout",
    )


if __name__ == "__main__":
    main()
