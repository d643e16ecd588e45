"""Train a pollinate model on an exported federation with Apple's pfl: central-DP FedAvg.

Runs in the peer environment (.venv-pfl, benchmarks/pfl_peer/setup.sh), never with pollinate
installed: the data comes from export_data.py, the model is a copy of pollinate's built-in
`cnn` (SmallCNN, the default) or `opacus-mnist` (OpacusMnistCNN), chosen with --model.

Privacy: pfl's GaussianMechanism wrapped in CentrallyAppliedPrivacyMechanism. Each client's
model update is clipped to --clip (l2, whole model); the server adds N(0, (z * clip)^2) to the
sum of the clipped updates and divides by the cohort size (WeightByUser). z comes from pfl's
accountant (PLD by default), calibrated so that --rounds compositions of the Poisson-subsampled
Gaussian with q = cohort / population reach (--epsilon, --delta): pfl's own assumption. Or z
is given with --noise-multiplier (exclusive with --epsilon): no accountant runs and no epsilon
is reported, so that a timing comparison does not depend on an accountant. The cohort itself
is a fixed-size uniform draw without replacement each round, as pollinate's. --epsilon 0 is
plain FedAvg: no clipping and no noise.

--central-eval-every N evaluates the global model on the central test set with pfl's
CentralEvaluationCallback: once before training (as pollinate's round 0) and after every N-th
round, counting rounds from 1 (pfl itself skips its first iteration; see EveryNthRound).

Timing: a round is one central iteration of pfl's FederatedAveraging.run, measured by a
callback placed after every other callback: from the end of the previous round (the first:
from the end of the callbacks' on_train_begin, i.e. after the initial central evaluation) to
the end of this round's after_central_iteration callbacks. It holds the cohort's sampling and
local training, aggregation with the postprocessors (weighting, clipping, noise), the central
optimizer step and this round's central evaluation; also pfl's printing of the previous
round's metrics (which happens after the callbacks). In round 1 pfl also evaluates each
sampled client's data locally before and after training (its iteration-0 evaluation).

The last line on stdout is one JSON object (accuracy on the central test set, epsilon, delta,
noise_multiplier, wall_s, accounting, pfl_version, and the measurements round_seconds,
warm_s_per_round: the median of rounds 2.., time_to_first_round_s: from this script's first
statement, before the heavy imports, to the end of round 1, peak_rss_mb: this process's peak
resident memory); pfl's per-round metrics go to stderr.

Example:
    .venv-pfl/bin/python benchmarks/pfl_peer/run_pfl.py --data runs/pfl_peer/mnist-10k.npz \\
        --cohort-size 1000 --rounds 15 --epsilon 8 --delta 1e-5 --clip 1.0
    .venv-pfl/bin/python benchmarks/pfl_peer/run_pfl.py --data runs/pfl_peer/mnist-iid-1k.npz \\
        --model opacus-mnist --cohort-size 100 --rounds 6 --noise-multiplier 1.0 --clip 1.0 \\
        --local-epochs 1 --local-lr 0.5 --local-momentum 0 --local-batch-size 32 \\
        --central-eval-every 1 --threads 2
"""

# The clock below must start before the imports it measures, hence imports after code:
# ruff: noqa: E402
from __future__ import annotations

import time

STARTED = time.perf_counter()  # the script's first statement: time_to_first_round_s counts from it

import argparse
import contextlib
import functools
import json
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn


class PflModule(nn.Module):
    """The ``loss`` and ``metrics`` methods pfl's PyTorchModel asks of a torch module."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        """Mean cross-entropy of a batch (the loss pfl's local SGD minimises)."""
        self.train(not eval)
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:
        """Summed loss and correct predictions, weighted by the batch size."""
        from pfl.metrics import Weighted

        self.train(not eval)
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(-1) == y).sum().item()
        return {"loss": Weighted(loss, len(y)), "accuracy": Weighted(correct, len(y))}


class SmallCNN(PflModule):
    """pollinate's built-in `cnn` (pollinate/models/builtin.py), with pfl's loss/metrics."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class OpacusMnistCNN(PflModule):
    """pollinate's built-in `opacus-mnist` (pollinate/models/builtin.py: the CNN of Opacus'
    MNIST example, 28x28 inputs, 26,010 parameters), with pfl's loss/metrics."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 1)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 1)
        x = nn.functional.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # type: ignore[no-any-return]


