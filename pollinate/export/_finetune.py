"""The fine-tune after structured pruning: Adam, cosine schedule, optional distillation.

Removing channels changes a model's activations, so :mod:`pollinate.export._prune` fine-tunes
the smaller model on server-side data (never the split the export validates on). :func:`tuned`
tries each candidate learning rate on four fifths of that data and keeps the model with the
lower loss on the last fifth, so one default suits both a tiny CNN and a pruned ResNet.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["SupervisedLoss", "cross_entropy_loss", "tuned"]

#: Fine-tune batch size.
_BATCH = 32
#: Candidate learning rates, the better chosen on a fifth of the fine-tune data held out
#: (server-side data, never the test split): 1e-2 suits the tiny default CNN (3e-3 lost up
#: to a point there), 3e-3 the pruned ResNet (1e-2 scattered it from +1.7 to -1.1 points).
_LRS = (1e-2, 3e-3)
#: Distillation temperature and the weight of the distillation term in the fine-tune loss.
_TEMPERATURE = 4.0
_DISTILL_WEIGHT = 0.3

#: ``loss(outputs, targets)``: the supervised fine-tune loss of a batch (per-sample losses are
#: averaged). The default, :func:`cross_entropy_loss`, reads integer class labels.
SupervisedLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits ``(N, K)`` against integer labels ``(N,)``."""
    return nn.functional.cross_entropy(outputs, targets.long())


def _finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int,
    loss_fn: SupervisedLoss = cross_entropy_loss,
    lr: float = _LRS[-1],
) -> None:
    """Adam on (x, y) for ``epochs`` with ``loss_fn``; with a teacher, plus distillation."""
    xs = torch.tensor(np.asarray(x, dtype=np.float32))
    ys = torch.as_tensor(np.asarray(y))
    soft: torch.Tensor | None = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            soft = torch.log_softmax(teacher(xs) / _TEMPERATURE, dim=1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * math.ceil(len(xs) / _BATCH))
    )
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), _BATCH):
            idx = order[start : start + _BATCH]
            logits = student(xs[idx])
            loss = loss_fn(logits, ys[idx]).mean()
            if soft is not None:
                distill = nn.functional.kl_div(
                    torch.log_softmax(logits / _TEMPERATURE, dim=1),
                    soft[idx],
                    reduction="batchmean",
                    log_target=True,
                )
                loss = (1 - _DISTILL_WEIGHT) * loss + _DISTILL_WEIGHT * _TEMPERATURE**2 * distill
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
    student.eval()


def tuned(
    pruned: nn.Module,
    teacher: nn.Module | None,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    loss: SupervisedLoss,
) -> nn.Module:
    """The pruned model fine-tuned with each of :data:`_LRS` on four fifths of (x, y); the
    one with the lower loss on the last fifth (too few samples: the last rate on all)."""
    n = len(x)
    held = n // 5 if n >= 10 else 0
    if held == 0:
        _finetune(pruned, teacher, x, y, epochs=epochs, seed=seed, loss_fn=loss)
        return pruned
    order = np.random.default_rng(seed).permutation(n)
    fit, val = order[held:], order[:held]
    x_val = torch.tensor(np.asarray(x, dtype=np.float32)[val])
    y_val = torch.as_tensor(np.asarray(y)[val])
    best: tuple[float, nn.Module] | None = None
    for lr in _LRS:
        candidate = copy.deepcopy(pruned)
        _finetune(candidate, teacher, np.asarray(x)[fit], np.asarray(y)[fit], epochs=epochs,
                  seed=seed, loss_fn=loss, lr=lr)  # fmt: skip
        with torch.no_grad():
            score = float(loss(candidate(x_val), y_val).mean())
        if best is None or score < best[0]:
            best = (score, candidate)
    assert best is not None
    return best[1]
