"""Evidence in runs whose actions were written as text (ReAct, HTTP-style; agenther/adapters/grammars.py).

Such agents act on pages and answer in words, so two things the generic rules (goal.py) cannot see
are worked out here, deterministically and only from what the run shows:

- what a write by argument acted on (`acted_calls`): `click[Buy Now]` buys the item whose page the
  agent was on, with the options it chose there. The call is named by its rule (`click[Buy Now]`,
  tools.Tools.action_name); its arguments become the options chosen on that page (what a request
  for the purchase names: "in blue, size 9"), and `seen` keeps what the page showed (item, title,
  price: what a request may name). The log's own call is never changed: this is the rules' view.
- which final answers the observations support (`supported_answers`): a `Finish` answer whose words
  occur in the read results before it is a reported fact; a yes/no answer is one when the reasoning
  given with it states values (names, numbers) that those results hold. An answer the results do
  not support is no fact.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass

from agenther.evidence import grounding
from agenther.evidence.render import tool_calls
from agenther.evidence.tools import PSEUDO_NAME, WRITE_VERBS, Tools, argument_text, is_error, words

# Buttons that move around a page rather than choose on it (WebShop and most shop pages).
NAVIGATION = frozenset({"< prev", "prev", "next >", "next", "back to search", "back", "description", "features",
                        "reviews", "attributes", "search"})
SHORT_REPLY = 80  # "You have clicked blue.", "OK.": an acknowledgement, not another page
SEGMENT = re.compile(r"\[SEP\]|\n")
PRICE = re.compile(r"^price\s*:\s*(?P<price>.+)$", re.IGNORECASE)
TITLE_CHARS = 160


# -- what a write by argument acted on -------------------------------------------------------------
def goal_calls(row: dict, tools: Tools) -> list[dict]:
    """The row's calls (render.tool_calls) as the goal's rules see them (`acted_calls`)."""
    return acted_calls(tool_calls(row["messages"]), tools, row.get("reward"))


def acted_calls(calls: list[dict], tools: Tools, reward: float | None = None) -> list[dict]:
    """`calls` (render.tool_calls) as the goal's rules see them: a call an argument rule gives
    another kind than its tool's is named `tool[arguments]`; a button write's arguments are the
    options chosen on the page it was pressed on, and `seen` what that page showed.

    A button write that is the run's last call and got no reply (the environment ended the episode
    on it, as a shop does on "Buy Now", and the log kept no page after it) took effect when the log
    scores the run above 0 (`reward`: a shop scores only a purchase): its own step stands for its
    result. With no reward, or 0, it stays a write without a result (no achievement)."""
    out = []
    for i, c in enumerate(calls):
        name = tools.action_name(c["name"], c["arguments"])
        if name == c["name"]:
            out.append(c)
            continue
        acted = {**c, "name": name}
        if tools.kind(name) == "write" and _is_label(c["arguments"]):
            acted["arguments"], acted["seen"] = _on_page(calls, i)
            if c["result_step"] is None and i == len(calls) - 1 and reward is not None and reward > 0:
                acted |= {"result_step": c["step"], "result": f"(the run ended on this action; the log scores it {reward:g})"}
        out.append(acted)
    return out


def _is_label(arguments: dict) -> bool:
    return set(arguments) == {"input"} and isinstance(arguments["input"], str)


def _on_page(calls: list[dict], i: int) -> tuple[dict, dict]:
    """({"options": [...] or {group: value}}, {"item", "title", "price"}) for the button write calls[i]: the page is
    the earliest result of the last stretch of results that show the button (a page re-rendered
    after each choice, or acknowledged in a short reply); the options, the later presses of the
    same tool on things that page lists (not its navigation)."""
    label = argument_text(calls[i]["arguments"]).lower()
    tool = calls[i]["name"]
    start = None
    for k in range(i - 1, -1, -1):
        result = calls[k]["result"] or ""
        if label in result.lower() and not is_error(result):
            start = k
        elif start is not None and len(result) > SHORT_REPLY:
            break  # another page (the search results): the item's page started after it
    if start is None:
        return {}, {}
    page = calls[start]["result"] or ""
    low = page.lower()
    options: list[str] = []
    for c in calls[start + 1 : i]:
        text = argument_text(c["arguments"])
        if (c["name"] == tool and _is_label(c["arguments"]) and not is_error(c["result"])
                and text.lower() not in NAVIGATION and text.lower() != label and text.lower() in low
                and text not in options):
            options.append(text)
    groups = option_groups(page)
    if options and all(o.lower() in groups for o in options):  # named by the page: {"color": "charcoal", "size": "9"}
        named = {groups[o.lower()]: o for o in options}
        if len(named) == len(options):
            options = named  # type: ignore[assignment]
    seen = page_details(page)
    item = next((argument_text(c["arguments"]) for c in reversed(calls[: start + 1])
                 if c["name"] == tool and grounding.IDENT.fullmatch(argument_text(c["arguments"]))), None)
    if item:
        seen = {"item": item, **seen}
    return ({"options": options} if options else {}), seen


def describe_page_write(tool: str, arguments: dict, seen: dict[str, str]) -> str:
    """A button write as a shopper would say it: "buy (options charcoal; 9, price $54.99): <title>", not
    the button, not the catalogue number (a request names neither). The title comes last: a request
    may name it without repeating the record's line (relabel.pastes_log compares line beginnings)."""
    m = PSEUDO_NAME.match(tool)
    label = m["label"] if m else tool
    verb = next((w for w in words(label) if w in WRITE_VERBS), label.lower())
    options = arguments.get("options") or []
    chosen = [f"{k} {v}" for k, v in options.items()] if isinstance(options, dict) else list(options)
    details = [f"options {'; '.join(chosen)}"] * bool(chosen) + [f"price {seen['price']}"] * bool(seen.get("price"))
    what = seen.get("title") or seen.get("item") or "the item on the page"
    return f"{verb} ({', '.join(details)}): {what}" if details else f"{verb}: {what}"


