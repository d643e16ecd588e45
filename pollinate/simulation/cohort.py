"""Local training of a whole cohort of clients at once: the fast path's arithmetic.

Each client in a round starts from the same global model and trains on its own data with
its own seed. Instead of one model, one optimizer and one Opacus engine per client, the
cohort keeps every client's parameters stacked along a leading axis and takes all clients'
steps together with ``torch.func``: ``vmap`` over clients of ``vmap`` over samples of
``grad`` gives per-sample gradients for everyone in one call.

The semantics are those of :func:`pollinate.clientapp.training.train` with Opacus, step for step:

- DP-SGD: Poisson sampling with rate ``q = 1 / ceil(n / B)`` for ``ceil(n / B) * epochs``
  steps; each sample's gradient clipped to ``C`` with Opacus' factor
  ``min(1, C / (norm + 1e-6))``; Gaussian noise of std ``sigma * C`` on the sum; division by
  Opacus' expected batch size ``int(n * q)``; an empty batch is a noise-only step.
- Without DP: shuffled minibatches of ``min(B, n)`` per epoch, mean loss.
- SGD with momentum (PyTorch's update rule), FedProx's proximal term (added to the
  gradient without DP; applied as a separate, data-independent step with DP, because a
  proximal gradient never passes through per-sample clipping).

Every client draws its own randomness, so a client's training does not depend on who else is
in the cohort. Without DP its shuffling follows its ``seed``; with DP its Poisson sampling and
noise come from its :class:`~pollinate.privacy.noise.NoiseSource` (a fresh CSPRNG seed per
step, never the run seed). Only aggregates (mean loss, accuracy) leave this module; never
per-example values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pollinate.clientapp.training import TrainResult, TrainSettings, dp_plan
from pollinate.log import logger
from pollinate.privacy.noise import gaussian_into
from pollinate.simulation._cohort_data import (
    CohortMember,
    Group,
    by_slot,
    chunk_size,
    gather,
    make_group,
    pad,
    poisson_batch,
)
from pollinate.simulation._per_sample import HookedPerSample, hookable
from pollinate.simulation._runtime import in_parallel

__all__ = ["CohortMember", "train_cohort"]

Params = dict[str, torch.Tensor]


def _batches(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


#: the most memory the per-sample gradients of one chunk of the cohort may take. Small chunks
#: cost nothing: 100 clients x 4 samples of the 1.27 M-parameter resnet took 8.9 s a round with
#: 1 GiB (3.5 GB peak RSS), 6.3-6.8 s with 64-256 MiB (1.2-1.7 GB); a model of 26 k parameters
#: still trains 160 such clients per chunk
MEMORY_BUDGET_BYTES = 64 << 20


def train_cohort(
    model: nn.Module,
    members: Sequence[CohortMember],
    settings: TrainSettings,
    *,
    memory_budget: int = MEMORY_BUDGET_BYTES,
) -> list[tuple[TrainResult, dict[str, np.ndarray]]]:
    """Train a copy of ``model`` for every member; return (result, new state) per member.

    ``model`` holds the global parameters and is not changed. Members without data get an
    empty :class:`TrainResult` and the global state back. The returned arrays may be views
    into buffers of this call (nothing else uses them): copy what must outlive the caller.

    Members train in chunks whose per-sample gradients fit ``memory_budget`` bytes (a
    member's training does not depend on who else is in its chunk), so a model with millions
    of parameters trains a large cohort in bounded memory.
    """
    # contiguous whatever the module's layout (channels-last): the members' arrays are views
    global_params = {
        k: v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in model.named_parameters()
    }
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    out: list[tuple[TrainResult, dict[str, np.ndarray]] | None] = [None] * len(members)
    groups: dict[int, list[int]] = {}
    for i, member in enumerate(members):
        n = len(member.y)
        if n == 0:
            state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            out[i] = (TrainResult(0.0, 0.0, 0, 0.0, 0), state)
            continue
        groups.setdefault(_batches(n, settings.batch_size), []).append(i)
    trainer = _Trainer(model, global_params, buffers, settings)
    numel = sum(int(p.numel()) for p in global_params.values())
    for steps_per_epoch, index in sorted(groups.items()):
        width = chunk_size(members, index, settings, numel, memory_budget)
        for start in range(0, len(index), width):
            chunk = index[start : start + width]
            group = make_group(members, chunk, steps_per_epoch, settings.task.target_dtype)
            for i, result in zip(chunk, trainer.run(group), strict=True):
                out[i] = result
    return [r for r in out if r is not None]


class _Trainer:
    """The vectorised step functions for one model architecture."""

    def __init__(
        self, model: nn.Module, global_params: Params, buffers: Params, settings: TrainSettings
    ) -> None:
        self.model = model
        self.global_params = global_params
        self.buffers = buffers
        self.settings = settings
        self.was_training = model.training
        task = settings.task
        # state-dict keys -> the parameter or buffer each one holds: a module may list one
        # tensor under two keys (Opacus' DPLSTM keeps torch.nn.LSTM's names beside its own),
        # and a reply must carry every key for the server's strict load_state_dict
        names = {id(t): k for k, t in model.named_parameters()}
        names.update({id(t): k for k, t in model.named_buffers()})
        self.state_keys = {k: names[id(t)] for k, t in model.state_dict(keep_vars=True).items()}

        def sample_loss(
            params: Params, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            loss = task.sample_losses(logits, y.unsqueeze(0)).sum()
            return loss, (loss.detach(), logits.squeeze(0).detach())

        def batch_loss(
            params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            logits = functional_call(model, (params, buffers), (x,))
            losses = task.sample_losses(logits, y)
            return (losses * w).sum() / w.sum().clamp(min=1.0), (losses, logits)

        # per client (dim 0) and per sample (dim 1): per-sample gradients of every client
        self.per_sample: Callable[..., Any] = vmap(
            vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0)), in_dims=(0, 0, 0)
        )
        # the same while every client still holds the global model (each one's first step):
        # one batch of all clients' samples against one set of parameters
        self.per_sample_shared: Callable[..., Any] = vmap(
            grad(sample_loss, has_aux=True), in_dims=(None, 0, 0)
        )
        # per client: the gradient of its (masked) mean loss
        self.per_client: Callable[..., Any] = vmap(
            grad(batch_loss, has_aux=True), in_dims=(0, 0, 0, 0)
        )
        self.per_client_shared: Callable[..., Any] = vmap(
            grad(batch_loss, has_aux=True), in_dims=(None, 0, 0, 0)
        )
        #: the shared step by plain autograd where the layers allow (see _per_sample)
        self.hooked = HookedPerSample(model, task.sample_losses) if hookable(model) else None

    def run(self, group: Group) -> list[tuple[TrainResult, dict[str, np.ndarray]]]:
        s = self.settings
        size = len(group.index)
        params = {
            k: v.unsqueeze(0).repeat(size, *([1] * v.dim())) for k, v in self.global_params.items()
        }
        momentum: Params | None = None
        shared = True  # every member still holds the global parameters
        loss_sum = torch.zeros(size, dtype=torch.float64)
        correct = torch.zeros(size, dtype=torch.int64)
        seen = torch.zeros(size, dtype=torch.int64)
        # with DP: Poisson rate 1 / ceil(n / B) and Opacus' int(1 / rate) steps per epoch
        rate, dp_steps = dp_plan(group.steps_per_epoch, 1)
        steps = (dp_steps if s.dp else group.steps_per_epoch) * s.epochs
        step = 0
        if s.dp:
            expected = torch.floor(group.n.to(torch.float64) * rate).clamp(min=1.0)
        self.model.train()
        try:
            for _ in range(s.epochs):
                batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                if s.dp:
                    batches = self._poisson_steps(group, rate, dp_steps, first=step)
                else:
                    batches = iter(self._shuffled(group))
                for idx, valid in batches:
                    if s.dp:
                        grads, losses, logits = self._private_grads(
                            params, group, idx, valid, expected, shared=shared, step=step
                        )
                    else:
                        grads, losses, logits = self._plain_grads(
                            params, group, idx, valid, shared=shared
                        )
                    params, momentum = self._step(params, grads, momentum)
                    shared = False
                    step += 1
                    if idx.shape[1]:
                        labels = torch.gather(group.y, 1, idx)
                        vf = valid.to(torch.float64)
                        loss_sum += (losses.detach().to(torch.float64) * vf).sum(1)
                        right = s.task.correct(logits.detach(), labels)
                        correct += (right & valid).sum(1)
                        seen += valid.sum(1)
        finally:
            self.model.train(self.was_training)
        results = []
        # views: see train_cohort; numpy rows, as a torch index per row and key costs more
        stacked = {k: v.numpy() for k, v in params.items()}
        shared_buffers = {k: v.numpy() for k, v in self.buffers.items()}
        n_list, seen_list = group.n.tolist(), seen.tolist()
        loss_list, correct_list = loss_sum.tolist(), correct.tolist()
        for row in range(size):
            n_seen = seen_list[row]
            result = TrainResult(
                loss=loss_list[row] / n_seen if n_seen else math.nan,
                accuracy=(correct_list[row] / n_seen if n_seen else 0.0)
                if s.task.has_accuracy
                else math.nan,
                steps=steps,
                sample_rate=rate if s.dp else min(1.0, s.batch_size / n_list[row]),
                num_examples=n_list[row],
            )
            own = {k: v[row] for k, v in stacked.items()}
            own.update(shared_buffers)
            results.append((result, {key: own[name] for key, name in self.state_keys.items()}))
        return results

    # ------------------------------------------------------------ batches

    def _poisson_steps(
        self, group: Group, rate: float, count: int, *, first: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The Poisson batches of steps ``first .. first + count - 1``, drawn step by step."""
        for k in range(count):
            yield poisson_batch(group, rate, first + k)

    def _shuffled(self, group: Group) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of consecutive ``min(B, n)`` chunks of a random permutation per member."""
        per_member = []
        for row, gen in enumerate(group.generators):
            n = int(group.n[row])
            order = torch.randperm(n, generator=gen)
            size = min(self.settings.batch_size, n)
            per_member.append([order[i : i + size] for i in range(0, n, size)])
        steps = max(len(chunks) for chunks in per_member)
        empty = torch.zeros(0, dtype=torch.int64)
        return [
            pad([chunks[step] if step < len(chunks) else empty for chunks in per_member])
            for step in range(steps)
        ]

    # ------------------------------------------------------------ gradients

    def _private_grads(
        self,
        params: Params,
        group: Group,
        idx: torch.Tensor,
        valid: torch.Tensor,
        expected: torch.Tensor,
        *,
        shared: bool,
        step: int,
    ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Clipped, noised, scaled gradient per member (``shared``: all hold the global model)."""
        s = self.settings
        size = len(group.index)
        if idx.shape[1]:
            xb = gather(group.x, idx)
            yb = torch.gather(group.y, 1, idx)
            x_all, y_all, clip = xb.flatten(0, 1), yb.flatten(), s.max_grad_norm
            hooked = None
            if shared and self.hooked is not None:  # clipped sums, in one pass
                hooked = self._hooked(lambda h: h.clipped_sums(x_all, y_all, valid, clip))
            if hooked is not None:
                summed = hooked[0]
                losses, logits = by_slot(hooked[1], idx), by_slot(hooked[2], idx)
            else:
                if shared:
                    flat, (losses, logits) = self.per_sample_shared(
                        self.global_params, x_all, y_all
                    )
                    per_sample = {k: by_slot(g, idx) for k, g in flat.items()}
                    losses, logits = by_slot(losses, idx), by_slot(logits, idx)
                else:
                    per_sample, (losses, logits) = self.per_sample(params, xb, yb)
                norms = torch.zeros(idx.shape, dtype=torch.float32)
                for g in per_sample.values():
                    norms += torch.linalg.vector_norm(g.reshape(*idx.shape, -1), dim=-1).square()
                factor = (s.max_grad_norm / (norms.sqrt() + 1e-6)).clamp(max=1.0) * valid
                summed = {
                    k: torch.einsum("cb,cb...->c...", factor, g) for k, g in per_sample.items()
                }
        else:  # every member drew an empty batch: noise only
            summed = {k: torch.zeros_like(v) for k, v in params.items()}
            losses = logits = torch.zeros(0)
        noise = self._noise(group, params, s.noise_multiplier * s.max_grad_norm, step)
        scale = expected.to(torch.float32)
        grads = {
            k: total.add_(noise[k]).div_(scale.view(size, *([1] * (total.dim() - 1))))
            for k, total in summed.items()
        }
        return grads, losses, logits

    def _hooked(
        self, call: Callable[[HookedPerSample], tuple[Params, torch.Tensor, torch.Tensor]]
    ) -> tuple[Params, torch.Tensor, torch.Tensor] | None:
        """``call`` on the plain-autograd path; None (and torch.func from now on) where the
        model defeats it (a layer called twice)."""
        assert self.hooked is not None
        try:
            return call(self.hooked)
        except RuntimeError as err:
            logger.debug("per-sample gradients by torch.func: %s", err)
            self.hooked = None
            return None

    def _noise(self, group: Group, params: Params, std: float, step: int) -> Params:
        """Gaussian noise per member from its own secret source, laid out like ``params``.

        Each member's row is drawn from its own generator (so its noise does not depend on
        who else is in the cohort), rows split over torch's threads: drawing is serial within
        one generator, and four normal draws per value make it the step's largest cost after
        the per-sample gradients."""
        numel = sum(int(v[0].numel()) for v in params.values())
        flat = torch.empty((len(group.sources), numel), dtype=torch.float32)

        def fill(rows: range) -> None:
            for row in rows:
                gaussian_into(flat[row], std, group.sources[row].generator(step=step))

        in_parallel(fill, len(group.sources))
        out: Params = {}
        offset = 0
        for k, v in params.items():
            count = int(v[0].numel())
            out[k] = flat[:, offset : offset + count].reshape(v.shape)
            offset += count
        return out

    def _plain_grads(
        self,
        params: Params,
        group: Group,
        idx: torch.Tensor,
        valid: torch.Tensor,
        *,
        shared: bool,
    ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        s = self.settings
        xb = gather(group.x, idx)
        yb = torch.gather(group.y, 1, idx)
        weights = valid.to(torch.float32)
        hooked = None
        if shared and self.hooked is not None:  # each member's masked mean, in one pass
            mean = weights / weights.sum(1, keepdim=True).clamp(min=1.0)
            hooked = self._hooked(lambda h: h(xb.flatten(0, 1), yb.flatten(), mean))
        if hooked is not None:
            grads, losses, logits = hooked[0], by_slot(hooked[1], idx), by_slot(hooked[2], idx)
        elif shared:
            grads, (losses, logits) = self.per_client_shared(self.global_params, xb, yb, weights)
        else:
            grads, (losses, logits) = self.per_client(params, xb, yb, weights)
        if s.proximal_mu > 0:
            for k, g in grads.items():
                g.add_(params[k] - self.global_params[k], alpha=s.proximal_mu)
        return grads, losses, logits

    # ------------------------------------------------------------ update

    def _step(
        self, params: Params, grads: Params, momentum: Params | None
    ) -> tuple[Params, Params | None]:
        s = self.settings
        if s.momentum > 0:
            if momentum is None:
                momentum = {k: g.clone() for k, g in grads.items()}
            else:
                momentum = {k: momentum[k].mul_(s.momentum).add_(g) for k, g in grads.items()}
            direction = momentum
        else:
            direction = grads
        for k, p in params.items():  # every tensor here is this cohort's own: update in place
            p.sub_(direction[k], alpha=s.learning_rate)
            if s.dp and s.proximal_mu > 0:
                p.sub_(p - self.global_params[k], alpha=s.learning_rate * s.proximal_mu)
        return params, momentum
