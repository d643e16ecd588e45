"""Sample-level privacy accounting of one client across every round it trains in.

A client keeps ONE :class:`ClientAccountant` for the whole run. Each round appends the DP-SGD
steps it ran (a :class:`~pollinate.privacy.mechanism.MechanismStep`), and
:meth:`ClientAccountant.epsilon` composes the whole history with the RDP accountant of Opacus
(:mod:`pollinate.privacy.rdp`) and, where every step took the full batch, exactly
(:mod:`pollinate.privacy.gaussian`), and reports the tighter. Creating a fresh Opacus
``PrivacyEngine`` per round would report a single round's epsilon only; this class exists so
that never happens.

The history travels between rounds in Flower's ``Context.state`` (see
:meth:`ClientAccountant.to_record`) and is mirrored on disk as JSON (see
:meth:`ClientAccountant.save`); both formats live in :mod:`pollinate.privacy.accountant_io`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pollinate.errors import ConfigError, PrivacyBudgetError
from pollinate.log import logger
from pollinate.privacy._checks import check_delta, is_number
from pollinate.privacy.accountant_io import (
    history_from_json,
    history_from_record,
    history_to_json,
    history_to_record,
    load_history,
    save_history,
)
from pollinate.privacy.gaussian import exact_epsilon
from pollinate.privacy.mechanism import MechanismStep
from pollinate.privacy.rdp import epsilon_of

__all__ = ["ClientAccountant"]


class ClientAccountant:
    """The sample-level (DP-SGD) privacy history of one client over a whole run.

    Args:
        history: Composition blocks already spent, oldest first. Kept as given (not merged).
    """

    def __init__(self, history: Sequence[MechanismStep] = ()) -> None:
        """Create an accountant holding ``history``."""
        entries = list(history)
        for entry in entries:
            if not isinstance(entry, MechanismStep):
                raise ConfigError(f"history entries must be MechanismStep, got {entry!r}")
        self._history: list[MechanismStep] = entries

    def __repr__(self) -> str:
        """Short description: number of blocks and total steps."""
        return f"ClientAccountant(blocks={len(self._history)}, total_steps={self.total_steps})"

    def __eq__(self, other: object) -> bool:
        """Two accountants are equal when their histories are equal."""
        if not isinstance(other, ClientAccountant):
            return NotImplemented
        return self._history == other._history

    __hash__ = None  # type: ignore[assignment]

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        """The composition blocks spent so far, oldest first."""
        return tuple(self._history)

    @property
    def total_steps(self) -> int:
        """Total number of DP-SGD steps over the whole history."""
        return sum(entry.steps for entry in self._history)

    # ------------------------------------------------------------ epsilon

    def epsilon(self, delta: float) -> float:
        """The cumulative sample-level epsilon of the whole history at ``delta``: the tighter
        of :meth:`epsilons` (RDP, and the exact one of a full-batch history).

        Returns 0.0 for an empty history.

        Raises:
            ConfigError: If ``delta`` is not in (0, 1).
        """
        return _tighter(self._history, check_delta(delta))

    def epsilons(self, delta: float) -> tuple[float, float | None]:
        """The whole history's epsilon at ``delta`` by Opacus' RDP accountant, and exactly
        (``None`` unless every block took the full batch: sample rate 1).

        Raises:
            ConfigError: If ``delta`` is not in (0, 1).
        """
        delta = check_delta(delta)
        return epsilon_of(self._history, delta), exact_epsilon(self._history, delta)

    def projected_epsilon(self, step: MechanismStep, delta: float) -> float:
        """The epsilon the history would have if ``step`` were added; nothing is recorded.

        Raises:
            ConfigError: If ``step`` is not a :class:`MechanismStep` or ``delta`` is invalid.
        """
        if not isinstance(step, MechanismStep):
            raise ConfigError(f"step must be a MechanismStep, got {step!r}")
        return _tighter([*self._history, step], check_delta(delta))

    def record(self, step: MechanismStep) -> None:
        """Append ``step`` to the history.

        When the last entry has the same noise multiplier and sample rate, the steps are added
        to it instead of opening a new entry (the same merging Opacus does).
        """
        if not isinstance(step, MechanismStep):
            raise ConfigError(f"step must be a MechanismStep, got {step!r}")
        if self._history:
            last = self._history[-1]
            if (
                last.noise_multiplier == step.noise_multiplier
                and last.sample_rate == step.sample_rate
            ):
                self._history[-1] = MechanismStep(
                    noise_multiplier=last.noise_multiplier,
                    sample_rate=last.sample_rate,
                    steps=last.steps + step.steps,
                )
                return
        self._history.append(step)

    def check_budget(self, step: MechanismStep, *, delta: float, budget: float) -> float:
        """Return the projected epsilon after ``step``; raise if it would exceed ``budget``.

        Args:
            step: The block the client is about to run.
            delta: Target delta.
            budget: Maximum allowed cumulative epsilon. ``budget <= 0`` or ``inf`` means no budget.

        Returns:
            The projected epsilon (history plus ``step``).

        Raises:
            PrivacyBudgetError: If the projected epsilon is larger than ``budget``.
            ConfigError: If ``budget`` is not a number or is NaN, or ``delta`` is invalid.
        """
        if not is_number(budget) or math.isnan(float(budget)):
            raise ConfigError(f"budget must be a number (<= 0 or inf for none), got {budget!r}")
        projected = self.projected_epsilon(step, delta)
        if budget <= 0 or math.isinf(budget):
            return projected
        if projected > budget:
            current = self.epsilon(delta)
            logger.info(
                "privacy budget reached: current epsilon %.4f, projected %.4f, budget %.4f",
                current,
                projected,
                budget,
            )
            raise PrivacyBudgetError(
                f"training would exceed the privacy budget: current epsilon {current:.4f}, "
                f"projected epsilon {projected:.4f} after {step.steps} more steps, "
                f"budget {float(budget):.4f} (delta {delta:g})"
            )
        return projected

    # ------------------------------------------------------------ Flower record, JSON, files

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """The history as parallel lists, suitable for a Flower ``ConfigRecord``."""
        return history_to_record(self._history)

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> ClientAccountant:
        """Rebuild an accountant from :meth:`to_record` output (e.g. a ``ConfigRecord``).

        Raises:
            ConfigError: If keys are missing, the lists differ in length or hold invalid values.
        """
        return cls(history_from_record(record))

    def to_json(self) -> str:
        """The history as readable JSON (indent 2, sorted keys)."""
        return history_to_json(self._history)

    @classmethod
    def from_json(cls, text: str) -> ClientAccountant:
        """Rebuild an accountant from :meth:`to_json` output.

        Raises:
            ConfigError: If the text is not valid JSON or not a valid accountant document.
        """
        return cls(history_from_json(text))

    def save(self, path: Path) -> None:
        """Write the history to ``path`` as JSON, atomically (temp file, fsync, replace)."""
        save_history(path, self._history)

    @classmethod
    def load(cls, path: Path) -> ClientAccountant:
        """Read an accountant saved with :meth:`save`.

        A missing file gives an empty accountant (a client that has not trained yet).

        Raises:
            ConfigError: If the file cannot be read or is corrupt; the message names the path.
        """
        return cls(load_history(path))


def _tighter(history: Sequence[MechanismStep], delta: float) -> float:
    """The smaller of the RDP and (full batch only) the exact epsilon of ``history``."""
    rdp, exact = epsilon_of(history, delta), exact_epsilon(history, delta)
    return rdp if exact is None else min(rdp, exact)
