"""Always-valid statistics of an A/B/n test: each challenger against the control.

Each arm's observations (1/0 or a fraction for accuracy, a number for reward) are taken as
independent with mean ``mu_k``. Challenger k's effect ``theta = mu_k - mu_0`` is estimated by
``d = mean_k - mean_0`` with variance ``V = s_k^2 / n_k + s_0^2 / n_0`` (sample variances
plugged in). The test is the mixture sequential probability ratio test (mSPRT) of Johari,
Koomen, Pekelis and Walsh, "Always valid inference: continuous monitoring of A/B tests"
(Operations Research, 2022), with a normal mixture ``N(theta_0, tau^2)`` over the effect::

    Lambda(theta_0) = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta_0)^2 / (2 V (V + tau^2)))

(for one stream of n observations of variance sigma^2, ``V = sigma^2 / n`` gives the paper's
formula). ``Lambda`` is a martingale under ``theta = theta_0``, so

* ``p_n = min(p_{n-1}, 1 / Lambda_n(0))`` is an *always-valid p-value*: the chance that it
  ever drops to alpha, however often it is looked at, is at most alpha;
* ``{theta_0 : Lambda_n(theta_0) < 1 / alpha}``, intersected over n, is an always-valid
  confidence interval: ``d +- sqrt(2 V (V + tau^2) / tau^2 * log(sqrt((V + tau^2) / V) / alpha))``.

With several challengers the p-values are Holm-adjusted (valid at every look, since each raw
p-value is) and each interval is at level alpha / m (Bonferroni over the m challengers).
``tau`` (``mixture_sd``) is the effect size the test finds fastest. Nothing is updated until
both arms have ``min_samples`` observations (the plug-in variances need some data).

Pure numpy: :class:`SequentialTest` updates after every observation (the server);
:func:`diff_and_variance`, :func:`log_mixture_ratio`, :func:`halfwidth` and
:func:`running_paths` work on whole arrays (the benchmark simulates thousands of tests with
them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Arm",
    "Decision",
    "Monitor",
    "SequentialTest",
    "VariantReport",
    "diff_and_variance",
    "halfwidth",
    "holm_adjust",
    "log_mixture_ratio",
    "running_paths",
]

Decision = Literal["control", "winner", "loser", "no difference", "running"]
Floats = npt.NDArray[np.float64]
VAR_FLOOR = 1e-12  # a variance estimate of exactly 0 (all values equal) would divide by 0


# --------------------------------------------------------------------------- arrays
def diff_and_variance(
    n0: npt.ArrayLike,
    sum0: npt.ArrayLike,
    sq0: npt.ArrayLike,
    n1: npt.ArrayLike,
    sum1: npt.ArrayLike,
    sq1: npt.ArrayLike,
) -> tuple[Floats, Floats]:
    """The estimated effect ``mean1 - mean0`` and its variance, from each arm's count, sum
    and sum of squares (element-wise; NaN where a count is under 2)."""
    a0, a1 = np.asarray(n0, dtype=np.float64), np.asarray(n1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        m0, m1 = np.asarray(sum0, np.float64) / a0, np.asarray(sum1, np.float64) / a1
        v0 = np.maximum((np.asarray(sq0, np.float64) - a0 * m0 * m0) / (a0 - 1.0), VAR_FLOOR)
        v1 = np.maximum((np.asarray(sq1, np.float64) - a1 * m1 * m1) / (a1 - 1.0), VAR_FLOOR)
        return m1 - m0, v0 / a0 + v1 / a1


def log_mixture_ratio(
    diff: npt.ArrayLike, var: npt.ArrayLike, tau2: float, theta0: float = 0.0
) -> Floats:
    """``log Lambda(theta0)`` of the normal-mixture SPRT (element-wise)."""
    d = np.asarray(diff, np.float64) - theta0
    v = np.asarray(var, np.float64)
    return np.asarray(0.5 * np.log(v / (v + tau2)) + tau2 * d * d / (2.0 * v * (v + tau2)))


def halfwidth(var: npt.ArrayLike, tau2: float, alpha: float) -> Floats:
    """Half the width of the level-``alpha`` mSPRT interval ``{theta0: Lambda < 1/alpha}``."""
    v = np.asarray(var, np.float64)
    log_bound = 0.5 * np.log((v + tau2) / v) - math.log(alpha)
    return np.asarray(np.sqrt(2.0 * v * (v + tau2) / tau2 * log_bound))


def running_paths(
    diff: npt.ArrayLike, var: npt.ArrayLike, ready: npt.ArrayLike, *, tau2: float, alpha: float
) -> tuple[Floats, Floats, Floats]:
    """Always-valid p-values and interval bounds along the last axis (the looks, in order).

    ``ready``: whether both arms had ``min_samples`` at that look; before that p is 1 and the
    interval unbounded. Returns the running minimum of ``1 / Lambda(0)`` (capped at 1) and the
    running intersection (lower, upper) of the level-``alpha`` intervals.
    """
    d, v = np.asarray(diff, np.float64), np.asarray(var, np.float64)
    ok = np.asarray(ready, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = np.where(ok, np.minimum(1.0, np.exp(-log_mixture_ratio(d, v, tau2))), 1.0)
        h = halfwidth(v, tau2, alpha)
        lo = np.where(ok, d - h, -np.inf)
        hi = np.where(ok, d + h, np.inf)
    return (
        np.minimum.accumulate(p, axis=-1),
        np.maximum.accumulate(lo, axis=-1),
        np.minimum.accumulate(hi, axis=-1),
    )


def holm_adjust(pvalues: npt.ArrayLike) -> Floats:
    """Holm's step-down adjusted p-values along the last axis: challenger i is rejected at
    level alpha (family-wise) exactly when its adjusted p-value is <= alpha."""
    p = np.asarray(pvalues, np.float64)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * np.arange(m, 0, -1)
    adjusted = np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1))
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return out


# --------------------------------------------------------------------------- one test
@dataclass
class Arm:
    """One arm's sufficient statistics: count, sum and sum of squares of its outcomes."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.total_sq += value * value

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class Monitor:
    """One challenger's path: the always-valid p-value so far and the interval so far."""

    p: float = 1.0
    lower: float = -math.inf
    upper: float = math.inf
    estimate: float | None = None

    def update(self, diff: float, var: float, *, tau2: float, alpha: float) -> None:
        """One more look at the estimate ``diff`` (variance ``var``); ``alpha``: the
        interval's level."""
        self.estimate = diff
        log_ratio = float(log_mixture_ratio(diff, var, tau2))
        self.p = min(self.p, 1.0 if log_ratio <= 0.0 else math.exp(-min(log_ratio, 700.0)))
        h = float(halfwidth(var, tau2, alpha))
        self.lower = max(self.lower, diff - h)
        self.upper = min(self.upper, diff + h)


