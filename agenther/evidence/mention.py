"""User-turn edits that need no writer: the ones that only add what a turn must also say.

Most planned edits (agenther.evidence.conversation) only add details to a turn the user really said:
"I'll go with the first option, flight HAT136" must also name the connection HAT039. Such an edit
keeps the user's words and adds the details in plain words, in parentheses, so no model can drop or
garble them; an opening taken from the middle of the run loses its small talk ("Alright, thanks.")
and its "now"/"also". Edits that take something away or change what a turn asks for (no longer ask
to cancel, another cabin, a new opening request) need a writer: the relabeling model.
"""

from __future__ import annotations

import re
from collections import defaultdict

from agenther.evidence.goal import TurnEdit
from agenther.evidence.grounding import ISO_DATE, MONTHS
from agenther.evidence.tools import SENTENCE

# A sentence that is only an answer to the agent: it cannot open a conversation.
SMALL_TALK = re.compile(r"(?i)\W*(alright|all right|okay|ok|thanks|thank you|great|perfect|sure|hmm|i see|got it|"
                        r"understood|no worries|that's (all right|okay|fine|great))\W*(thanks?|thank you)?\W*")
# Words that tie a turn to what came before it: dropped from an opening...
CONNECTIVES = re.compile(r"(?i)\b(now|also|as well|too|instead|then|in that case|again)\b,?\s?")
# ... or, where they point back at something ("that segment", "the same dates"), left to a writer.
POINTS_BACK = re.compile(r"(?i)\b(that|those|these|this one|the same|above|mentioned|previous|earlier|other|"
                         r"either|both|them|it)\b")
ASKING = re.compile(r"\?|\b(please|want|need|would like|'d like|help|could|can|book|find|change|cancel|check)\b",
                    re.I)


def spoken_date(iso: str) -> str:
    year, month, day = iso.split("-")
    return f"{MONTHS[int(month) - 1].capitalize()} {int(day)}, {year}"


def _spoken(value: str) -> str:
    """An enum value in words (round_trip -> round trip); IDs (mia_kim_4397) as they are."""
    if ISO_DATE.fullmatch(value):
        return spoken_date(value)
    return value if re.search(r"\d", value) else value.replace("_", " ")


def phrases(names: list[str]) -> list[str]:
    """Planned details ("origin JFK", "flight number HAT039") as a user says them."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for n in names:
        key, _, value = n.rpartition(" ")
        by_key[key].append(value)
    def listed(values: list[str]) -> str:
        return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]

    out = []
    if "origin" in by_key or "destination" in by_key:
        route = " ".join(p for p in (f"from {by_key.pop('origin', [''])[0]}".rstrip(" from"),
                                     f"to {by_key.pop('destination', [''])[0]}".rstrip(" to")) if p.strip())
        out.append(route.strip())
    for key, values in by_key.items():
        spoken = [_spoken(v) for v in values]
        if key == "flight number":
            out.append(("flights " if len(spoken) > 1 else "flight ") + listed(spoken))
        elif key == "reservation id":
            out.append(("reservations " if len(spoken) > 1 else "reservation ") + listed(spoken))
        elif key in ("date", ""):
            out.append("on " + listed(spoken))
        elif key == "total baggages":
            out.append(f"{spoken[0]} checked bag{'s' if spoken[0] != '1' else ''} in all")
        elif key == "nonfree baggages":
            out.append(f"{spoken[0]} of them paid")
        elif key == "cabin":
            out.append(f"{spoken[0]} class")
        elif key == "user id":
            out.append(f"my user ID is {spoken[0]}")
        else:
            out.append(f"{key} {listed(spoken)}")
    return out


def rule_written(edit: TurnEdit, original: str, mid_conversation: bool) -> str | None:
    """The turn with `edit` applied, when the edit only adds (details to name, small talk to drop
    from an opening taken from the middle of the run); None when it needs a writer."""
    if edit.ask or edit.question or edit.unask or edit.unsay or edit.instead or any(n.startswith("one of: ")
                                                                                      for n in edit.name):
        return None
    text = " ".join(original.split())
    if edit.opening and mid_conversation:
        sentences = [s for s in SENTENCE.split(text) if s.strip() and not SMALL_TALK.fullmatch(s.strip())]
        text = CONNECTIVES.sub("", " ".join(sentences)).strip()
        if not ASKING.search(text) or POINTS_BACK.search(text):
            return None  # an answer ("Yes, please."), or a request about what came before: it needs writing
        text = text[:1].upper() + text[1:]
    if edit.name:
        text = f"{text} ({'; '.join(phrases(edit.name))})"
    return text
