"""pollinate.data: datasets, local device data and client partitions.

* :func:`load_dataset` loads a built-in dataset (``"mnist"``, ``"digits"``) or a local source
  (``.npz``, ``.csv``, folder of class sub-folders) and splits it, stratified and seeded.
* :func:`load_local_data` reads a device's own data without splitting it.
* :func:`partition_indices` / :func:`load_partition` divide the training part among simulated
  clients with flwr-datasets partitioners.

Results of :func:`load_dataset` and :func:`load_partition` are cached per process.
"""

from __future__ import annotations

from pollinate.data._datasets import BUILTIN_DATASETS, load_dataset
from pollinate.data._local import load_local_data
from pollinate.data._partition import Partitioner, partition_indices, partition_sizes
from pollinate.data._share import load_partition
from pollinate.data._types import ArrayDataset, DatasetSplit

__all__ = [
    "BUILTIN_DATASETS",
    "ArrayDataset",
    "DatasetSplit",
    "Partitioner",
    "load_dataset",
    "load_local_data",
    "load_partition",
    "partition_indices",
    "partition_sizes",
]