MODELS: dict[str, type[PflModule]] = {"cnn": SmallCNN, "opacus-mnist": OpacusMnistCNN}


@dataclass(frozen=True)
class Federation:
    """The exported clients and the central test set (see export_data.py)."""

    users: dict[int, tuple[torch.Tensor, torch.Tensor]]
    population: int
    num_classes: int
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_federation(path: Path) -> Federation:
    with np.load(path) as data:
        x, y, client = data["x_train"], data["y_train"], data["client"]
        population = int(data["num_clients"]) if "num_clients" in data else len(np.unique(client))
        x_test, y_test = data["x_test"], data["y_test"]
    order = np.argsort(client, kind="stable")
    ids, starts = np.unique(client[order], return_index=True)
    x_t, y_t = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    bounds = [*starts.tolist(), len(order)]
    users = {int(c): (x_t[a:b], y_t[a:b]) for c, a, b in zip(ids, bounds, bounds[1:], strict=False)}
    classes = int(max(y.max(), y_test.max())) + 1
    test = torch.from_numpy(x_test), torch.from_numpy(y_test)
    return Federation(users, population, classes, *test)


class CohortSampler:
    """pfl user sampler (``() -> user_id``): a fixed-size cohort drawn uniformly without
    replacement, served in order; pfl asks for exactly ``cohort_size`` users a round."""

    def __init__(self, user_ids: list[int], cohort_size: int, seed: int) -> None:
        self._ids, self._size = np.asarray(user_ids), cohort_size
        self._rng = np.random.default_rng([seed, 1])
        self._queue: list[int] = []

    def __call__(self) -> int:
        if not self._queue:
            self._queue = self._rng.choice(self._ids, self._size, replace=False).tolist()[::-1]
        return self._queue.pop()


def central_privacy(args: argparse.Namespace, population: int) -> tuple[Any, float, str]:
    """pfl's central Gaussian mechanism, its noise multiplier and how it was accounted."""
    from pfl.privacy import (
        CentrallyAppliedPrivacyMechanism,
        GaussianMechanism,
        NoPrivacy,
        PLDPrivacyAccountant,
        PRVPrivacyAccountant,
    )

    if args.noise_multiplier is not None:  # given: no accountant, no epsilon
        given = GaussianMechanism(
            clipping_bound=args.clip, relative_noise_stddev=args.noise_multiplier
        )
        accounting = (
            f"none: noise multiplier given (--noise-multiplier {args.noise_multiplier}), no "
            "accountant run and no epsilon computed; noise N(0, (z*clip)^2) on the sum of "
            "clipped updates, divided by cohort"
        )
        return CentrallyAppliedPrivacyMechanism(given), float(args.noise_multiplier), accounting
    if args.epsilon == 0:
        return NoPrivacy(), 0.0, "none: non-private FedAvg (no clipping, no noise)"
    q = args.cohort_size / population
    kind = {"pld": PLDPrivacyAccountant, "prv": PRVPrivacyAccountant}[args.accountant]
    try:
        accountant = kind(args.rounds, q, "gaussian", epsilon=args.epsilon, delta=args.delta)
    except (ValueError, AssertionError) as err:
        raise SystemExit(f"run_pfl: cannot calibrate the noise: {err}") from err
    mechanism = GaussianMechanism.from_privacy_accountant(accountant, clipping_bound=args.clip)
    accounting = (
        f"pfl {kind.__name__}: Poisson-subsampled Gaussian, q = cohort/population = "
        f"{args.cohort_size}/{population} = {q:.4g}, {args.rounds} compositions, add/remove "
        "one client (pfl's assumption; the simulation draws a fixed-size cohort without "
        "replacement); noise N(0, (z*clip)^2) on the sum of clipped updates, divided by cohort"
    )
    noise = float(accountant.noise_parameter)
    return CentrallyAppliedPrivacyMechanism(mechanism), noise, accounting


@dataclass
class Timing:
    """What the round clock saw: seconds of each round, and when round 1 ended."""

    round_seconds: list[float]
    first_round_end: float | None = None  # time.perf_counter()


