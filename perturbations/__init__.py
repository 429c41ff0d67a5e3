"""Pure tensor-level protection methods and their registry.

>>> import perturbations
>>> perturbations.available()
['cuda']
>>> method = perturbations.get("cuda")(keyring, num_classes=10)
"""

from __future__ import annotations

from .base import FitData, Perturbation
from .errors import ConfigError, InputError, KeyMaterialError, ProtectError, RecordError, WeightsError
from .keyring import Keyring

_REGISTRY: dict[str, type[Perturbation]] = {}


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Perturbation]:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(available())}") from None


from . import cuda  # noqa: E402,F401  (registers itself)

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
