"""Text-action grammars: how an agent that acts by writing text wrote its actions (one registry).

What a grammar is: agenther/adapters/grammar.py. Built in: `react` (text_actions.py) and `http`
(http_actions.py), registered below the way a plugin's is: a plugin package exposes a `Grammar`
under the `agenther.grammars` entry-point group (`name = "pkg.module:GRAMMAR"`). A user names their
own in params (`ingest.grammars`: a regex with named groups, regex_actions.py). With
`ingest.text_actions: auto` the grammar is detected per log, as chat fields are: the one that makes
the most actions and results out of the first records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agenther.adapters import http_actions, text_actions
from agenther.adapters.grammar import Grammar
from agenther.adapters.plugins import Registry
from agenther.adapters.regex_actions import regex_grammar

GRAMMARS: Registry[Grammar] = Registry(Grammar, "agenther.grammars", (text_actions.GRAMMAR, http_actions.GRAMMAR))
AUTO, OFF = "auto", "none"
FALLBACK = "react"  # what auto applies when nothing in the first records parses (it leaves unparsed text alone)


def grammars(specs: dict[str, dict] | None = None) -> dict[str, Grammar]:
    """Built-in and plugin grammars, then the user's (params ingest.grammars; same name: theirs wins)."""
    return GRAMMARS.items() | {name: regex_grammar(name, spec) for name, spec in (specs or {}).items()}


@dataclass
class GrammarChoice:
    """The grammar a log is read with, and how it was chosen."""
    grammar: Grammar | None
    how: str  # given | detected | fallback | off
    scores: dict[str, int] = field(default_factory=dict)  # grammar -> actions + results it made of the sample
    sampled: int = 0

    def describe(self) -> str:
        if self.grammar is None:
            return "text actions: off (ingest.text_actions: none): assistant text stays text"
        name = self.grammar.name
        if self.how == "given":
            return f"text actions: grammar {name!r} (ingest.text_actions): {self.grammar.about}"
        tried = ", ".join(f"{n} {s}" for n, s in self.scores.items())
        if self.how == "fallback":
            return (f"text actions: none found in the first {self.sampled} records ({tried}); {name!r} applied, "
                    "which leaves text it cannot parse as it is")
        return (f"text actions: grammar {name!r} detected from the first {self.sampled} records (actions + results "
                f"per grammar: {tried}; ingest.text_actions overrides): {self.grammar.about}")


def choose(setting: str, specs: dict[str, dict] | None, samples: list[list[dict]]) -> GrammarChoice:
    """The grammar for a log: `setting` (params ingest.text_actions) names one, is `none`, or is
    `auto`: the grammar that makes the most tool calls and tool results out of `samples` (the
    canonical messages of the first records); ties go to the earlier one (built-ins first).
    A name no grammar has is a ValueError naming the ones there are."""
    known = grammars(specs)
    if setting == OFF:
        return GrammarChoice(None, "off")
    if setting != AUTO:
        if setting not in known:
            raise ValueError(f"ingest.text_actions: no grammar {setting!r} (known: auto, none, {', '.join(known)})")
        return GrammarChoice(known[setting], "given")
    scores = {name: sum(score(g.parse, s) for s in samples) for name, g in known.items()}
    best = max(scores, key=lambda n: scores[n]) if scores else FALLBACK
    if not scores or scores[best] == 0:
        return GrammarChoice(known[FALLBACK], "fallback", scores, len(samples))
    return GrammarChoice(known[best], "detected", scores, len(samples))


def score(parse: Callable[[list[dict]], list[dict]], messages: list[dict]) -> int:
    """Tool calls and tool results a grammar makes of these messages (0 if it raises: a grammar
    that fails on the sample is not the log's)."""
    try:
        out = parse(messages)
    except Exception:  # noqa: BLE001 - a user's grammar may fail on text it was not written for
        return 0
    return _counted(out) - _counted(messages)


def _counted(messages: list[dict]) -> int:
    return sum(len(m.get("tool_calls") or []) + (m["role"] == "tool") for m in messages)
