"""One registry style for every named choice: backbones, heads, optimisers,
schedulers, data sources.

An entry carries everything about its choice: how to build it, the config
keys that only this choice takes (its part of the group's schema), and any
facts the rest of the pipeline asks about it (``info``: a backbone's
minimum input size, whether torchvision has weights for it, ...). Adding a
choice is one ``register`` call in the group's home module plus its YAML in
``conf/<group>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from transferlab.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    build: T
    keys: frozenset[str] = frozenset()  # config keys of the group that only this choice takes
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Named choices of one config group (``key`` is the config key that picks one)."""

    def __init__(self, key: str, *, what: str, error: type[Exception] = ConfigError,
                 ordered: bool = False) -> None:
        self.key, self.what, self.error, self.ordered = key, what, error, ordered
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, keys: Iterable[str] = (), **info: Any) -> Callable[[T], T]:
        """Decorator: register ``build`` under ``name``."""

        def decorator(build: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._entries[name] = Entry(name, build, frozenset(keys), dict(info))
            return build

        return decorator

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Registered names: sorted, or in registration order for ``ordered`` registries."""
        return list(self._entries) if self.ordered else sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise self.error(f"{self.key}: Unknown {self.what} '{name}'; expected one of {self.names()}")
        return self._entries[name]

    def option_keys(self) -> frozenset[str]:
        """Every choice-specific key of the group (a key that some choice takes)."""
        return frozenset().union(*(e.keys for e in self._entries.values()))