def callbacks(
    args: argparse.Namespace, fed: Federation, eval_params: Any, timing: Timing
) -> list[Any]:
    """The central evaluation (when asked for) and, last, the round clock."""
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.metrics import Metrics, StringMetricName

    class EveryNthRound(CentralEvaluationCallback):  # type: ignore[misc]
        """pfl's central evaluation after rounds N, 2N, ... (1-based), and before training.

        pfl calls ``after_central_iteration`` with the 0-based iteration and skips iteration 0
        (it evaluated the initial model in ``on_train_begin``), so with frequency 1 the model
        after round 1 would go unevaluated and round 1 would time no evaluation. Passing the
        1-based round number evaluates after every N-th round, as pollinate does (N = 1:
        round 0, i.e. before training, then after every round). pfl reports the initial
        evaluation with round 1's metrics, so its names get a suffix to stay distinct.
        """

        def on_train_begin(self, *, model: Any) -> Any:
            initial = Metrics()
            for name, value in super().on_train_begin(model=model):
                initial[StringMetricName(f"{name} (before training)")] = value
            return initial

        def after_central_iteration(
            self, aggregate_metrics: Any, model: Any, *, central_iteration: int
        ) -> tuple[bool, Any]:
            return super().after_central_iteration(  # type: ignore[no-any-return]
                aggregate_metrics, model, central_iteration=central_iteration + 1
            )

    class RoundClock(TrainingProcessCallback):  # type: ignore[misc]
        """Wall seconds between the ends of consecutive rounds' callbacks (it runs last)."""

        def __init__(self) -> None:
            self._last = 0.0

        def on_train_begin(self, *, model: Any) -> Any:
            self._last = time.perf_counter()
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Any, model: Any, *, central_iteration: int
        ) -> tuple[bool, Any]:
            now = time.perf_counter()
            timing.round_seconds.append(now - self._last)
            if timing.first_round_end is None:
                timing.first_round_end = now
            self._last = now
            return False, Metrics()

    out: list[Any] = []
    if args.central_eval_every:
        test = Dataset(raw_data=[fed.x_test, fed.y_test])
        out.append(EveryNthRound(test, eval_params, frequency=args.central_eval_every))
    return [*out, RoundClock()]


