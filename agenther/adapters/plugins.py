"""A registry of named things of one kind, the built-in ones registered the way a plugin's are.

Log formats (agenther/adapters/registry.py) and text-action grammars (agenther/adapters/grammars.py)
each keep one. A plugin package exposes its object under the registry's entry-point group
(`name = "pkg.module:OBJECT"` in its pyproject.toml); it is loaded when the registry is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: type[T], group: str, built_in: Iterable[T]):
        self.kind, self.group, self.built_in = kind, group, tuple(built_in)
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Add one (a name registered twice: the later one wins, so a plugin may replace a built-in)."""
        if not isinstance(item, self.kind):
            raise TypeError(f"{item!r} is not an agenther {self.kind.__name__}")
        self._items[item.name] = item  # type: ignore[attr-defined]
        return item

    def items(self) -> dict[str, T]:
        """name -> object: the built-in ones, then the plugins'."""
        if not self._items:
            for item in self.built_in:
                self.register(item)
            for ep in entry_points(group=self.group):
                module, _, attr = ep.value.partition(":")
                self.register(getattr(importlib.import_module(module), attr))
        return dict(self._items)
