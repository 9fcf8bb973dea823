"""What a tool call did: does the tool change state, did its result report an error, and
which words of a request ask for it.

A tool is `write` (changes state: book, cancel, update, send ...), `read` (only looks:
get, search, list, calculate ...) or `handoff` (passes the conversation on). The kind comes
from params (`tools.writes` / `tools.reads` / `tools.handoffs`, which always win), else from
the first word of the tool's name, else from the first word of its schema's description,
else `tools.default_kind`.

Some calls are writes by their arguments, not their tool: an agent that acts by text clicks
buttons, and `click[Buy Now]` buys where `click[B07XYZ]` only opens a product page. Rules (params
`tools.rules`, then the built-in one: a click on a button whose label starts with buy, purchase,
checkout, place order ... writes) match a tool's name AND its arguments; a call whose rule gives
it another kind than its tool's is named `tool[arguments]` for the rules that follow
(`Tools.action_name`, agenther/evidence/text_evidence.py), and that name has the rule's kind
and request words (a button's: those of its label's verb: buy, purchase, order ...).

An error result is never an achievement: empty results, "Error: ..." text, HTTP 4xx/5xx
status, JSON with a non-empty `error`, and short texts that say "not found", "failed" ...
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from agenther.params import Params, ToolRule
from agenther.params import Tools as ToolParams

Kind = Literal["write", "read", "handoff"]


def _set(text: str) -> frozenset[str]:
    return frozenset(text.split())


READ_VERBS = _set(
    "get search list find lookup look calculate compute think check retrieve query fetch read view show "
    "describe count browse click select filter sort validate verify estimate convert translate detect "
    "analyze analyse summarize recommend suggest match scrape download explore navigate go open inspect "
    "latest top random trending autocomplete info information details status"
)
WRITE_VERBS = _set(
    "book cancel update modify change edit set create add insert delete remove send post put patch submit "
    "purchase buy pay refund place make register upload write reserve apply assign issue order checkout "
    "subscribe unsubscribe approve reject close archive move rename upgrade downgrade grant revoke schedule "
    "publish reply forward share save store enable disable reset transfer exchange return"
)
HANDOFF = re.compile(r"^(transfer_to_human|escalat|hand_?off|handover)", re.I)

# Words that ask for a write of each verb group: exact word forms (not stems: "booking" is
# mostly a noun, "credit card" is no compensation). A request asks for a write tool when it
# says a word of the tool's verb group AND (if the tool has one) a distinctive object of its name.
VERB_GROUPS: dict[str, frozenset[str]] = {
    "cancel": _set("cancel cancels cancelled canceled cancelling canceling cancellation"),
    "book": _set("book books booked reserve reserved purchase purchased buy bought"),
    "modify": _set(
        "update updated modify modified change changed changing edit edited switch switched move moved rebook "
        "rebooked upgrade upgraded downgrade downgraded add added adding remove removed adjust adjusted replace "
        "replaced swap swapped increase increased reduce reduced include included set upgrading downgrading "
        "updating modifying switching moving replacing swapping rebooking adjusting reducing increasing removing "
        "additional"
    ),
    "send": _set("send sent issue issued give gave grant granted compensate compensated compensation"),
    "create": _set("create created make made open opened register registered add added new"),
    "delete": _set("delete deleted remove removed erase erased clear cleared"),
}
# Words that ask for a change whatever the tool; not the everyday ones ("make sure", "set off", "new").
# (The `post` group below is left out too: "record", "order", "file" are mostly nouns.)
ALL_WRITE_WORDS = frozenset().union(*VERB_GROUPS.values()) - frozenset(
    [
        "make",
        "made",
        "set",
        "new",
        "open",
        "opened",
        "include",
        "included",
        "give",
        "gave",
        "clear",
        "cleared",
        "issue",
    ]
)
# A sentence that asks for something (a change word in it then asks for that change; "due to a
# change of plan" does not).
ASKS = re.compile(r"\?|\b(please|want|wanted|need|like|wish|help|can you|could you|would you|go ahead|proceed|"
                  r"let's|let us)\b", re.I)
VERB_OF = {
    "book": "book",
    "reserve": "book",
    "purchase": "book",
    "buy": "book",
    "order": "book",
    "checkout": "book",
    "place": "book",
    "cancel": "cancel",
    "send": "send",
    "issue": "send",
    "grant": "send",
    "refund": "send",
    "transfer": "send",
    "create": "create",
    "register": "create",
    "make": "create",
    "delete": "delete",
    "remove": "delete",
    "erase": "delete",
    "pay": "book",
    "post": "post",
    "put": "modify",
    "patch": "modify",
}
# HTTP-style agents write by POST (agenther/adapters/http_actions.py): what a request for a new
# record says. Not in ALL_WRITE_WORDS (computed above), so no tau-bench turn changes meaning.
VERB_GROUPS["post"] = VERB_GROUPS["create"] | _set(
    "record recorded order ordered log logged document documented enter entered submit submitted place placed "
    "file filed post posted prescribe prescribed refer referred schedule scheduled")

# The built-in argument rule: a click on a button whose label starts with a word of buying.
BUTTONS = r"click|press|tap|push|hit|select|choose"
BUYING_LABEL = r"^\W*(buy|purchase|check ?out|place (an? |your |the )?order|order now|pay|book|reserve|subscribe)\b"
PSEUDO_NAME = re.compile(r"^(?P<tool>[^\[\]]+)\[(?P<label>.*)\]$", re.DOTALL)  # click[Buy Now]


@dataclass(frozen=True)
class Rule:
    """A call's kind by its tool's name (whole, any case) and its arguments' text (searched, any case)."""
    tool: re.Pattern
    arguments: re.Pattern | None
    kind: Kind
    requests: frozenset[str] = frozenset()  # words that ask for it; empty: those of its label's verb

    @classmethod
    def of(cls, spec: ToolRule) -> Rule:
        """From params tools.rules (regexes checked there)."""
        args = spec.arguments
        return cls(re.compile(spec.tool, re.I), re.compile(args, re.I) if args else None, spec.kind,
                   frozenset(spec.requests))

    def matches(self, name: str, text: str) -> bool:
        return self.tool.fullmatch(name) is not None and (self.arguments is None or bool(self.arguments.search(text)))


