"""tau-bench's state hash, and a copy-on-write state that computes it in milliseconds.

tau-bench's reward compares `sha256(str(h))` where `h` is its data made hashable: a dict becomes
the tuple of its (key, value) pairs sorted by key, a list the tuple of its items, a set the
sorted tuple; the text is Python's own repr of those tuples (quotes, `(x,)` for one item, float
reprs). Recorded hashes are reproduced only by the same bytes, so this builds the same text.

The data is three large maps (flights, reservations, users) and a write touches a few entries.
`Overlay` keeps the loaded data untouched and holds copies of the entries a replay changed; the
text of every unchanged entry is computed once per process (`EntryTexts`) and joined with the
changed ones: a replay needs no deep copy of the data, and a digest hashes ~5 MB of ready text.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any


def hashable(value: Any) -> Any:
    """tau-bench's hashable form: dicts as key-sorted pair tuples, lists and sets as tuples."""
    if isinstance(value, dict):
        return tuple((k, hashable(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, set):
        return tuple(sorted(hashable(v) for v in value))
    return value


def tuple_text(items: list[str]) -> str:
    """Python's repr of a tuple whose items have the reprs `items`."""
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def entry_text(key: str, value: Any) -> str:
    """The repr of one (key, value) pair of a map, as it stands inside the whole text."""
    return repr((key, hashable(value)))


class EntryTexts:
    """The text of every entry of a two-level map ({section: {key: value}}), computed once."""

    def __init__(self, data: Mapping[str, Mapping[str, Any]]):
        self.data = data
        self.keys = {s: sorted(entries) for s, entries in data.items()}
        self.texts = {s: {k: entry_text(k, entries[k]) for k in self.keys[s]} for s, entries in data.items()}


class Overlay:
    """A copy-on-write view of a two-level map: reads see the changes, the base never changes."""

    def __init__(self, base: EntryTexts):
        self.base = base
        self.changed: dict[str, dict[str, Any]] = {s: {} for s in base.data}

    def get(self, section: str, key: str) -> Any:
        """The current value (not to be mutated: use `edit`), or None."""
        mine = self.changed[section]
        return mine[key] if key in mine else self.base.data[section].get(key)

    def has(self, section: str, key: str) -> bool:
        return key in self.changed[section] or key in self.base.data[section]

    def edit(self, section: str, key: str) -> Any:
        """The value to change in place (copied on its first edit)."""
        mine = self.changed[section]
        if key not in mine:
            mine[key] = copy.deepcopy(self.base.data[section][key])
        return mine[key]

    def put(self, section: str, key: str, value: Any) -> None:
        self.changed[section][key] = value

    def digest(self) -> str:
        """tau-bench's hash of the whole current state: sha256 of the repr of `hashable(state)`."""
        sections = []
        for s in sorted(self.base.data):
            texts, mine = self.base.texts[s], self.changed[s]
            keys = self.base.keys[s] if not mine.keys() - texts.keys() else sorted(texts.keys() | mine.keys())
            items = [entry_text(k, mine[k]) if k in mine else texts[k] for k in keys]
            sections.append(f"({s!r}, {tuple_text(items)})")
        return hashlib.sha256(tuple_text(sections).encode("utf-8")).hexdigest()
