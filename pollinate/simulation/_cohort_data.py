"""The cohort's data: its members, groups of members trained side by side, and batches.

Tensors here are laid out with the member first: ``x[c, i]`` is sample ``i`` of member ``c``,
zero-padded to the longest member of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pollinate.clientapp.training import TrainSettings
from pollinate.privacy.noise import NoiseSource

__all__ = [
    "CohortMember", "Group", "by_slot", "chunk_size", "gather", "make_group", "pad",
    "poisson_batch",
]  # fmt: skip


@dataclass(frozen=True)
class CohortMember:
    """One client of the cohort: its local data, its seed and DP randomness for this round."""

    x: np.ndarray
    y: np.ndarray
    seed: int
    noise: NoiseSource = field(default_factory=NoiseSource.secure)


@dataclass
class Group:
    """Members with the same number of steps, trained side by side."""

    index: list[int]
    n: torch.Tensor  # (G,) samples per member
    x: torch.Tensor  # (G, n_max, *shape), zero-padded
    y: torch.Tensor  # (G, n_max): int64 classes or float32 targets
    steps_per_epoch: int
    generators: list[torch.Generator]
    sources: list[NoiseSource]


def chunk_size(
    members: Sequence[CohortMember],
    index: list[int],
    settings: TrainSettings,
    numel: int,
    budget: int,
) -> int:
    """Members per chunk: per-sample gradients (float32, ``numel`` each) of a batch of up to
    twice the batch size (Poisson batches vary), or one gradient per member without DP."""
    n_max = max(len(members[i].y) for i in index)
    per_member = 4 * numel * (min(n_max, 2 * settings.batch_size) if settings.dp else 2)
    return max(1, min(len(index), budget // max(1, per_member)))


_CLASSES = np.dtype(np.int64)


def make_group(
    members: Sequence[CohortMember],
    index: list[int],
    steps_per_epoch: int,
    target_dtype: np.dtype[Any] = _CLASSES,
) -> Group:
    sizes = [len(members[i].y) for i in index]
    n_max = max(sizes)
    shape = members[index[0]].x.shape[1:]
    x = torch.zeros((len(index), n_max, *shape), dtype=torch.float32)
    y = torch.zeros((len(index), n_max), dtype=torch.from_numpy(np.zeros(0, target_dtype)).dtype)
    for row, i in enumerate(index):
        x[row, : sizes[row]] = torch.from_numpy(np.asarray(members[i].x, dtype=np.float32))
        y[row, : sizes[row]] = torch.from_numpy(np.asarray(members[i].y, dtype=target_dtype))
    generators = [torch.Generator().manual_seed(members[i].seed) for i in index]
    sources = [members[i].noise for i in index]
    return Group(
        index=index,
        n=torch.tensor(sizes, dtype=torch.int64),
        x=x,
        y=y,
        steps_per_epoch=steps_per_epoch,
        generators=generators,
        sources=sources,
    )


def pad(picks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists of different lengths as one (members, longest) index and validity mask."""
    width = max((len(p) for p in picks), default=0)
    idx = torch.zeros((len(picks), width), dtype=torch.int64)
    valid = torch.zeros((len(picks), width), dtype=torch.bool)
    for row, p in enumerate(picks):
        idx[row, : len(p)] = p
        valid[row, : len(p)] = True
    return idx, valid


def poisson_batch(group: Group, rate: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: each member keeps each of its samples with probability
    ``rate``, independently, drawn from the member's secret source (never its seed). At rate
    1 every sample is kept (Opacus' ``rand() < 1`` always holds), so nothing is drawn."""
    if rate >= 1.0:
        width = int(group.n.max())
        slots = torch.arange(width).expand(len(group.n), width)
        valid = slots < group.n.unsqueeze(1)
        return slots.masked_fill(~valid, 0), valid
    picks = []
    for row, source in enumerate(group.sources):
        keep = torch.rand(int(group.n[row]), generator=source.sampling_generator(step)) < rate
        picks.append(torch.nonzero(keep).flatten())
    return pad(picks)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[c, idx[c, b]]`` for every member ``c`` and slot ``b``."""
    rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(idx)
    return x[rows, idx]


def by_slot(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A tensor over all picked samples as (member, slot, ...), laid out like ``idx``."""
    return flat.reshape(*idx.shape, *flat.shape[1:])
