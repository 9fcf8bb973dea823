"""What one turn of a conversation says, read deterministically: which write actions it speaks of,
which values it asks for or denies knowing, which wishes it states.

The sample planner (agenther.evidence.goal) and the coherence judge (agenther.evidence.coherence)
read turns with these same functions, so what the planner avoids is what the judge checks.

A sentence *speaks of* a write when it asks for, offers, promises, refuses or discusses it
(tools.Tools.requested), except where it only describes a state ("you are booked on HAT041",
"it was booked on May 12") or names a detail of an action the goal does contain ("add travel
insurance for $30 per passenger" while booking: insurance and passengers are arguments of the
booking, not a passenger update).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agenther.evidence.tools import ALL_WRITE_WORDS, ASKS, SENTENCE, Tools, mentions, words

# A sentence asks (for a value, or for an action): a question, or a word of asking.
ASKING = re.compile(r"\?|\b(please|could you|can you|would you|may i|provide|share|let me know|tell me|confirm|"
                    r"need|what is|what's)\b", re.I)
# "is booked", "were cancelled", "has been updated": a state, not an action spoken of. Not after a
# modal: "can be cancelled", "cannot be modified" discuss the action.
STATE = re.compile(r"\b(?<!can )(?<!cannot )(?<!can't )(?<!could )(?<!not )(am|is|are|was|were|been|currently|already|now|"
                   r"successfully)\s+(\w+\s+)?(\w+ed)\b", re.I)
DENIAL_WORDS = re.compile(r"\b(don't|do not|dont|didn't|did not|can't|cannot|not sure|no idea|forgot|forget|"
                          r"lost|unsure)\b", re.I)

# Wishes a request may state that only the run's own actions or reports can meet: each must be
# echoed by something the agent did or said (tool calls, results, the agent's text), or the request
# asks for something the sample does not show.
WISHES = re.compile(
    r"\b(aisle seat|window seat|middle seat|aisle|cheapest|cheaper|lowest price|least expensive|fastest|shortest|"
    r"quickest|earliest|latest|nonstop|non-stop|direct|morning|afternoon|evening|overnight|red-eye)\b",
    re.I,
)
# What in the run's calls and results meets a wish: the same word (a tool named search_direct_flight
# meets "nonstop"), or the data a choice by it rests on (prices for "the cheapest", times for "the
# earliest"). A seat no call or result speaks of is a wish nothing met, whatever the agent then said.
PRICES, TIMES = (r"price", r"amount", r"cost"), (r"\d\d:\d\d", r"time")
WISH_EVIDENCE = {
    "non-stop": ("non-stop", "nonstop", "direct"), "nonstop": ("nonstop", "non-stop", "direct"),
    "direct": ("direct", "nonstop", "non-stop"),
    **dict.fromkeys(("cheapest", "cheaper", "lowest price", "least expensive"), PRICES),
    **dict.fromkeys(("fastest", "shortest", "quickest", "earliest", "latest", "morning", "afternoon", "evening",
                     "overnight", "red-eye"), TIMES),
    "aisle seat": ("aisle",), "window seat": ("window",), "middle seat": ("middle",),
}


NEGATED = re.compile(r"\b(don't|do not|doesn't|does not|didn't|won't|not|no|without|never|neither)\b", re.I)


# A request asks: a question, a word of asking or wanting, or an imperative ("Cancel my ...").
REQUESTING = re.compile(r"\?|\b(please|want|need|would like|'d like|wish|help|could|can|would|tell|show|find|check|let's|proceed|"
                    r"let me know|give|get|send|make|book|cancel|change|update|modify|upgrade|downgrade|add|"
                    r"remove|move|switch|return|refund|pay|buy|order|reserve|search|look up|renew|what|which|how|"
                    r"when|where|who|is there|are there|do i|does)\b", re.I)


def asks_anything(text: str) -> bool:
    """Does a user's turn ask for something (an opening must)?"""
    return REQUESTING.search(text) is not None


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE.split(text or "") if s.strip()]


def change_words(text: str) -> set[str]:
    """The words of a change that a user's turn asks for, in its sentences that ask ("I'd like to
    modify it"), not in those that say what the user does not want, and not a change named as a
    thing ("due to a change of plan", "Change of plan.")."""
    found: set[str] = set()
    for sentence in sentences(requests_in(text)):
        if not ASKS.search(sentence):
            continue
        tokens = words(sentence)
        found |= {w for w, after in zip(tokens, [*tokens[1:], ""], strict=True) if w in ALL_WRITE_WORDS and after != "of"}
    return found


def requests_in(text: str) -> str:
    """The sentences of a user's turn that can ask for something: one that says what the user does
    not want asks for nothing ("I do not wish to add travel insurance", "without changing the flights")."""
    return " ".join(s for s in sentences(text) if not NEGATED.search(s))


