"""Sample-level privacy accounting of one client across every round it trains in.

A client keeps ONE :class:`ClientAccountant` for the whole run. Each round appends the DP-SGD
steps it ran (a :class:`MechanismStep`), and :meth:`ClientAccountant.epsilon` composes the whole
history with the RDP accountant of Opacus. Creating a fresh Opacus ``PrivacyEngine`` per round
would report a single round's epsilon only; this class exists so that never happens.

The history travels between rounds in Flower's ``Context.state`` (see
:meth:`ClientAccountant.to_record`) and is mirrored on disk as JSON (see
:meth:`ClientAccountant.save`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np
import numpy.typing as npt
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError, PrivacyBudgetError
from pollinate.log import logger

__all__ = [
    "ClientAccountant",
    "MechanismStep",
    "noise_multiplier_for_budget",
]

_JSON_VERSION = 1
_RECORD_KEYS = ("noise", "rate", "steps")
_EPSILON_TOLERANCE = 0.01


# ---------------------------------------------------------------- validation helpers


def _is_number(value: object) -> TypeGuard[int | float]:
    """True for an int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_delta(delta: object) -> float:
    """Return ``delta`` as a float, or raise :class:`ConfigError` unless 0 < delta < 1."""
    if not _is_number(delta) or not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_noise(noise_multiplier: object) -> float:
    """Return the noise multiplier as a float, or raise unless it is finite and > 0."""
    if (
        not _is_number(noise_multiplier)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier <= 0
    ):
        raise ConfigError(
            f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r} "
            "(a noise multiplier of 0 gives no differential privacy)"
        )
    return float(noise_multiplier)


def _check_rate(sample_rate: object) -> float:
    """Return the sample rate as a float, or raise unless 0 < rate <= 1."""
    if not _is_number(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_steps(steps: object) -> int:
    """Return the step count, or raise unless it is an int >= 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


# ---------------------------------------------------------------- RDP


_ORDERS: list[float | int] = list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of ONE step of the sampled Gaussian mechanism at Opacus' default orders (read-only).

    ``compute_rdp`` is linear in the number of steps (it returns ``rdp * steps``), so
    ``_unit_rdp(...) * steps`` is bitwise what Opacus' ``RDPAccountant`` sums.
    """
    rdp = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS
        ),
        dtype=np.float64,
    )
    rdp.flags.writeable = False
    return rdp


# ---------------------------------------------------------------- files


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`pollinate._atomic.atomic_write_text`)."""
    atomic_write_text(Path(path), text)


# ---------------------------------------------------------------- mechanism step


@dataclass(frozen=True)
class MechanismStep:
    """One composition block of DP-SGD: ``steps`` steps of the sampled Gaussian mechanism.

    Attributes:
        noise_multiplier: Ratio of the noise standard deviation to the clipping norm; > 0.
        sample_rate: Poisson sampling probability of each example per step; in (0, 1].
        steps: Number of optimizer steps run with these parameters; >= 1.

    Raises:
        ConfigError: If any parameter is out of range or of the wrong type.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        """Validate the parameters and normalise the numbers to float."""
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_rate(self.sample_rate))
        object.__setattr__(self, "steps", _check_steps(self.steps))