@dataclass(frozen=True)
class VariantReport:
    """What the test says about one variant (the control's ``ci`` and ``p_value`` are None).

    ``ci`` is the always-valid interval of the difference to the control (level alpha / m)
    and ``p_value`` its Holm-adjusted always-valid p-value.
    """

    name: str
    n: int
    metric: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    decision: Decision


@dataclass
class SequentialTest:
    """An A/B/n test: arm 0 is the control; updated after every observation.

    ``alpha``: family-wise error rate; ``mixture_sd``: tau (the effect found fastest, in the
    metric's units); ``min_samples``: observations each arm needs before the first look.
    """

    variants: int
    alpha: float = 0.05
    mixture_sd: float = 0.02
    min_samples: int = 100
    arms: list[Arm] = field(default_factory=list)
    monitors: list[Monitor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.variants < 2:
            raise ValueError(f"an A/B test needs at least 2 variants, got {self.variants}")
        if not self.arms:
            self.arms = [Arm() for _ in range(self.variants)]
        if not self.monitors:
            self.monitors = [Monitor() for _ in range(self.variants - 1)]
        if len(self.arms) != self.variants or len(self.monitors) != self.variants - 1:
            raise ValueError("the arms and monitors do not match the number of variants")

    @property
    def interval_alpha(self) -> float:
        """The level of each interval: alpha / m over the m challengers (Bonferroni)."""
        return self.alpha / (self.variants - 1)

    def observe(self, arm: int, value: float) -> None:
        """Record one outcome of ``arm`` and look again (the control: every challenger)."""
        if not math.isfinite(value):
            raise ValueError(f"an outcome must be a finite number, got {value!r}")
        self.arms[arm].add(float(value))
        for k in range(1, self.variants) if arm == 0 else (arm,):
            self._look(k)

    def _look(self, k: int) -> None:
        a0, ak = self.arms[0], self.arms[k]
        if min(a0.n, ak.n) < max(self.min_samples, 2):
            return
        d, v = diff_and_variance(a0.n, a0.total, a0.total_sq, ak.n, ak.total, ak.total_sq)
        self.monitors[k - 1].update(
            float(d), float(v), tau2=self.mixture_sd**2, alpha=self.interval_alpha
        )

    def report(self, names: Sequence[str], margin: float) -> list[VariantReport]:
        """Each variant's n, metric, interval, adjusted p-value and decision at ``alpha``.

        A challenger is the ``winner`` (or ``loser``) once its adjusted p-value is <= alpha,
        by the sign of its estimate; ``no difference`` once its interval lies inside
        ``(-margin, +margin)``; else ``running``.
        """
        adjusted = holm_adjust([m.p for m in self.monitors])
        control = self.arms[0]
        out = [VariantReport(names[0], control.n, control.mean, None, None, "control")]
        for k, (monitor, p) in enumerate(zip(self.monitors, adjusted, strict=True), start=1):
            decision: Decision = "running"
            if p <= self.alpha and monitor.estimate is not None:
                decision = "winner" if monitor.estimate > 0 else "loser"
            elif -margin < monitor.lower and monitor.upper < margin:
                decision = "no difference"
            ci = (monitor.lower, monitor.upper) if math.isfinite(monitor.lower) else None
            arm = self.arms[k]
            out.append(VariantReport(names[k], arm.n, arm.mean, ci, float(p), decision))
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready values (an unbounded interval end is None)."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "alpha": self.alpha,
            "mixture_sd": self.mixture_sd,
            "min_samples": self.min_samples,
            "arms": [{"n": a.n, "sum": a.total, "sum_sq": a.total_sq} for a in self.arms],
            "monitors": [
                {"p": m.p, "lower": finite(m.lower), "upper": finite(m.upper), "est": m.estimate}
                for m in self.monitors
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequentialTest:
        """The test :meth:`to_dict` wrote (KeyError, TypeError or ValueError if malformed)."""
        arms = [Arm(int(a["n"]), float(a["sum"]), float(a["sum_sq"])) for a in data["arms"]]

        def bound(x: Any, unbounded: float) -> float:
            return unbounded if x is None else float(x)

        monitors = [
            Monitor(
                float(m["p"]), bound(m["lower"], -math.inf), bound(m["upper"], math.inf),
                None if m["est"] is None else float(m["est"]),
            )
            for m in data["monitors"]
        ]  # fmt: skip
        return cls(
            len(arms), float(data["alpha"]), float(data["mixture_sd"]),
            int(data["min_samples"]), arms, monitors,
        )  # fmt: skip
