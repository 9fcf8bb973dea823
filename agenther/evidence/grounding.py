"""The deterministic judge: every number, ID, date and proper or quoted name in a hindsight
prompt must occur in the trajectory. An invented detail is the commonest relabeling error."""

from __future__ import annotations

import re

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"]
MONTH_ABBR = {m[:3]: i + 1 for i, m in enumerate(MONTHS)}
# Capitalised words that are not names (sentence starters, calendar words, pronouns).
NOT_NAMES = set(
    ["i", "i'm", "i've", "i'd", "i'll", "my", "me", "we", "our", "you", "your", "please", "could", "can", "would", "will", "should", "also", "then", "and", "but", "or", "the", "a", "an", "this", "that", "these", "those", "there", "here", "what", "which", "when", "where", "who", "how", "hi", "hello", "thanks", "thank", "yes", "no", "find", "book", "cancel", "change", "update", "get", "show", "tell", "give", "list", "look", "search", "check", "help", "make", "send", "modify", "upgrade", "use", "pay", "add", "remove", "need", "want", "let", "retrieve", "provide"]
) | set(MONTHS) | {d for d in ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]}

ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
MONTH_DATE = re.compile(
    r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+(\d{1,2})(?:st|nd|rd|th)?\b", re.I
)
IDENT = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z0-9][\w-]*\b")  # letters and digits: HAT136
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
# "double" or “curly” quotes anywhere; 'single' ones only around words (an apostrophe, as in "I'm",
# opens no quote)
QUOTED = re.compile(r"[\"“]([^\"”]{2,60})[\"”]|(?<!\w)'([^']{2,60})'(?!\w)")
CAPITALISED = re.compile(r"\b[A-Z][a-zA-Z'&.-]+(?:\s+[A-Z][a-zA-Z'&.-]+)*")


def facts(prompt: str) -> list[tuple[str, str]]:
    """(kind, text) of every checkable detail in the prompt, in order of appearance."""
    found: list[tuple[str, str]] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, m: re.Match, text: str | None = None) -> None:
        if any(a < m.end() and m.start() < b for a, b in taken):
            return
        taken.append((m.start(), m.end()))
        found.append((kind, text if text is not None else m.group(0)))

    for m in ISO_DATE.finditer(prompt):
        add("date", m)
    for m in MONTH_DATE.finditer(prompt):
        add("date", m)
    for m in QUOTED.finditer(prompt):
        add("quoted", m, m.group(1) or m.group(2))
    for m in IDENT.finditer(prompt):
        add("id", m)
    for m in NUMBER.finditer(prompt):
        add("number", m)
    for m in CAPITALISED.finditer(prompt):
        words = [w for w in m.group(0).split() if w.lower().strip(".'") not in NOT_NAMES]
        if words and not _sentence_start_only(prompt, m, words):
            name = " ".join(words)
            # the full stop that ends a sentence is not part of the name ("to Houston."), an
            # abbreviation's dots are ("Washington D.C.")
            add("name", m, name[:-1] if name.endswith(".") and name.count(".") == 1 else name)
    return found


def _sentence_start_only(prompt: str, m: re.Match, words: list[str]) -> bool:
    # A single capitalised word that opens a sentence is not evidence of a name.
    before = prompt[: m.start()].rstrip()
    return len(words) == 1 and m.group(0).split()[0] == words[0] and (not before or before[-1] in ".!?:\n")


def haystack(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        parts.append(m.get("content") or "")
        for call in m.get("tool_calls") or []:
            parts.append(f"{call['name']} {call.get('arguments') or ''}")
    return "\n".join(parts).lower()


def occurs(kind: str, text: str, hay: str) -> bool:
    needle = text.lower()
    if kind == "date" and not ISO_DATE.fullmatch(text):
        m = MONTH_DATE.fullmatch(text.strip())
        if m:
            iso_tail = f"-{MONTH_ABBR[m.group(1).lower()[:3]]:02d}-{int(m.group(2)):02d}"
            spoken = f"{m.group(1).lower()} {int(m.group(2))}"
            return iso_tail in hay or spoken in hay or needle in hay
    if kind == "number":
        plain = needle.replace(",", "")
        pattern = rf"(?<![\d.]){re.escape(plain)}(?![\d])"
        return bool(re.search(pattern, hay) or re.search(pattern, hay.replace(",", "")))
    if kind == "name":
        return all(w.lower() in hay for w in text.split())
    return needle in hay


def ungrounded(prompt: str, messages: list[dict]) -> list[str]:
    """The prompt's details that the trajectory never mentions (empty = grounded)."""
    hay = haystack(messages)
    return [f"{kind} {text!r}" for kind, text in facts(prompt) if not occurs(kind, text, hay)]