# ---------------------------------------------------------------- accountant


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

    @staticmethod
    def _epsilon_of(history: Sequence[MechanismStep], delta: float) -> float:
        """Compose ``history`` with Opacus' RDP accountant and convert to epsilon at ``delta``.

        Computes exactly what ``opacus.accountants.RDPAccountant`` does for the same history
        (same orders, same per-block ``compute_rdp``, same summation and conversion), but
        caches each block's one-step RDP curve so a growing history is not recomputed.
        """
        if not history:
            return 0.0
        return _composed_epsilon(tuple(history), delta)

    def epsilon(self, delta: float) -> float:
        """The cumulative sample-level epsilon of the whole history at ``delta`` (RDP).

        Returns 0.0 for an empty history.

        Raises:
            ConfigError: If ``delta`` is not in (0, 1).
        """
        return self._epsilon_of(self._history, _check_delta(delta))

    def projected_epsilon(self, step: MechanismStep, delta: float) -> float:
        """The epsilon the history would have if ``step`` were added; nothing is recorded.

        Raises:
            ConfigError: If ``step`` is not a :class:`MechanismStep` or ``delta`` is invalid.
        """
        if not isinstance(step, MechanismStep):
            raise ConfigError(f"step must be a MechanismStep, got {step!r}")
        return self._epsilon_of([*self._history, step], _check_delta(delta))

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
        if not _is_number(budget) or math.isnan(float(budget)):
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

    # ------------------------------------------------------------ Flower record

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """The history as parallel lists, suitable for a Flower ``ConfigRecord``."""
        return {
            "noise": [entry.noise_multiplier for entry in self._history],
            "rate": [entry.sample_rate for entry in self._history],
            "steps": [entry.steps for entry in self._history],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> ClientAccountant:
        """Rebuild an accountant from :meth:`to_record` output (e.g. a ``ConfigRecord``).

        Raises:
            ConfigError: If keys are missing, the lists differ in length or hold invalid values.
        """
        if not isinstance(record, Mapping):
            raise ConfigError(f"accountant record must be a mapping, got {type(record).__name__}")
        columns: list[list[object]] = []
        for key in _RECORD_KEYS:
            if key not in record:
                raise ConfigError(f"accountant record is missing the key {key!r}")
            value = record[key]
            if not isinstance(value, list | tuple):
                raise ConfigError(
                    f"accountant record key {key!r} must be a list, got {type(value).__name__}"
                )
            columns.append(list(value))
        if len({len(column) for column in columns}) != 1:
            raise ConfigError(
                "accountant record lists differ in length: "
                + ", ".join(
                    f"{key}={len(column)}"
                    for key, column in zip(_RECORD_KEYS, columns, strict=True)
                )
            )
        history = [
            MechanismStep(noise_multiplier=noise, sample_rate=rate, steps=steps)
            for noise, rate, steps in zip(*columns, strict=True)
        ]
        return cls(history)

    # ------------------------------------------------------------ JSON and files

    def to_json(self) -> str:
        """The history as readable JSON (indent 2, sorted keys)."""
        document = {
            "version": _JSON_VERSION,
            "accountant": "rdp",
            "history": [
                {
                    "noise_multiplier": entry.noise_multiplier,
                    "sample_rate": entry.sample_rate,
                    "steps": entry.steps,
                }
                for entry in self._history
            ],
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClientAccountant:
        """Rebuild an accountant from :meth:`to_json` output.

        Raises:
            ConfigError: If the text is not valid JSON or not a valid accountant document.
        """
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"accountant JSON is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ConfigError("accountant JSON must be an object")
        if document.get("version") != _JSON_VERSION:
            raise ConfigError(
                f"accountant JSON has unsupported version {document.get('version')!r}"
            )
        if document.get("accountant") != "rdp":
            raise ConfigError(
                f"accountant JSON has unsupported accountant {document.get('accountant')!r}"
            )
        entries = document.get("history")
        if not isinstance(entries, list):
            raise ConfigError("accountant JSON must hold a 'history' list")
        history: list[MechanismStep] = []
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {
                "noise_multiplier",
                "sample_rate",
                "steps",
            }:
                raise ConfigError(f"malformed accountant history entry: {entry!r}")
            history.append(
                MechanismStep(
                    noise_multiplier=entry["noise_multiplier"],
                    sample_rate=entry["sample_rate"],
                    steps=entry["steps"],
                )
            )
        return cls(history)

    def save(self, path: Path) -> None:
        """Write the history to ``path`` as JSON, atomically (temp file, fsync, replace)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> ClientAccountant:
        """Read an accountant saved with :meth:`save`.

        A missing file gives an empty accountant (a client that has not trained yet).

        Raises:
            ConfigError: If the file cannot be read or is corrupt; the message names the path.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read privacy accountant file {path}: {exc}") from exc
        try:
            return cls.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"corrupt privacy accountant file {path}: {exc}") from exc


# ---------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[MechanismStep, ...], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` (cached: clients with the same history share it)."""
    if not history:
        return 0.0
    rdp = sum(
        [_unit_rdp(entry.noise_multiplier, entry.sample_rate) * entry.steps for entry in history]
    )
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    epsilon = float(epsilon)
    if math.isnan(epsilon):
        return math.inf
    return epsilon


def noise_multiplier_for_budget(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay within budget.

    Uses Opacus' binary search with the RDP accountant (epsilon tolerance 0.01), so the result
    gives an epsilon at most ``target_epsilon`` and at most 0.01 below it.

    Raises:
        ConfigError: If a parameter is invalid or the target cannot be reached with any
            reasonable noise multiplier.
    """
    if (
        not _is_number(target_epsilon)
        or not math.isfinite(float(target_epsilon))
        or target_epsilon <= 0
    ):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    sample_rate = _check_rate(sample_rate)
    steps = _check_steps(steps)
    try:
        sigma = get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=_EPSILON_TOLERANCE,
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach target_epsilon {target_epsilon} at delta {delta:g} with "
            f"{steps} steps at sample rate {sample_rate:g}: {exc}"
        ) from exc
    return float(sigma)
