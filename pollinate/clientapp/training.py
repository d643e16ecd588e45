"""Local training and evaluation of one client: plain SGD or Opacus DP-SGD.

Pure torch/Opacus, no Flower: the ClientApp and tests call these directly.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pollinate.privacy.noise import NOISE_STREAM, SAMPLING_STREAM, NoiseSource, derive_seed
from pollinate.tasks import CLASSIFICATION, Task

__all__ = [
    "EvalResult",
    "TrainResult",
    "TrainSettings",
    "dp_plan",
    "evaluate",
    "seed_for",
    "train",
]


@dataclass(frozen=True)
class TrainSettings:
    """How a client trains locally: the keyword arguments of :func:`train` but the seed.

    The in-process simulation trains a whole cohort with one of these
    (:func:`pollinate.simulation.cohort.train_cohort`).
    """

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0
    task: Task = CLASSIFICATION
    physical_batch_size: int = 0

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :func:`train` (the task stays a Task)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TrainResult:
    """What one local training produced (aggregates only, never per-example values);
    ``accuracy`` is NaN for a regression task."""

    loss: float
    accuracy: float
    steps: int
    sample_rate: float
    num_examples: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a dataset (accuracy NaN for regression), and with
    ``metrics=True`` every metric of the task (:meth:`pollinate.tasks.Task.evaluate`)."""

    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


#: A 63-bit seed derived from integers (run seed, round, client): splits, init, shuffling.
seed_for = derive_seed


def dp_plan(n: int, batch_size: int) -> tuple[float, int]:
    """DP-SGD's Poisson rate and steps per epoch for ``n`` samples, exactly as Opacus runs them.

    The rate is ``1 / ceil(n / B)``; Opacus' sampler takes ``int(1 / rate)`` steps, which the
    floating-point division makes one fewer than ``ceil(n / B)`` for some sizes (93 batches
    give 92 steps). Planning, the fast engine and the accountant all use this one count.
    """
    batches = max(1, math.ceil(n / batch_size))
    rate = 1.0 / batches
    return rate, int(1 / rate)


def _loader(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, task: Task
) -> DataLoader[tuple[torch.Tensor, ...]]:
    dataset = TensorDataset(
        torch.from_numpy(np.array(x, dtype=np.float32)),
        torch.from_numpy(np.array(y, dtype=task.target_dtype)),
    )
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=shuffle)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.0,
    dp: bool,
    noise_multiplier: float = 0.0,
    max_grad_norm: float = 1.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    noise: NoiseSource | None = None,
    task: Task = CLASSIFICATION,
    physical_batch_size: int = 0,
) -> TrainResult:
    """Train ``model`` in place on (x, y).

    With ``dp=True`` this is DP-SGD through Opacus: Poisson sampling with rate
    ``1 / ceil(n / batch_size)``, per-sample clipping to ``max_grad_norm`` and Gaussian noise
    ``noise_multiplier * max_grad_norm`` on every step. ``steps`` and ``sample_rate`` in the
    result are exactly what the privacy accountant must record.

    ``task`` gives the loss (cross-entropy, binary cross-entropy, squared error or the user's
    hook; the mean over the batch) and the targets' type.

    ``physical_batch_size`` (> 0) is gradient accumulation: each (logical, Poisson-sampled)
    batch goes through forward and backward in pieces of at most that many samples and the
    optimizer steps once per logical batch, so memory is bounded by the physical size while the
    sample rate, the clipping and the noise are the logical batch's (0: no splitting).

    ``seed`` fixes the non-private randomness only (shuffling without DP). The Poisson
    sampling and the noise of DP-SGD come from ``noise``: a fresh CSPRNG seed before every
    step by default (:class:`~pollinate.privacy.noise.NoiseSource`), never from ``seed``.
    """
    torch.manual_seed(seed)
    source = noise if noise is not None else NoiseSource.secure()
    n = len(y)
    if n == 0:
        return TrainResult(0.0, 0.0, 0, 0.0, 0)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    loader = _loader(x, y, batch_size, shuffle=True, task=task)
    sample_rate = 1.0
    train_model: nn.Module = model
    if dp:
        from opacus import PrivacyEngine

        # Opacus warns on every empty Poisson batch; with a few samples per client that is
        # expected and handled below (a noise-only step), so keep its logger to errors.
        logging.getLogger("opacus.data_loader").setLevel(logging.ERROR)

        model.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
            train_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
            )
        # the rate Opacus samples with (1 / ceil(n / B)); len(loader) is int(1 / rate) steps,
        # one fewer than ceil(n / B) for some n, so 1 / len(loader) would overstate it
        sample_rate = float(loader.sample_rate)
        _use_secret_randomness(optimizer, loader)
    else:
        sample_rate = min(1.0, batch_size / n)
    train_model.train()
    with warnings.catch_warnings():
        # Opacus' hooks fire on the first layer, whose input needs no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        steps, loss_sum, correct, seen = _epochs(
            train_model, model, optimizer, loader, task, epochs, global_params, proximal_mu,
            private=dp, learning_rate=learning_rate, noise=source, physical=physical_batch_size,
        )  # fmt: skip
    if dp:
        # Drop Opacus' hooks so the caller gets back a plain module.
        train_model._close()  # type: ignore[operator]
    return TrainResult(
        loss=loss_sum / seen if seen else math.nan,
        accuracy=(correct / seen if seen else 0.0) if task.has_accuracy else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        num_examples=n,
    )


