"""Duplicate hindsight prompts: exact (after normalisation) and near (Jaccard of word 3-grams).

Many failed runs of one task reach the same outcome, so the relabeler writes the same
prompt several times; training on copies over-weights them. Which copy survives is
decided by (higher relabel confidence, then smaller id), never by input order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize_prompt(text: str | None) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed ("Book it!" == "book  it")."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", (text or "").lower())).strip()


def shingles(text: str | None, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one shingle."""
    words = normalize_prompt(text).split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class Dropped:
    id: str
    reason: str  # "duplicate_prompt" | "near_duplicate_prompt"
    kept_id: str
    similarity: float


@dataclass
class DedupResult:
    kept: list[str] = field(default_factory=list)  # ids, in survivor order
    dropped: list[Dropped] = field(default_factory=list)


def dedup_prompts(items: list[tuple[str, str, float | None]], threshold: float) -> DedupResult:
    """Keep one prompt per group of exact or near duplicates.

    `items`: (id, prompt, confidence). Candidates are visited best first (confidence
    descending, then id), and each is compared with the survivors so far only: the first
    of a group always survives, whatever order the rows came in. Near-duplicate candidates
    are found through an inverted index of shingles (Jaccard > 0 needs a shared shingle), so
    the comparison is exact but only touches prompts that share a 3-gram.
    """
    order = sorted(items, key=lambda it: (-(it[2] if it[2] is not None else 0.0), it[0], it[1] or ""))
    result = DedupResult()
    exact: dict[str, str] = {}  # normalised prompt -> kept id
    kept_shingles: list[tuple[str, frozenset]] = []
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)  # shingle -> positions in kept_shingles
    for row_id, prompt, _confidence in order:
        norm = normalize_prompt(prompt)
        if norm in exact:
            result.dropped.append(Dropped(row_id, "duplicate_prompt", exact[norm], 1.0))
            continue
        sh = shingles(prompt)
        if threshold <= 0:  # everything is "similar enough": compare with all survivors
            candidates = range(len(kept_shingles))
        else:
            candidates = sorted({pos for s in sh for pos in index.get(s, ())})
        best: tuple[float, str] | None = None
        for pos in candidates:
            other_id, other = kept_shingles[pos]
            sim = jaccard(sh, other)
            if sim >= threshold and (best is None or sim > best[0]):
                best = (sim, other_id)
        if best is not None:
            result.dropped.append(Dropped(row_id, "near_duplicate_prompt", best[1], round(best[0], 4)))
            continue
        exact[norm] = row_id
        for s in sh:
            index[s].append(len(kept_shingles))
        kept_shingles.append((row_id, sh))
        result.kept.append(row_id)
    return result
