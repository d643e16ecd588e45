"""The public facades export exactly the intended names, and each one resolves."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "pollinate": {
        "ConfigError", "DataError", "PollinateError", "PrivacyBudgetError", "__version__",
    },
    "pollinate.data": {
        "ArrayDataset", "BUILTIN_DATASETS", "DatasetSplit", "Partitioner", "load_dataset",
        "load_local_data", "load_partition", "partition_indices", "partition_sizes",
    },
    "pollinate.privacy": {
        "ClientAccountant", "MechanismStep", "PrivacyLedger", "noise_multiplier_for_budget",
    },
    "pollinate.models": {
        "MODELS", "MLP", "OpacusMnistCNN", "SmallCNN", "build_model", "check_dp_compatible",
        "check_output", "checked_model", "dp_problems", "fix_for_dp", "is_import_path",
        "model_label", "register_model", "resolve_model",
    },
    "pollinate.edge_runtime": {
        "Artifact", "BundleError", "EdgeModel", "InputError", "Manifest", "RuntimeMissingError",
        "available_runtimes", "load_bundle", "verify_bundle",
    },
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_the_intended_public_api(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_importing_the_package_configures_no_logging() -> None:
    import logging

    importlib.import_module("pollinate")
    assert logging.getLogger("pollinate").handlers == []
