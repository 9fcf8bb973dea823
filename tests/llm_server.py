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


def record_of(request: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """The relabel prompt's record: ([(tool words, argument text) of each DONE line], [facts told])."""
    text = user_text(request).partition("RECORD:\n<<<\n")[2].split("\n>>>", 1)[0]
    done_part, _, told_part = text.partition("TOLD THE USER:\n")
    done_part = done_part.partition("LOOKED UP:\n")[0]
    actions = [(m.group(1), m.group(2) or "") for line in done_part.splitlines()
               if (m := DONE_LINE.match(line)) and line != "- (no change of state)"]
    facts = [line[3:].rstrip('"') for line in told_part.splitlines() if line.startswith('- "')]
    return actions, facts


def grounded_relabel(request: dict, confidence: float = 0.9) -> str:
    """What a careful relabeler writes: each change of the record asked for in its own words with
    every detail, or (no change) a question about what the agent reported."""
    actions, facts = record_of(request)
    asks = []
    for tool, args in actions:
        verb, *rest = tool.split()
        asks.append(f"{verb} the {' '.join(reversed(rest))} with {args}" if args else f"{verb} the {' '.join(rest)}")
    if asks:
        prompt = "Please " + ", and ".join(asks) + "."
    elif facts:  # ask about the details the agent reported: its names and numbers
        details = re.findall(r"\b(?=[A-Z0-9]*\d)(?=[A-Z0-9]*[A-Z])[A-Z0-9]{4,}\b", facts[-1])  # IDs: HAT084
        prompt = "Can you tell me about " + " and ".join(dict.fromkeys(details[:3]) or ["my trip"]) + "?"
    else:
        return json.dumps({"hindsight_prompt": "Tell me what you found.", "confidence": 0.2})
    return json.dumps({"hindsight_prompt": prompt, "confidence": confidence})


def evidence_steps(request: dict) -> list[int]:
    return [int(s) for s in re.findall(r"^\[(\d+)\] TOOL RESULT", user_text(request), re.M)]


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
