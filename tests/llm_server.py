"""An OpenAI-compatible HTTP server that tests start on loopback, answering from a script.

`brain(request) -> Reply | str` decides each answer; a str is the assistant's content.
A Reply can also be a fault (HTTP status, headers, body) or a slow answer. Every request
body is recorded so tests can assert on what the pipeline really sent.

Which prompt a request carries (`prompt_kind`) is read from the JSON schema the client sends
(agenther/llm/answers.py: its title is the prompt template's name), never from the prompt's wording,
so editing a prompt misroutes nothing. A brain that raises (careful_brain on a prompt it has no
answer for) gets HTTP 400 back with the reason, which is also printed, kept in `errors`, and
raised when the server stops, so the test fails naming the prompt rather than with a bare 400.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    content: str = ""
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    # Transport faults (all off by default):
    raw_body: bytes | None = None  # send these bytes as the HTTP body instead of a completion
    truncate: bool = False  # announce the full Content-Length, send half the body, close
    drop: bool = False  # close the connection without any response


def not_json_body() -> Reply:
    """HTTP 200 whose body is not JSON at all (a proxy's HTML error page)."""
    return Reply(raw_body=b"<html><body>502 upstream hiccup</body></html>")


def truncated() -> Reply:
    """A completion cut off mid-body: the connection closes before Content-Length bytes arrive."""
    return Reply('{"never": "complete"}', truncate=True)


def dropped() -> Reply:
    """The server accepts the request, then closes the connection without answering."""
    return Reply(drop=True)


Brain = Callable[[dict], "Reply | str"]


class FakeLLMServer:
    def __init__(self, brain: Brain):
        self.brain = brain
        self.requests: list[dict] = []
        self.answered: list[dict] = []  # requests whose full 200 answer was written
        self.errors: list[str] = []  # what the brain raised (a prompt it has no answer for)
        self.open = 0  # requests being answered now
        self.max_open = 0  # the most requests ever open at once (an in-flight limit, seen from here)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "local", "object": "model"}]})

            def do_POST(self):
                with server._lock:
                    server.open += 1
                    server.max_open = max(server.max_open, server.open)
                try:
                    self._answer()
                finally:
                    with server._lock:
                        server.open -= 1

            def _answer(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                try:
                    reply = server.brain(body)
                except Exception as exc:  # a test's script failed: say why, loudly
                    message = f"scripted LLM server: {type(exc).__name__}: {exc}"
                    with server._lock:
                        server.errors.append(message)
                    print(message, file=sys.stderr)
                    reply = Reply(message, status=400)
                if isinstance(reply, str):
                    reply = Reply(reply)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.raw_body is not None:
                    self._send_bytes(reply.status, reply.raw_body, reply.headers, "text/html")
                    return
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": reply.content or "fault", "type": "fault"}},
                               reply.headers)
                    return
                prompt_tokens = sum(len(str(m.get("content", ""))) // 4 for m in body["messages"])
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.content) // 4,
                              "total_tokens": prompt_tokens + len(reply.content) // 4},
                }, truncate=reply.truncate)
                if not reply.truncate:
                    with server._lock:
                        server.answered.append(body)

            def _send(self, status: int, payload: dict, headers: dict | None = None, truncate: bool = False):
                self._send_bytes(status, json.dumps(payload).encode(), headers, "application/json", truncate)

            def _send_bytes(self, status: int, data: bytes, headers: dict | None, content_type: str,
                            truncate: bool = False):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out and left
                import sys

                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeLLMServer:
        self.thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.errors and exc_type is None:
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise AssertionError(self.errors[0] + more)

    def prompts_of(self, kind: str) -> list[dict]:
        return [r for r in self.requests if prompt_kind(r) == kind]


# -- which prompt a request carries -------------------------------------------------------------
KINDS = ("relabel", "judge_trajectory", "judge_evidence", "judge_policy", "extract", "classify")
# A schema without a title (a client older than agenther/llm/answers.py) is known by its keys.
KINDS_BY_KEYS = {
    frozenset({"hindsight_prompt", "confidence"}): "relabel",
    frozenset({"satisfied", "consistent_with_user", "confidence", "reason"}): "judge_trajectory",
    frozenset({"requirements", "all_met", "confidence"}): "judge_evidence",
    frozenset({"violations", "allowed", "confidence"}): "judge_policy",
    frozenset({"achievements"}): "extract",
    frozenset({"failure_type", "severity", "recoverable", "reason"}): "classify",
}


def sent_schema(request: dict) -> dict:
    """The JSON schema in the request's response_format (llama.cpp's json_object form or
    OpenAI's json_schema form); {} when it carries none."""
    fmt = request.get("response_format") or {}
    return fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema") or {}


def prompt_kind(request: dict) -> str:
    """The prompt template a request was made from (one of KINDS), or "unknown"."""
    schema = sent_schema(request)
    if schema.get("title") in KINDS:
        return schema["title"]
    return KINDS_BY_KEYS.get(frozenset(schema.get("required") or ()), "unknown")


