"""Pure tensor-level protection methods and their registry.

>>> import perturbations
>>> perturbations.available()
['cuda', 'salm', 'uc', 'waves']
>>> method = perturbations.get("cuda")(keyring, num_classes=10)
>>> both = perturbations.get("cuda+uc")  # composed: UC on CUDA's output
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    InputError,
    KeyMaterialError,
    ProtectError,
    RecordError,
    WeightsError,
)
from .registry import Registry

if TYPE_CHECKING:
    from .base import FitData, Perturbation
    from .keyring import Keyring

# torch-backed names load on first use, so that importing the error types (as the CLI does for
# `protect --help`) does not import torch.
_LAZY = {"FitData": "base", "Perturbation": "base", "Keyring": "keyring"}

_METHODS: Registry[type[Perturbation]] = Registry("method")
_BUILTINS = ("cuda", "salm", "uc", "waves")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_builtins() -> None:
    for module in _BUILTINS:  # each registers itself on import
        importlib.import_module(f".{module}", __name__)


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    return _METHODS.register(cls)


def available() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtins()
    return _METHODS.names()


def get(name: str) -> type[Perturbation]:
    """The method class registered as ``name``, or the composition of several (``cuda+uc``: each
    stage on the previous one's output, see :mod:`perturbations.chain`)."""
    _load_builtins()
    if "+" in name:
        from .chain import chain_class

        return chain_class(name, _METHODS.lookup)
    return _METHODS.lookup(name)


__all__ = [
    "ConfigError",
    "FitData",
    "InputError",
    "KeyMaterialError",
    "Keyring",
    "Perturbation",
    "ProtectError",
    "RecordError",
    "WeightsError",
    "available",
    "get",
    "register",
]
