"""pollinate: federated learning on edge devices with differential privacy, built on Flower."""

from pollinate.errors import ConfigError, DataError, PollinateError, PrivacyBudgetError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "PollinateError",
    "PrivacyBudgetError",
    "__version__",
]