BUILT_IN_RULES = (Rule(re.compile(BUTTONS, re.I), re.compile(BUYING_LABEL, re.I), "write"),)


def argument_text(arguments: dict) -> str:
    """What an argument rule reads: a one-argument call's text (a button's label), else its JSON."""
    if set(arguments) == {"input"} and isinstance(arguments["input"], str):
        return arguments["input"].strip()
    return json.dumps(arguments, ensure_ascii=False, sort_keys=True)
# Object nouns and the everyday words a user says for them.
OBJECT_WORDS: dict[str, frozenset[str]] = {
    "flight": _set("flight flights cabin class seat itinerary"),
    "baggage": _set("bag bags baggage baggages luggage suitcase suitcases"),
    "passenger": _set("passenger passengers traveler travelers traveller travellers"),
    "certificate": _set("certificate voucher compensation"),
    "cart": _set("cart basket"),
}

ERROR_START = re.compile(
    r"^\s*(error|exception|traceback|fail(ed|ure)?|invalid|unauthori[sz]ed|forbidden)\b", re.I
)
ERROR_WORDS = re.compile(
    r"\b(error|exception|not found|no such|does not exist|doesn't exist|failed|failure|invalid|unauthori[sz]ed|"
    r"forbidden|denied|unable to|cannot|can't|timed out|timeout|rate limit|too many requests|not allowed|"
    r"authentication required|bad request|unavailable|not supported)\b",
    re.I,
)
HTTP_ERROR = re.compile(
    r"\b[45]\d\d\b\s*[-:]?\s*(unauthori|forbidden|not found|bad request|internal|service|"
    r"gateway|too many|method not|conflict|gone|unprocessable|error)",
    re.I,
)
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
SHORT_RESULT = 240  # a result this short that mentions an error word is an error report


def words(text: str) -> list[str]:
    """Lower-case word tokens; snake_case and camelCase names split into their words."""
    return list(_words(text))


@functools.lru_cache(maxsize=1 << 16)  # the same sentences and names are read for every write tool and window
def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()))


DETERMINERS = frozenset(["a", "an", "the", "that", "this", "these", "those", "my", "our", "it", "them", "his", "her", "their", "one", "your"])


def verb_forms(tokens: list[str]) -> list[str]:
    """`tokens`, plus the verb of a gerund that takes an object ("back to booking that flight" asks
    to book; "my booking" stays a noun)."""
    extra = []
    for word, following in zip(tokens, tokens[1:], strict=False):
        if word.endswith("ing") and len(word) > 5 and following in DETERMINERS:
            stem = word[:-3]
            extra += [stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem]
    return tokens + extra


