"""Lazy package exports (PEP 562): a package's public names are imported on first use, so that
importing the package (or one light submodule of it) does not import torch and every module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module ``package``.

    Args:
        package: the package's ``__name__``.
        names: public name -> the module defining it, relative to ``package`` (``".config"``).
        submodules: submodule names that ``package.<name>`` imports on first access.

    Example:
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"TrainConfig": ".config"})
    """

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names, *submodules})

    return __getattr__, __dir__