def train(args: argparse.Namespace, fed: Federation, privacy: Any, timing: Timing) -> float:
    """Run pfl's FedAvg; return the final central test accuracy."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data import FederatedDataset
    from pfl.data.dataset import Dataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    module = MODELS[args.model](in_channels=int(fed.x_test.shape[1]), num_classes=fed.num_classes)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=functools.partial(torch.optim.SGD, momentum=args.local_momentum),
        central_optimizer=torch.optim.SGD(module.parameters(), lr=args.server_lr),
    )
    sampler = CohortSampler(sorted(fed.users), args.cohort_size, args.seed)
    clients = FederatedDataset.from_slices(fed.users, sampler)
    backend = SimulatedBackend(
        training_data=clients, val_data=clients, postprocessors=[WeightByUser(), privacy]
    )
    eval_params = NNEvalHyperParams(local_batch_size=1000)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=args.rounds + 1,  # only round 0 reports local metrics
            train_cohort_size=args.cohort_size,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=args.local_epochs,
            local_learning_rate=args.local_lr,
            local_batch_size=args.local_batch_size,
        ),
        model_eval_params=eval_params,
        callbacks=callbacks(args, fed, eval_params, timing),
    )
    metrics = model.evaluate(Dataset(raw_data=[fed.x_test, fed.y_test]), eval_params=eval_params)
    return float(metrics.to_simple_dict(to_lowercase=True)["accuracy"])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise SystemExit(f"run_pfl: {message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, required=True, help="the .npz of export_data.py")
    add("--model", choices=sorted(MODELS), default="cnn", help="which pollinate model (copied)")
    add("--cohort-size", type=int, default=1000)
    add("--rounds", type=int, default=15)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "--epsilon", type=float, default=None,
        help="calibrate the noise to (epsilon, --delta) over --rounds with --accountant "
        "(default 8); 0: non-private (no clipping, no noise)",
    )  # fmt: skip
    noise.add_argument(
        "--noise-multiplier", type=float, default=None, metavar="Z",
        help="central DP with this noise multiplier, no calibration and no epsilon reported "
        "(instead of --epsilon)",
    )  # fmt: skip
    add("--delta", type=float, default=1e-5)
    add("--clip", type=float, default=1.0, help="l2 bound of a client's model update")
    add("--accountant", choices=("pld", "prv"), default="pld", help="pfl's PLD or PRV")
    # Local training defaults: the client-level recipe of benchmarks/privacy_utility.py.
    add("--local-epochs", type=int, default=5)
    add("--local-lr", type=float, default=0.1)
    add("--local-momentum", type=float, default=0.9, help="SGD momentum, fresh each round")
    add("--local-batch-size", type=int, default=2)
    add("--server-lr", type=float, default=1.0, help="1.0: the model moves by the mean update")
    add("--central-eval-every", type=int, default=0, metavar="N",
        help="evaluate on the central test set before training and after every N-th round "
        "(timed as part of the round); 0: off, only the final evaluation")  # fmt: skip
    add("--seed", type=int, default=42, help="data order, cohorts, init and pfl's noise seeds")
    add("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.epsilon is None and args.noise_multiplier is None:
        args.epsilon = 8.0
    names = ("cohort_size", "rounds", "local_epochs", "local_batch_size", "threads")
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in names if getattr(args, n) < 1]
    if args.noise_multiplier is not None:
        if not (args.noise_multiplier > 0 and args.clip > 0):
            problems.append("--noise-multiplier needs a value > 0 and --clip > 0")
    elif args.epsilon < 0 or (args.epsilon > 0 and not (args.clip > 0 and 0 < args.delta < 1)):
        problems.append("DP needs --epsilon > 0, --clip > 0 and 0 < --delta < 1 (--epsilon 0: off)")
    if args.central_eval_every < 0:
        problems.append("--central-eval-every must be >= 0 (0: off)")
    if not args.data.is_file():
        problems.append(f"--data {args.data} is not a file; write it with export_data.py")
    if problems:
        parser.error("; ".join(problems))
    return args


def measurements(timing: Timing) -> dict[str, Any]:
    """Per-round seconds, their warm median, time to round 1 and this process's peak RSS."""
    rounds = timing.round_seconds
    first = timing.first_round_end
    return {
        "round_seconds": [round(r, 4) for r in rounds],
        "warm_s_per_round": round(statistics.median(rounds[1:]), 4) if len(rounds) > 1 else None,
        "time_to_first_round_s": None if first is None else round(first - STARTED, 3),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pfl.version

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # pfl seeds its samplers and per-round seeds from numpy's global
    start = time.perf_counter()
    try:
        fed = load_federation(args.data)
    except (OSError, KeyError, ValueError) as err:
        raise SystemExit(f"run_pfl: cannot read {args.data}: {err}") from None
    if args.cohort_size > len(fed.users):
        raise SystemExit(f"run_pfl: --cohort-size {args.cohort_size} > {len(fed.users)} clients")
    calibration_start = time.perf_counter()
    privacy, noise, accounting = central_privacy(args, fed.population)
    calibration_s = time.perf_counter() - calibration_start
    timing = Timing(round_seconds=[])
    try:
        with contextlib.redirect_stdout(sys.stderr):  # pfl prints each round's metrics
            accuracy = train(args, fed, privacy, timing)
    except Exception as err:  # one line for the benchmark driver, not a traceback
        print(f"run_pfl: training failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    private = args.noise_multiplier is not None or args.epsilon > 0
    result = {
        "accuracy": round(accuracy, 4),
        "epsilon": args.epsilon,
        "delta": args.delta if args.epsilon else None,
        "noise_multiplier": round(noise, 6),
        "clip": args.clip if private else None,
        "cohort_size": args.cohort_size,
        "population": fed.population,
        "rounds": args.rounds,
        "wall_s": round(time.perf_counter() - start, 2),
        "calibration_s": round(calibration_s, 2),
        "accounting": accounting,
        "pfl_version": pfl.version.__version__,
        "torch_version": torch.__version__,
        "model": args.model,
        "central_eval_every": args.central_eval_every,
        "threads": args.threads,
        **measurements(timing),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
