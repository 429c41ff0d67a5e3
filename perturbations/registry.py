"""A tiny name -> class registry, shared by the protection methods and verify's defenses."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Classes registered under their ``name`` attribute; ``kind`` names them in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name`` (ValueError when it has none)."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def lookup(self, name: str) -> T:
        """The class registered as ``name``; ConfigError naming the alternatives otherwise."""
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}") from None