def _epochs(
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    task: Task,
    epochs: int,
    global_params: list[torch.Tensor],
    proximal_mu: float,
    *,
    private: bool,
    learning_rate: float,
    noise: NoiseSource,
    physical: int = 0,
) -> tuple[int, float, int, int]:
    """The local epochs; FedProx's proximal term is part of the loss without DP.

    With DP the proximal pull towards the global model is a separate step after each
    optimizer step: Opacus builds the update from clipped per-sample gradients only, so a
    proximal term in the loss would be silently dropped. It uses no data, so it costs no
    privacy.
    """
    steps = 0
    loss_sum = 0.0
    correct = 0
    seen = 0
    reseed = _reseeder(optimizer, loader, noise) if private else None
    for _ in range(epochs):
        if reseed is not None:
            reseed(steps)  # the Poisson draw of this epoch's first step
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if reseed is not None:
                reseed(steps, sampling=False)
            if len(yb) == 0:
                # Poisson sampling drew an empty batch: the step is pure noise and still counts.
                _empty_grad_samples(model)
                optimizer.step()
                if global_params and private:
                    _proximal_step(model, global_params, learning_rate * proximal_mu)
                steps += 1
                if reseed is not None:
                    reseed(steps)
                continue
            size = physical if 0 < physical < len(yb) else len(yb)
            for start in range(0, len(yb), size):  # gradient accumulation over the pieces
                xp, yp = xb[start : start + size], yb[start : start + size]
                if private and start > 0:
                    # Opacus clipped and summed the last piece in a skipped step; its
                    # per-sample gradients go, the running sum stays (BatchMemoryManager's way)
                    optimizer.zero_grad(set_to_none=True)
                out = train_model(xp)
                data_loss = task.sample_losses(out, yp).mean()
                # the piece's share of the batch mean (Opacus: per-sample grads of each piece)
                loss = data_loss if private else data_loss * (len(yp) / len(yb))
                if global_params and not private and start == 0:
                    prox = sum(
                        ((p - g) ** 2).sum()
                        for p, g in zip(model.parameters(), global_params, strict=True)
                    )
                    loss = loss + 0.5 * proximal_mu * prox
                loss.backward()  # type: ignore[no-untyped-call]
                loss_sum += float(data_loss.detach()) * len(yp)
                correct += int(task.correct(out.detach(), yp).sum())
                if private and start + size < len(yb):
                    optimizer.signal_skip_step(do_skip=True)  # type: ignore[attr-defined]
                    optimizer.step()
            seen += len(yb)
            optimizer.step()
            if global_params and private:
                _proximal_step(model, global_params, learning_rate * proximal_mu)
            steps += 1
            if reseed is not None:
                reseed(steps)
    return steps, loss_sum, correct, seen


