"""One registry style for every named choice: backbones, heads, optimisers,
schedulers, data sources.

An entry carries everything about its choice: how to build it, the config
keys that only this choice takes (its part of the group's schema), and any
facts the rest of the pipeline asks about it (``info``: a backbone's
minimum input size, where its published weights come from, ...). Adding a
choice is one ``register`` call in the group's home module plus its YAML in
``conf/<group>/``.

A *family* entry (``claims=``) stands for every name it claims (the torchvision
zoo, timm's models): a name without an entry of its own resolves to the family
that claims it. Unknown names are answered with the closest known names,
families' included (``choices=``).
"""

from __future__ import annotations

import difflib
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
    claims: Callable[[str], bool] | None = None  # a family: the names it stands for
    choices: Callable[[], Iterable[str]] | None = None  # a family: its names, for suggestions
    describe: str = ""  # a family: how its names look, for error messages


class Registry(Generic[T]):
    """Named choices of one config group (``key`` is the config key that picks one)."""

    def __init__(self, key: str, *, what: str, error: type[Exception] = ConfigError,
                 ordered: bool = False) -> None:
        self.key, self.what, self.error, self.ordered = key, what, error, ordered
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, keys: Iterable[str] = (), claims: Callable[[str], bool] | None = None,
                 choices: Callable[[], Iterable[str]] | None = None, describe: str = "",
                 **info: Any) -> Callable[[T], T]:
        """Decorator: register ``build`` under ``name``; with ``claims``, as a family standing for every
        name ``claims`` accepts (``build`` then gets the name as ``name=``)."""

        def decorator(build: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._entries[name] = Entry(name, build, frozenset(keys), dict(info), claims, choices, describe)
            return build

        return decorator

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Names of the entries of their own (families aside): sorted, or in registration order for
        ``ordered`` registries."""
        names = [n for n, e in self._entries.items() if e.claims is None]
        return names if self.ordered else sorted(names)

    def families(self) -> list[Entry[T]]:
        return [e for e in self._entries.values() if e.claims is not None]

    def _find(self, name: str) -> Entry[T] | None:
        entry = self._entries.get(name)
        if entry is not None and entry.claims is None:
            return entry
        return next((f for f in self.families() if f.claims(name)), None)  # type: ignore[misc]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __getitem__(self, name: str) -> Entry[T]:
        entry = self._find(name)
        if entry is None:
            known = [*self.names(), *(n for f in self.families() if f.choices for n in f.choices())]
            close = difflib.get_close_matches(name, known, n=5)
            hint = f". Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            rest = "".join(f", or {f.describe or f.name}" for f in self.families())
            raise self.error(f"{self.key}: Unknown {self.what} '{name}'; expected one of {self.names()}{rest}{hint}")
        return entry

    def option_keys(self) -> frozenset[str]:
        """Every choice-specific key of the group (a key that some choice takes)."""
        return frozenset().union(*(e.keys for e in self._entries.values()))
