"""What a client's calls cost, per stage: calls, cache hits, retries, tokens and USD."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Usage:
    calls: int = 0
    cache_hits: int = 0
    failed_calls: int = 0
    retries: int = 0
    budget_refused: int = 0  # calls not made because the run's budget was spent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @staticmethod
    def total(usages: Iterable[Usage]) -> Usage:
        total = Usage()
        for u in usages:
            total.add(u)
        return total