def _use_secret_randomness(
    optimizer: torch.optim.Optimizer, loader: DataLoader[tuple[torch.Tensor, ...]]
) -> None:
    """Give Opacus' optimizer and Poisson sampler their own generators (reseeded per step).

    ``secure_mode`` on the optimizer selects Opacus' floating-point-safe Gaussian sampler
    (four draws summed and halved); the generator it draws from is reseeded from the
    operating system's CSPRNG before every step (see :mod:`pollinate.privacy.noise`).
    """
    optimizer.generator = torch.Generator()  # type: ignore[attr-defined]
    optimizer.secure_mode = True  # type: ignore[attr-defined]
    sampler = loader.batch_sampler
    if sampler is None or not hasattr(sampler, "generator"):
        raise RuntimeError("Opacus' Poisson loader has no sampler generator to make secret")
    sampler.generator = torch.Generator()


def _reseeder(
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    noise: NoiseSource,
) -> Callable[..., None]:
    """``reseed(step, sampling=True)``: the sampler (and noise) generators for ``step``."""
    noise_gen: torch.Generator = optimizer.generator  # type: ignore[attr-defined]
    sampling_gen: torch.Generator = loader.batch_sampler.generator  # type: ignore[union-attr]

    def reseed(step: int, *, sampling: bool = True) -> None:
        if sampling:
            noise.reseed(sampling_gen, step=step, stream=SAMPLING_STREAM)
        else:
            noise.reseed(noise_gen, step=step, stream=NOISE_STREAM)

    return reseed


@torch.no_grad()
def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], rate: float) -> None:
    """Move every parameter ``rate`` of the way back towards the global model."""
    for param, start in zip(model.parameters(), global_params, strict=True):
        param.sub_(rate * (param - start))


def _empty_grad_samples(model: nn.Module) -> None:
    """Per-sample gradients of an empty batch, so Opacus clips nothing and adds only noise."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad_sample = param.new_zeros((0, *param.shape))  # type: ignore[attr-defined]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 128,
    task: Task = CLASSIFICATION,
    metrics: bool = False,
) -> EvalResult:
    """Mean loss and accuracy of ``model`` on (x, y) for ``task``; with ``metrics``, every
    metric of the task too (central evaluation).

    Image batches go in channels-last; a model converted with
    ``model.to(memory_format=torch.channels_last)`` then runs without layout conversions.
    """
    n = len(y)
    if n == 0:
        return EvalResult(math.nan, 0.0 if task.has_accuracy else math.nan, 0)
    model.eval()
    loss_sum = 0.0
    correct = 0
    outputs: list[np.ndarray] = []
    # slices of two tensors, not a DataLoader: its per-sample indexing and collation cost
    # more than the forward pass of a small model
    x_all = torch.from_numpy(np.array(x, dtype=np.float32))
    y_all = torch.from_numpy(np.array(y, dtype=task.target_dtype))
    for start in range(0, n, batch_size):
        xb, yb = x_all[start : start + batch_size], y_all[start : start + batch_size]
        if xb.dim() == 4:  # images: as fast or faster channels-last, much for some convs
            xb = xb.contiguous(memory_format=torch.channels_last)
        out = model(xb)
        loss_sum += float(task.sample_losses(out, yb).sum())
        correct += int(task.correct(out, yb).sum())
        if metrics:
            outputs.append(out.numpy())
    accuracy = correct / n if task.has_accuracy else math.nan
    found = task.evaluate(np.concatenate(outputs), np.asarray(y)) if metrics else {}
    return EvalResult(loss=loss_sum / n, accuracy=accuracy, num_examples=n, metrics=found)