OPTION_LINE = re.compile(r"^[ \t]*(?P<group>[^\[\]\n]*?[a-z][^\[\]\n]*?)[ \t]*(?P<values>(?:\[[^\]\n]*\])+)[ \t]*$",
                         re.MULTILINE | re.IGNORECASE)


def option_groups(page: str) -> dict[str, str]:
    """value (lower-cased) -> its group, from a page that lists options one group a line
    ("size [8][9][10]"); pages that run groups and values together ([SEP]) name none."""
    found: dict[str, str] = {}
    for m in OPTION_LINE.finditer(page):
        for value in re.findall(r"\[([^\]]*)\]", m["values"]):
            found.setdefault(value.strip().lower(), m["group"].strip())
    return found


def page_details(page: str) -> dict[str, str]:
    """The price a page states ("Price: $45.99") and its title (the line or [SEP] segment of two or
    more words right before the price)."""
    segments = [s.strip(" \t[]") for s in SEGMENT.split(page)]
    segments = [s for s in segments if s]
    at = next((j for j, s in enumerate(segments) if PRICE.match(s)), None)
    if at is None:
        return {}
    found = {"price": PRICE.match(segments[at])["price"].strip()}
    title = next((s for s in reversed(segments[:at]) if len(s.split()) >= 2), None)
    if title:
        found = {"title": title[:TITLE_CHARS], **found}
    return found


# -- which final answers the observations support --------------------------------------------------
TOKEN = re.compile(r"[a-z0-9]+(?:['’.,/:-][a-z0-9]+)*")
STOPWORDS = frozenset({"a", "an", "the", "of", "in", "on", "at", "to", "for", "and", "or", "but", "is", "are", "was",
                       "were", "be", "been", "by", "with", "as", "from", "that", "this", "it", "its", "not", "there",
                       "their", "they", "he", "she", "his", "her", "which", "who", "what", "when", "where", "about",
                       "than", "then", "so"})
YES_NO = frozenset({"yes", "no", "true", "false"})
MAX_VALUES = 8


@dataclass
class Supported:
    """A final answer the run's observations support."""
    step: int  # the step of the turn that gave it (the Finish call's)
    text: str  # "Answer: <answer>. <the reasoning given with it>"
    values: list[str]  # what of it the observations hold: the answer, then values of its reasoning
    reads: list[dict]  # the read calls whose results hold them
    answer: list[str]  # the answer's items (none for yes / no): what a question about it must not name


