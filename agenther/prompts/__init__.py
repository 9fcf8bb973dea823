"""Prompt templates live in files beside this module and are versioned by their sha256."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from string import Template

HERE = Path(__file__).parent


@cache
def _text(name: str) -> str:
    return (HERE / f"{name}.txt").read_text(encoding="utf-8")


def fill(name: str, **values: str) -> str:
    """The template `name` with $placeholders filled (a missing value is an error)."""
    return Template(_text(name)).substitute(values)


def prompt_hash(name: str) -> str:
    return hashlib.sha256(_text(name).encode()).hexdigest()[:12]


def all_hashes() -> dict[str, str]:
    return {p.stem: prompt_hash(p.stem) for p in sorted(HERE.glob("*.txt"))}