class UnscriptedPrompt(Exception):
    """A brain got a request it has no answer for."""


def unscripted(request: dict, brain: str = "careful_brain") -> UnscriptedPrompt:
    kind = prompt_kind(request)
    what = (f"{brain} has no answer for {kind!r} prompts" if kind != "unknown" else
            f"cannot tell which prompt this is: its response_format has no schema titled one of {KINDS} "
            f"(response_format {json.dumps(request.get('response_format'))[:120]})")
    return UnscriptedPrompt(f"{what}; the prompt starts: {user_text(request)[:120]!r}")


def user_text(request: dict) -> str:
    return request["messages"][0]["content"]


# -- a scripted brain that behaves like a careful relabeler and judges -------------------------


DONE_LINE = re.compile(r"^- ([a-z0-9 ]+?)(?:: (.*))?$")
TURN_HEAD = re.compile(r'^TURN (\d+)( \(FIRST MESSAGE\))?\. It was: "(.*)"$')


@dataclass
class TurnAsked:
    """One TURN of a relabel prompt: its number, whether it opens the sample, its original text and notes."""
    number: int
    opening: bool
    original: str
    notes: dict[str, list[str]]  # ASK FOR / NAME / NAME ONE OR MORE OF / KEEP / DO NOT NAME YET / ... -> values


def _block(request: dict, heading: str) -> str:
    """The data block after `heading` (RECORD:, TURNS:) of the relabel prompt, not the template's example."""
    return user_text(request).partition(f"{heading}\n<<<\n")[2].split("\n>>>", 1)[0]


