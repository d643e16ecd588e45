"""One cohort's train jobs, from parsed requests to replies, on the fast engine.

The cohort trains together (:func:`pollinate.simulation.cohort.train_cohort`, ``torch.func``)
when the model allows it. A model ``torch.func`` cannot transform (data-dependent control
flow, ``.item()``, in-place tricks) trains one client at a time with Opacus instead: the
ClientApp's own :func:`pollinate.clientapp.training.train`, with the same seeds and noise
sources, so the results are the ClientApp's. One notice says so, once per model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, Context, Error, Message
from flwr.common.constant import ErrorCode

from pollinate.clientapp.jobs import TrainJob, finish_train
from pollinate.clientapp.training import TrainResult
from pollinate.clientapp.training import train as train_one
from pollinate.log import logger
from pollinate.models import build_model
from pollinate.simulation.cohort import CohortMember, train_cohort

__all__ = ["CohortTrainer", "error_reply"]

Cohort = list[tuple[TrainJob, Context]]


class CohortTrainer:
    """Trains cohorts, remembering which models must train client by client, and why.

    ``array`` wraps each array of a reply; the arrays it is handed are the cohort's own
    (``train_cohort``'s buffers, a per-client copy's state), so it may keep them uncopied.
    """

    def __init__(self, *, threads: int, array: Callable[[np.ndarray], Array]) -> None:
        self._threads = max(1, threads)
        self._array = array
        #: model spec -> why torch.func could not train it (the notice, shown once)
        self.per_client: dict[str, str] = {}

    def train(self, cohort: Cohort) -> list[Message]:
        """Train every job of ``cohort`` (one global model, one config); their replies."""
        first = cohort[0][0]
        task = first.task
        try:
            model = build_model(
                task.model, input_shape=task.input_shape, num_classes=task.num_outputs,
                fix=task.fix_model,
            )  # fmt: skip
            model.load_state_dict(first.msg.content.array_records["arrays"].to_torch_state_dict())
            # channels-last: the shared step's forward and backward run on the module's own
            # parameters, and CPU max-pooling is ~8x faster so (opacus-mnist, 100 clients x 4:
            # the clipped sums in 43 ms, not 52)
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        except Exception as err:
            logger.error("cohort of %d clients: cannot build the model: %s", len(cohort), err)
            return [error_reply(job.msg, err) for job, _ in cohort]
        results: list[tuple[TrainResult, dict[str, np.ndarray]] | Exception] | None = None
        if task.model not in self.per_client:
            members = [CohortMember(j.data.x, j.data.y, j.seed, j.noise) for j, _ in cohort]
            try:
                with _Threads(self._threads):
                    results = list(train_cohort(model, members, first.settings))
            except Exception as err:
                why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                self.per_client[task.model] = why
                logger.warning(
                    "the fast engine cannot vectorise model %r (%s); its clients train one "
                    "at a time with Opacus, as the ClientApp does",
                    task.model, why[:300],
                )  # fmt: skip
        if results is None:
            with _Threads(self._threads):
                results = [self._train_alone(model, job) for job, _ in cohort]
        replies = []
        for (job, context), outcome in zip(cohort, results, strict=True):
            if isinstance(outcome, Exception):
                replies.append(error_reply(job.msg, outcome))
                continue
            result, state = outcome
            try:
                replies.append(finish_train(job, context, result, state, array=self._array))
            except Exception as err:
                replies.append(error_reply(job.msg, err))
        return replies

    @staticmethod
    def _train_alone(
        model: torch.nn.Module, job: TrainJob
    ) -> tuple[TrainResult, dict[str, np.ndarray]] | Exception:
        """The ClientApp's training of one client, on its own copy of the global model."""
        # the ClientApp's layout (the cohort's model is channels-last)
        own = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        try:
            result = train_one(
                own, job.data.x, job.data.y, seed=job.seed, noise=job.noise,
                **job.settings.kwargs(),
            )  # fmt: skip
        except Exception as err:
            return err
        return result, {k: v.detach().cpu().numpy() for k, v in own.state_dict().items()}


def error_reply(msg: Message, err: BaseException) -> Message:
    """The reply of a client whose step raised (as Flower's ClientApp runner makes it)."""
    reason = f"{type(err).__name__}: {err}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


class _Threads:
    """Use ``n`` torch threads inside the block."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._before = 1

    def __enter__(self) -> None:
        self._before = torch.get_num_threads()
        torch.set_num_threads(self._n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._before)