def same_word(a: str, b: str) -> bool:
    """Loose stem match: one word starts the other and the shorter has 3+ letters (bag ~ baggages)."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= 3 and long_.startswith(short)


def mentions(text_words: Iterable[str], targets: Iterable[str]) -> bool:
    targets = list(targets)
    # a text word is the target or a longer form of it ("baggages" mentions "bag"), never a shorter
    # one: "travel" (insurance) does not mention "traveler"
    return any(w == t or (len(t) >= 3 and w.startswith(t)) for w in text_words for t in targets)


@dataclass
class Tools:
    """Kinds and request words of the tools one trajectory could call."""

    schemas: dict[str, dict] = field(default_factory=dict)  # name -> function schema
    writes: frozenset[str] = frozenset()
    reads: frozenset[str] = frozenset()
    handoffs: frozenset[str] = frozenset()
    requests: dict[str, list[str]] = field(default_factory=dict)  # tool -> words that ask for it
    default_kind: Kind = "read"
    rules: tuple[Rule, ...] = BUILT_IN_RULES  # kinds by name and arguments (params first, then built in)
    # What kind() and request_words() worked out, per tool: the goal's rules ask again for every
    # turn and every call (a hundred thousand times per ten thousand runs), the answer never changes.
    _kinds: dict[str, Kind] = field(default_factory=dict, repr=False, compare=False)
    _requests: dict[tuple, tuple[frozenset[str], frozenset[str]]] = field(default_factory=dict, repr=False,
                                                                           compare=False)
    _sentences: dict[str, list[list[str]]] = field(default_factory=dict, repr=False, compare=False)  # text -> words

    @classmethod
    def of(cls, tools_json: str | None, params: Params | None = None) -> Tools:
        """`params`' tools section (None: its defaults) over the tools of a log (`tools_json`)."""
        p = params.tools if params is not None else ToolParams()
        return cls(
            schemas=schemas_by_name(tools_json),
            writes=frozenset(p.writes),
            reads=frozenset(p.reads),
            handoffs=frozenset(p.handoffs),
            requests={k: list(v) for k, v in p.requests.items()},
            default_kind=p.default_kind,
            rules=(*(Rule.of(r) for r in p.rules), *BUILT_IN_RULES),
        )

    def rule_for(self, name: str, text: str) -> Rule | None:
        return next((r for r in self.rules if r.matches(name, text)), None)

    def action_name(self, name: str, arguments: dict) -> str:
        """The name the goal's rules know this call by: its tool's, or `tool[arguments]` when a rule
        gives the call another kind than its tool has (`click[Buy Now]`, a write among reads)."""
        text = argument_text(arguments)
        rule = self.rule_for(name, text)
        if rule is None or rule.arguments is None or rule.kind == self.kind(name):
            return name  # a rule on the name alone is the tool's own kind (Tools.kind)
        return f"{name}[{text}]"

    def _pseudo_rule(self, name: str) -> tuple[Rule, str] | None:
        """The rule behind a `tool[arguments]` name, with the arguments' text."""
        m = PSEUDO_NAME.match(name) if "[" in name else None
        rule = self.rule_for(m["tool"], m["label"]) if m else None
        return (rule, m["label"]) if rule is not None else None

    def kind(self, name: str) -> Kind:
        found = self._kinds.get(name)
        if found is None:
            found = self._kinds[name] = self._kind(name)
        return found

    def _kind(self, name: str) -> Kind:
        pseudo = self._pseudo_rule(name)
        if pseudo is not None:
            return pseudo[0].kind
        if name in self.writes:
            return "write"
        if name in self.reads:
            return "read"
        if name in self.handoffs:
            return "handoff"
        by_name = next((r for r in self.rules if r.arguments is None and r.tool.fullmatch(name)), None)
        if by_name is not None:
            return by_name.kind
        if HANDOFF.match(name):
            return "handoff"
        description = (self.schemas.get(name) or {}).get("description") or ""
        return _name_kind(name) or _verb_kind(words(description)[:4]) or self.default_kind

    def is_write(self, name: str) -> bool:
        return self.kind(name) == "write"

    def write_names(self, seen: Iterable[str] = ()) -> list[str]:
        """Every write tool this trajectory knows of: its schemas and the calls it made."""
        return sorted({n for n in [*self.schemas, *seen] if self.is_write(n)})

    def request_words(self, name: str, all_writes: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
        """(verb words, object words) that ask for `name`; object words are empty when the tool
        has no distinctive object (a word of its name no other write tool has)."""
        key = (name, *all_writes)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = self._request_words(name, key[1:])
        return found

    def _request_words(self, name: str, all_writes: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
        if name in self.requests:
            return frozenset(self.requests[name]), frozenset()
        pseudo = self._pseudo_rule(name)
        if pseudo is not None:  # a button names an action, not an object: its label's verb asks for it
            rule, label = pseudo
            verb = next((t for t in words(label) if t in WRITE_VERBS), None)
            found = rule.requests or (VERB_GROUPS[VERB_OF.get(verb, "modify")] | {verb} if verb else frozenset())
            return frozenset(found), frozenset()
        tokens = words(name)
        verb = next((t for t in tokens if t in WRITE_VERBS), tokens[0] if tokens else name)
        group = VERB_GROUPS[VERB_OF.get(verb, "modify")] | {verb, verb + "s", verb + "ed", verb + "d"}
        others = [set(words(o)) for o in all_writes if o != name]
        distinctive = [
            t
            for t in tokens
            if t != verb and t not in ("for", "to", "the", "a", "of") and not any(t in o for o in others)
        ]
        objects: set[str] = set()
        for t in distinctive:
            objects |= {t} | next((ws for key, ws in OBJECT_WORDS.items() if same_word(t, key)), frozenset())
        return frozenset(group), frozenset(objects)

    def requested(self, name: str, text: str, all_writes: Iterable[str]) -> bool:
        """Does one sentence of `text` ask for (or speak of) a `name` write?"""
        verbs, objects = self.request_words(name, all_writes)
        sentences = self._sentences.get(text)
        if sentences is None:  # one text is asked about every write tool in turn
            sentences = self._sentences[text] = [verb_forms(words(sentence)) for sentence in SENTENCE.split(text)]
        for tokens in sentences:
            if verbs.intersection(tokens) and (not objects or mentions(tokens, objects)):
                return True
        return False


def _verb_kind(tokens: list[str]) -> Kind | None:
    """The kind of the first known verb among `tokens` (descriptions open "This endpoint gets ...")."""
    for token in tokens:
        if token in READ_VERBS:
            return "read"
        if token in WRITE_VERBS:
            return "write"
    return None


def _name_kind(name: str) -> Kind | None:
    tokens = words(name)
    if not tokens:
        return None
    if tokens[0] in ("finish", "final"):
        return "read"
    found = _verb_kind(tokens[:1])
    if found:
        return found
    # Names glued together (ToolBench: "getnewsbytopic_for_x"): a known verb that starts the first word.
    for verbs, kind in ((READ_VERBS, "read"), (WRITE_VERBS, "write")):
        if any(len(v) >= 3 and tokens[0].startswith(v) for v in verbs):
            return kind
    return None


def schemas_by_name(tools_json: str | None) -> dict[str, dict]:
    """name -> function schema from a trajectory's `tools` JSON (OpenAI or bare schemas)."""
    if not tools_json:
        return {}
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError:
        return {}
    out = {}
    for t in tools if isinstance(tools, list) else []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn
    return out


@functools.lru_cache(maxsize=4096)  # a run's results are judged again for each window of it
def is_error(result: str | None) -> bool:
    """A tool result that reports failure, or none at all: never an achievement."""
    if result is None or not result.strip():
        return True
    text = result.strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return _error_text(text)
    return _error_value(parsed)


def _error_text(text: str) -> bool:
    if ERROR_START.match(text) or HTTP_ERROR.search(text[:SHORT_RESULT]):
        return True
    return len(text) <= SHORT_RESULT and bool(ERROR_WORDS.search(text))


def _error_value(value: Any) -> bool:
    if value in (None, "", [], {}):
        return True
    if isinstance(value, str):
        return is_error(value)
    if not isinstance(value, dict):
        return False
    if any(value.get(k) for k in ("error", "errors", "exception", "error_message")):
        return True
    for key in ("status", "status_code", "statusCode", "code"):
        code = value.get(key)
        if isinstance(code, int | str) and str(code).isdigit() and 400 <= int(code) < 600:
            return True
    if "response" in value and len(value) <= 3:  # ToolBench: {"error": "", "response": <the API's answer>}
        return _error_value(value["response"])
    message = next((value[k] for k in ("message", "msg", "detail") if isinstance(value.get(k), str)), None)
    return message is not None and len(value) <= 3 and bool(ERROR_WORDS.search(message))