def record_of(request: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """The relabel prompt's record: ([(tool words, argument text) of each DONE line], [facts told])."""
    text = _block(request, "RECORD:")
    done_part, _, told_part = text.partition("TOLD THE USER:\n")
    done_part = done_part.partition("LOOKED UP:\n")[0]
    actions = [(m.group(1), m.group(2) or "") for line in done_part.splitlines()
               if (m := DONE_LINE.match(line)) and line != "- (no change of state)"]
    facts = [line[3:].rstrip('"') for line in told_part.splitlines() if line.startswith('- "')]
    return actions, facts


def turns_of(request: dict) -> list[TurnAsked]:
    turns: list[TurnAsked] = []
    for line in _block(request, "TURNS:").splitlines():
        head = TURN_HEAD.match(line)
        if head:
            turns.append(TurnAsked(int(head.group(1)), bool(head.group(2)), head.group(3), {}))
        elif turns and ": " in line.strip():
            key, _, values = line.strip().partition(": ")
            turns[-1].notes[key] = [v.strip() for v in values.split(", ") if v.strip()]
    return turns


def _verb_phrase(tool_words: str) -> str:
    verb, *rest = tool_words.split()
    return f"{verb} the {' '.join(reversed(rest))}" if rest else verb


def _said(value: str, text: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(value.lower())}(?![\w])", text.lower()) is not None


def _spoken(value: str) -> str:
    """How a person writes a value: one_way -> one way."""
    return value.replace("_", " ") if not re.search(r"\d", value) else value


FILLER = re.compile(r"(?i)(alright|all right|okay|ok|thanks|thank you|great|sure|yes|no worries|that's all right|"
                    r"that's okay|hmm|i see|got it|perfect|understood)[ ,.!]*(thanks?|thank you)?[.!]*")


KIND_OF_FLIGHT = re.compile(r"(?i)nonstop|non-stop|direct|cheapest|cheaper|earliest|latest|fastest|shortest|quickest|"
                            r"morning|afternoon|evening|overnight|red-eye")


def careful_turn(turn: TurnAsked, facts: list[str]) -> str:
    """What a careful writer makes of one TURN: an opening says what is wanted and names what its notes
    list (nothing it must hold back); another turn keeps its sentences except those its notes drop,
    swaps the values SAY INSTEAD names, then adds what it must ask for and name."""
    n = turn.notes
    asks = [_verb_phrase(t) for t in n.get("ASK FOR", [])]
    names = n.get("NAME", [])
    # a sentence goes if it names a value it must not, or speaks of a change it must not ask for
    # (by the change's distinctive words: "update reservation baggages" -> bag...)
    # a wish that names a kind of flight ("the nonstop flight", "the cheapest one") loses only its word
    modifiers = [w for w in n.get("DO NOT ASK FOR", []) if KIND_OF_FLIGHT.fullmatch(w)]
    stems = [w[:3] for item in n.get("DO NOT ASK FOR", []) if item not in modifiers for w in item.split()
             if w not in ("update", "reservation", "reservations")]
    original = turn.original
    for w in modifiers:
        original = re.sub(rf"\b{re.escape(w)}\s+", "", original, flags=re.I)
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", original) if x]
    drop = [re.escape(v) for v in [*n.get("DO NOT NAME", []), *n.get("DO NOT NAME YET", [])]]
    drop += [rf"{re.escape(stem)}\w*" for stem in stems]
    def drops(text: str) -> bool:
        return any(re.search(rf"\b{d}\b", text, re.I) for d in drop)

    # what must go goes clause by clause ("... upgrading to economy class and adding three bags.")
    kept = []
    for x in sentences:
        if not drops(x):
            kept.append(x)
            continue
        clauses = [c for c in re.split(r",\s*|\s+and\s+", x.rstrip(".!?")) if c.strip() and not drops(c)]
        if clauses:
            kept.append(", ".join(clauses) + ".")
    if turn.opening:
        parts = [f"Hi, I'd like to {' and '.join(asks)}."] if asks else []
        # the original's sentences, but for small talk that only answered the agent ("Alright, thanks.")
        parts += [x for x in kept if not FILLER.fullmatch(x.strip())]
        if n.get("ASK"):
            subjects = n.get("NAME ONE OR MORE OF") or re.findall(
                r"\b(?=[A-Z0-9]*\d)(?=[A-Z0-9]*[A-Z])[A-Z0-9]{4,}\b", facts[-1] if facts else "")
            parts.append(f"Can you tell me about {' and '.join(subjects[:2]) or 'my trip'}?")
        if not parts:
            parts.append("Hi, I need some help, please.")
    else:
        text = " ".join(kept)
        for pair in n.get("SAY INSTEAD", []):
            m = re.match(r"'(.*)' \(not '(.*)'\)", pair)
            if m:
                text = re.sub(rf"\b{re.escape(m.group(2))}\b", m.group(1), text, flags=re.I)
        parts = [text] if text.strip() else ["Okay."]
        if asks:
            parts.append(f"Please {' and '.join(asks)}.")
    if names:
        parts.append(f"That is {', '.join(_spoken(v) for v in names)}.")
    missing = [_spoken(k) for k in n.get("KEEP", []) if k != "yes" and not _said(k, " ".join(parts))]
    if "yes" in n.get("KEEP", []) and not re.match(r"\W*(yes|yeah|sure|ok)", parts[0], re.I):
        parts.insert(0, "Yes.")
    if missing:
        parts.append(f"({', '.join(missing)})")
    return " ".join(parts)


def grounded_relabel(request: dict, confidence: float = 0.9) -> str:
    """What a careful relabeler writes: each TURN rewritten as its notes say (careful_turn)."""
    _, facts = record_of(request)
    turns = [{"turn": t.number, "text": careful_turn(t, facts)} for t in turns_of(request)]
    return json.dumps({"turns": turns, "confidence": confidence})


def evidence_steps(request: dict) -> list[int]:
    """The tool results a careful evidence judge can cite: those that show something."""
    return [int(s) for s in re.findall(r"^\[(\d+)\] TOOL RESULT[^:\n]*: *\S", user_text(request), re.M)]


def careful_except(kind: str, answer: Callable[[dict], Reply | str]) -> Brain:
    """careful_brain, but prompts of `kind` get `answer(request)`: the usual shape of a test
    that scripts one misbehaving judge or relabeler."""
    return lambda request: answer(request) if prompt_kind(request) == kind else careful_brain(request)


def careful_brain(request: dict) -> Reply | str:
    kind = prompt_kind(request)
    if kind == "relabel":
        return grounded_relabel(request)
    if kind == "judge_policy":
        return json.dumps({"violations": [], "allowed": True, "confidence": 0.9})
    if kind == "judge_trajectory":
        if "REQUEST:\nCan you tell me about" in user_text(request):
            # A careful judge finds the scripted relabeler's questions about a report too vague
            # (so the scripted world has judge rejections, as a real one has).
            return json.dumps({"satisfied": False, "consistent_with_user": True, "confidence": 0.8,
                               "reason": "the request is vaguer than what the run reported"})
        return json.dumps({"satisfied": True, "consistent_with_user": True, "confidence": 0.9, "reason": "done"})
    if kind == "judge_evidence":
        steps = evidence_steps(request)
        return json.dumps({"requirements": [{"requirement": "the request", "step": steps[0] if steps else None,
                                             "met": bool(steps)}],
                           "all_met": bool(steps), "confidence": 0.9})
    raise unscripted(request)


def picky_brain(request: dict) -> Reply | str:
    """careful_brain, except that the trajectory judge turns down about a third of the relabels
    (deterministically, by the prompt's crc32): a realistic acceptance rate for the between-stage gates."""
    if prompt_kind(request) == "judge_trajectory" and zlib.crc32(request["messages"][0]["content"].encode()) % 3 == 0:
        return json.dumps({"satisfied": False, "consistent_with_user": True, "confidence": 0.9, "reason": "no"})
    return careful_brain(request)


def slow(brain: Callable[[dict], Reply | str], delay_s: float) -> Callable[[dict], Reply]:
    """`brain` answering every call after `delay_s` (a provider's latency)."""
    def answer(request: dict) -> Reply:
        reply = brain(request)
        reply = Reply(reply) if isinstance(reply, str) else reply
        reply.delay_s = delay_s
        return reply
    return answer
