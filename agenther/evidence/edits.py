"""User-turn edits that need no writer: the ones that keep the user's own words.

Most planned edits (agenther.evidence.conversation) add details to a turn the user really said ("I'll
go with the first option, flight HAT136" must also name the connection HAT039), or take a part of it
away ("Yes, please upgrade me to economy and add three checked bags" where no bag was added). Such an
edit is made by rules, so no model can drop or garble what stays:
- what must go goes sentence by sentence (one that asks for a write or change the goal lacks, or
  names a value no call uses), never a sentence holding a value the agent then used;
- another value of an enum is replaced by the one the run used;
- an opening taken from the middle of the run loses its small talk ("Alright, thanks.") and its
  "now"/"also";
- details to name are added in plain words, in parentheses.
A turn that must ask for something it does not (a new request, a question about a report), an
opening that is an answer or points back at what came before, or a turn with nothing left, needs a
writer: the relabeling model.
"""

from __future__ import annotations

import re
from collections import defaultdict

from agenther.evidence.coverage import asked
from agenther.evidence.goal import TurnEdit
from agenther.evidence.grounding import ISO_DATE, MONTHS
from agenther.evidence.tools import SENTENCE, Tools, words
from agenther.evidence.turns import asks_anything, requests_in, wishes

# A sentence that is only an answer to the agent: it cannot open a conversation.
SMALL_TALK = re.compile(r"(?i)\W*(alright|all right|okay|ok|thanks|thank you|great|perfect|sure|hmm|i see|got it|"
                        r"understood|no worries|that's (all right|okay|fine|great))\W*(thanks?|thank you)?\W*")
# Words that tie a turn to what came before it: dropped from an opening...
CONNECTIVES = re.compile(r"(?i)\b(now|also|as well|too|instead|then|in that case|again)\b,?\s?")
# ... or, where they point back at something ("that segment", "the same dates"), left to a writer.
POINTS_BACK = re.compile(r"(?i)\b(that|those|these|this one|the same|above|mentioned|previous|earlier|other|"
                         r"either|both|them|it)\b")
# ... or, where they go on with what came before ("Let's proceed with ...", "go ahead and ..."), too.
GOES_ON = re.compile(r"(?i)\b(proceed|go ahead|continue)\b")
AFFIRMATIVE = re.compile(r"^\W*(yes|yeah|yep|sure|ok|okay|correct|please proceed|go ahead)\b", re.I)


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


def _offends(text: str, edit: TurnEdit, tools: Tools, known: list[str]) -> bool:
    """Does `text` ask for a write or change the edit takes away, or name a value it must no longer?"""
    return bool(still_says(edit.model_copy(update={"instead": {}}), text, tools, known))


def still_says(edit: TurnEdit, text: str, tools: Tools, known: list[str]) -> list[str]:
    """What `text` (a written turn) still says that `edit` takes away: writes or changes it asks for,
    values it names, enum values it should have replaced."""
    said = requests_in(text)
    tokens = set(words(said)) | set(wishes(said))  # single words, and wishes of two ("aisle seat")
    return ([w for w in edit.unask if (tools.requested(w, said, known) if w in known else w in tokens)]
            + [v for v in edit.unsay if asked(v, text)]
            + [other for other in edit.instead if asked(other.replace("_", " "), said)])


def _without(text: str, edit: TurnEdit, tools: Tools, known: list[str]) -> str | None:
    """`text` without the sentences the edit takes away; None where a sentence to take away also holds
    what must stay (a value the agent used, the yes): cutting inside a sentence is the writer's job."""
    kept = []
    for sentence in (s for s in SENTENCE.split(text) if s.strip()):
        if not _offends(sentence, edit, tools, known):
            kept.append(sentence)
        elif any(asked(v, sentence) for v in edit.keep if v != "yes") or (
                "yes" in edit.keep and AFFIRMATIVE.search(sentence)):
            return None
    return " ".join(kept)


def rule_written(edit: TurnEdit, original: str, mid_conversation: bool, tools: Tools, known: list[str]) -> str | None:
    """The turn with `edit` applied by rules (module docstring); None when it needs a writer."""
    if edit.ask or edit.question or any(n.startswith("one of: ") for n in edit.name):
        return None
    text = _without(" ".join(original.split()), edit, tools, known)
    if not text:
        return None  # nothing left: what the turn said is what it must no longer say
    for said, used in edit.instead.items():
        text = re.sub(rf"\b{re.escape(said.replace('_', ' '))}\b", used.replace("_", " "), text, flags=re.I)
    if any(not asked(v, text) for v in edit.keep if v != "yes") or ("yes" in edit.keep
                                                                    and not AFFIRMATIVE.search(text)):
        return None
    if edit.opening and mid_conversation:
        sentences = [s for s in SENTENCE.split(text) if s.strip() and not SMALL_TALK.fullmatch(s.strip())]
        text = re.sub(r"\s+([.,!?])", r"\1", CONNECTIVES.sub("", " ".join(sentences))).strip()  # "... name then."
        if not asks_anything(text) or POINTS_BACK.search(text) or AFFIRMATIVE.search(text) or GOES_ON.search(text):
            # an answer ("Yes, please."), a request about what came before, or one that goes on with
            # it ("Let's proceed with the cancellation"): it needs writing
            return None
        text = text[:1].upper() + text[1:]
    if edit.name:
        text = f"{text} ({'; '.join(phrases(edit.name))})"
    return text
