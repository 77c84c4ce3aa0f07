"""A tiny name -> entry registry, one per kind of thing (backbones, heads, losses, samplers), like timm's
`_registry.py`. An entry is usually a factory; a backbone's also carries its spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

F = TypeVar("F")


class Registry(Generic[F]):
    """Maps names to entries; registering a name twice is an error, not a silent override."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def add(self, name: str, entry: F) -> F:
        """Register `entry` under `name` (refused when the name is taken)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator form of `add`."""

        def decorator(factory: F) -> F:
            return self.add(name, factory)

        return decorator

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
