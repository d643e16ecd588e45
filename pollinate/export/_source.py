"""The source of an export: a run directory's settings, newest checkpoint, model and data.

:func:`load_run` reads ``run.json`` and the newest completed checkpoint of a run written by
``pollinate simulate`` (or a federation), rebuilds the model with those weights in eval mode
and loads the run's dataset split, so every artifact is judged on the run's own test split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pollinate.config import RunSettings
from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import CheckpointError
from pollinate.models import build_model
from pollinate.rundir.checkpoint import latest_checkpoint
from pollinate.tasks import Task

__all__ = ["LoadedRun", "load_run"]


@dataclass(frozen=True)
class LoadedRun:
    """A run's settings, the round of its newest checkpoint, that model, and its data."""

    settings: RunSettings
    server_round: int
    model: torch.nn.Module
    data: DatasetSplit

    @property
    def task(self) -> Task:
        """What the model predicts (the data's task, as the run trained it)."""
        return self.data.task


def load_run(run_dir: Path) -> LoadedRun:
    """The trained global model of a run directory, with its data."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise CheckpointError(
            f"{run_dir} is not a pollinate run directory (no run.json); pass a folder written by "
            "`pollinate simulate`"
        )
    try:
        run_info = json.loads(run_json.read_text())
        saved = run_info["settings"]
        population = int(run_info.get("population", 0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{run_json} is corrupt ({err})") from err
    settings = RunSettings.from_run_config(saved)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no completed round yet; nothing to export")
    data = load_dataset(
        settings.dataset, test_fraction=settings.test_fraction, seed=settings.seed,
        task=settings.task, num_partitions=population,
    )  # fmt: skip
    model = build_model(
        settings.model, input_shape=data.input_shape, num_classes=data.num_outputs,
        fix=settings.fix_model,
    )  # fmt: skip
    state = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.model.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint of {run_dir} does not fit model {settings.model!r}"
        ) from err
    model.eval()
    return LoadedRun(settings=settings, server_round=ckpt.server_round, model=model, data=data)
