"""Resolve a user's import path (``"package.module:Name"``): the one place pollinate imports
code it was pointed at (models, data loaders), with one message for each way it can fail;
and :func:`module_from_file`, one module of an installed package without its ``__init__``.

Importing a module runs its code. The ClientApp on a device resolves an import path only if
the device's owner allowed it (:class:`pollinate.clientapp.policy.DevicePolicy`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pollinate.errors import ConfigError

__all__ = ["import_object", "is_import_path", "module_from_file"]


def is_import_path(spec: str) -> bool:
    """Whether ``spec`` is an import path (``pkg.module:Name``) rather than a name or a file."""
    module, colon, attr = spec.partition(":")
    return (
        bool(colon)
        and "/" not in spec
        and "\\" not in spec
        and not (
            len(module) == 1 and attr.startswith(("/", "\\"))  # a Windows drive, C:\data
        )
    )


def import_object(spec: str, what: str) -> Any:
    """The object ``spec`` names; ConfigError (``what`` says which setting) naming the part
    that does not resolve: the module, one of its imports, or an attribute."""
    module_name, _, attr_path = spec.partition(":")
    parts = attr_path.split(".")
    if not all(p.isidentifier() for p in [*module_name.split("."), *parts]):
        raise ConfigError(
            f"{what} {spec!r} is not an import path; write it as 'package.module:Name'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{what} {spec!r}: no module named {missing!r} on the Python path; run from "
                "the folder that holds it, or install it (pip install -e .)"
            ) from None
        raise ConfigError(
            f"{what} {spec!r}: importing {module_name!r} failed, it needs {missing!r}, which "
            "is not installed"
        ) from None
    except Exception as err:  # the user's module raised while importing
        raise ConfigError(
            f"{what} {spec!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in parts[:i])
            raise ConfigError(f"{what} {spec!r}: {where!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def module_from_file(package: str, relative: str, alias: str) -> ModuleType:
    """The module at ``relative`` (a path inside the installed ``package``), loaded from its
    file as ``alias`` without importing the package, whose ``__init__`` may import far more
    (Opacus' or dp-accounting's: about a second each); the package's own module when it is
    already imported (``package.relative`` with dots).

    Raises:
        ImportError: The package is not installed or the file cannot be loaded.
    """
    dotted = f"{package}.{relative.removesuffix('.py').replace('/', '.')}"
    loaded = sys.modules.get(dotted)
    if isinstance(loaded, ModuleType):
        return loaded
    found = importlib.util.find_spec(package)  # finds, does not import, a top-level package
    if found is None or found.origin is None:
        raise ImportError(f"{package} is not installed: pip install {package.replace('_', '-')}")
    path = Path(found.origin).parent / relative
    spec = importlib.util.spec_from_file_location(alias, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {dotted} from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
