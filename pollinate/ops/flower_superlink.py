"""Flower's SuperLink, patient with its SQLite state: ``python -m pollinate.ops.flower_superlink``.

``flower-superlink`` with the same arguments and behaviour, except that its SQLite
connections wait up to 60 s for the write lock instead of 5 s (:func:`pollinate._flower.
patient_sqlite`): on a busy host Flower's 5 s answered "database is locked" and lost
replies. ``pollinate server start`` runs the SuperLink through this.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Make the SQLite state patient, then run ``flower-superlink`` with this argv."""
    from flwr.superlink.cli import flower_superlink

    from pollinate._flower import patient_sqlite, run_flower

    run_flower(
        "flower-superlink",
        flower_superlink,
        patched=patient_sqlite(),
        fallback="Flower's SQLite settings changed; using Flower's lock timeout",
    )


if __name__ == "__main__":
    main()