def supported_answers(messages: list[dict], calls: list[dict], tools: Tools, start: int, end: int) -> list[Supported]:
    """The Finish answers in messages[start:end] that the successful read results there before them support: each
    item of the answer (FINISH([a, b]) has two) is a value a structured result holds, or its words
    occur in the results; a yes/no answer is supported by the values its reasoning states."""
    out = []
    for c in calls:
        if c["name"] != "Finish" or not start <= c["step"] < end:
            continue
        items = answer_items(c["arguments"].get("final_answer") or c["arguments"].get("input"))
        if not items:
            continue
        answer = "; ".join(items)
        reads = [r for r in calls if r["name"] != "Finish" and tools.kind(r["name"]) == "read"
                 and r["result_step"] is not None and start <= r["step"] and r["result_step"] < c["step"]
                 and not is_error(r["result"])]
        seen = [_Seen(r) for r in reads]
        reasoning = (messages[c["step"]].get("content") or "").strip()
        values = [v for v in _specific(reasoning) if any(_holds(r.low, v) for r in seen)]
        yes_no = all(_content(i) <= YES_NO for i in items)
        if yes_no:
            if not values:
                continue  # a yes / no whose reasoning names nothing the results hold
            holding = [r.call for r in seen if any(_holds(r.low, v) for v in values)]
        else:
            found = [_held_by(i, seen) for i in items]
            if not all(found):
                continue  # an item the run never saw: no fact
            holding = [r.call for r in seen if any(r in f for f in found)]
            values = [*(i[:120] for i in items), *values]
        text = f"Answer: {answer}." + (f" {reasoning}" if reasoning else "")
        out.append(Supported(c["step"], text, list(dict.fromkeys(values))[:MAX_VALUES], holding,
                             [] if yes_no else items))
    return out


class _Seen:
    """A read result as the answer check reads it: lower-cased text, its words, its JSON values."""

    def __init__(self, call: dict):
        self.call = call
        self.low = (call["result"] or "").lower()
        self.tokens = set(TOKEN.findall(self.low))
        self.values = _leaves(call["result"] or "")


def _held_by(item: str, seen: list[_Seen]) -> list[_Seen]:
    """The results that support one answer item: a JSON value equal to it, else (all together) its words."""
    exact = [r for r in seen if item.lower() in r.values]
    if exact:
        return exact
    words = _content(item)
    if not words or words <= YES_NO:
        return []
    found = {w for w in words if any(w in r.tokens for r in seen)}
    return [r for r in seen if words & r.tokens] if _enough(words, found) else []


def _leaves(result: str) -> set[str]:
    """The scalar values of the JSON a result is or holds ("Response 200: {...}"), lower-cased."""
    start = min((i for i in (result.find("{"), result.find("[")) if i >= 0), default=-1)
    if start < 0:
        return set()
    try:
        value, _ = json.JSONDecoder().raw_decode(result, start)
    except (ValueError, RecursionError):
        return set()
    out: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif v is not None and not isinstance(v, bool):
            out.add(str(v).removesuffix(".0").lower() if isinstance(v, float) else str(v).lower())
    return out


def answer_items(value: object) -> list[str]:
    """A final answer's items: a list (FINISH(["S6534835", 2]) or its JSON text) item by item, else the text."""
    if isinstance(value, str) and value.strip()[:1] == "[":
        with contextlib.suppress(ValueError, RecursionError):  # not JSON: the text is the answer
            value = json.loads(value)
    if isinstance(value, list):
        return [i for v in value for i in answer_items(v)]
    text = "" if value is None else str(value).strip()
    return [text] if text else []


def _content(text: str) -> set[str]:
    """The answer's words that say something: no stopwords, no lone digits ("1" occurs anywhere)."""
    return {t for t in TOKEN.findall(text.lower()) if t not in STOPWORDS and (len(t) > 1 or t.isalpha())}


def _enough(words: set[str], found: set[str]) -> bool:
    """Every number of the answer found, and its words (all of a short answer, 3 in 4 of a longer one)."""
    if any(any(ch.isdigit() for ch in w) and w not in found for w in words):
        return False
    return len(found) == len(words) if len(words) <= 3 else len(found) >= 0.75 * len(words)


def _specific(text: str) -> list[str]:
    """The dates, IDs, numbers and proper or quoted names of a text (what grounding checks), once each."""
    return list(dict.fromkeys(v for _, v in grounding.facts(text) if len(v) > 1))


def _holds(low_text: str, value: str) -> bool:
    """`value` occurs in `low_text` (lower-cased) as a whole word or phrase."""
    return re.search(rf"(?<!\w){re.escape(value.lower())}(?!\w)", low_text) is not None