# Who does what: a participle after one of these is an action ("I cancelled", "it cannot be canceled"),
# after anything else a state ("flights booked on the same day").
ACTORS = frozenset(["i", "we", "you", "they", "he", "she", "it", "have", "has", "had", "will", "would", "can", "could", "to", "please", "let", "i'll", "i've", "we've", "you've", "be"])
# "1 checked bag added", "has been successfully updated": the agent claims a write was made just now.
CLAIM = re.compile(r"\b(successfully|has been|have been|now|just|added|removed)\b", re.I)
# An event's name ("the flight cancellation") speaks of the action only where something is offered or asked.
OFFERING = re.compile(r"\?|\b(can|could|would|will|shall|eligible|proceed|able|unable|like|want|need|policy|"
                      r"allowed|possible|please|let me|i'll)\b", re.I)


def _describes_state(sentence: str, verbs: frozenset[str]) -> bool:
    """Every word of the write's verb group in the sentence is a state ("is booked", "flights booked
    on May 12") or an event's name without an offer ("the inconvenience of the flight cancellation"),
    none an action."""
    found = {m.group(3).lower() for m in STATE.finditer(sentence)}
    tokens = re.findall(r"[a-z']+", sentence.lower())
    said = [(i, w) for i, w in enumerate(tokens) if w in verbs]

    def state(i: int, w: str) -> bool:
        if w in found:
            return True
        if w.endswith("ed"):
            return i > 0 and tokens[i - 1] not in ACTORS
        return w.endswith(("tion", "tions")) and not OFFERING.search(sentence)

    return bool(said) and all(state(i, w) for i, w in said)


def argument_words(arguments: Iterable[str]) -> set[str]:
    """The words of the argument names of the goal's actions (total_baggages -> total, baggages)."""
    return {w for name in arguments for w in words(name) if len(w) >= 3}


def speaks_of(tools: Tools, write: str, text: str, known: list[str], goal_arguments: set[str] = frozenset()) -> str | None:
    """The first sentence of `text` that speaks of the `write` action (None if none does)."""
    verbs, objects = tools.request_words(write, known)
    for sentence in sentences(text):
        if not tools.requested(write, sentence, known):
            continue
        if _describes_state(sentence, verbs) and not (objects and CLAIM.search(sentence)):
            continue  # a state ("you are booked on HAT041"), not a claim that a write of its own was just made
        # "add travel insurance for $30 per passenger", "let me know if you need bags" while booking:
        # what it names is a detail of an action the goal contains (its arguments), not this other write
        if objects and mentions(goal_arguments, objects):
            continue
        return sentence.strip()
    return None


# What else people call an argument, by a word of its name.
KEY_SYNONYMS = {
    "destination": ["city", "where"], "origin": ["city", "where from", "departure airport"],
    "cabin": ["class", "cabin class"], "date": ["when", "what day", "which day"],
    "baggages": ["bags", "baggage", "luggage", "checked bag"], "insurance": ["insurance"],
    "passengers": ["passenger", "traveler", "who is flying"], "payment": ["payment method", "pay"],
}


def key_phrases(key: str) -> list[str]:
    """How a person names an argument: reservation_id -> "reservation id", "reservation number";
    destination -> "destination", "city"."""
    parts = words(key)
    if not parts:
        return []
    phrases = [" ".join(parts)] + [s for p in parts for s in KEY_SYNONYMS.get(p, [])]
    if parts[-1] == "id" and len(parts) > 1:
        stem = " ".join(parts[:-1])
        phrases += [f"{stem} number", f"{stem} code", f"{stem} ids", f"{stem} numbers"]
        if parts[0] == "user":
            phrases += ["user name", "username"]
    if parts == ["dob"]:
        phrases += ["date of birth", "birth date", "birthday"]
    return phrases


def _says_phrase(sentence: str, phrases: list[str]) -> bool:
    low = " ".join(words(sentence))
    return any(re.search(rf"\b{re.escape(p)}\b", low) for p in phrases)


def asks_for(text: str, key: str) -> str | None:
    """The sentence of `text` that asks for the value of argument `key` (its phrase in a question or
    request, without the value itself), or None."""
    phrases = key_phrases(key)
    for sentence in sentences(text):
        if ASKING.search(sentence) and _says_phrase(sentence, phrases):
            return sentence.strip()
    return None


def denies(text: str, key: str) -> str | None:
    """The sentence of `text` in which the user says they do not know or have the `key` value."""
    phrases = key_phrases(key)
    for sentence in sentences(text):
        if DENIAL_WORDS.search(sentence) and _says_phrase(sentence, phrases):
            return sentence.strip()
    return None


def wishes(text: str) -> list[str]:
    """The wishes a request states (lower case, in order, once)."""
    return list(dict.fromkeys(m.group(0).lower() for m in WISHES.finditer(text or "")))


def wish_met(wish: str, calls: str) -> bool:
    """Do the run's tool calls and results (lower case) hold what meets the wish (WISH_EVIDENCE)?"""
    return any(re.search(rf"(?<![a-z]){pattern}", calls) for pattern in WISH_EVIDENCE.get(wish, (re.escape(wish),)))
