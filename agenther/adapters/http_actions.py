"""The HTTP-style text grammar: an agent that acts by writing requests as text lines.

    GET http://host/fhir/Patient?name=Peter&birthdate=1932-12-29
    POST http://host/fhir/Observation
    {"resourceType": "Observation", ...}
    FINISH(["S6534835"])

(MedAgentBench-style agents, or any agent told to answer with one HTTP request per turn.) Each
request is a call named by its method (GET is a read; POST, PUT, PATCH and DELETE write:
agenther/evidence/tools.py decides by the name) with arguments {"url", "query" (the query
string's parameters, if any), "body" (POST/PUT/PATCH: the JSON after the request line, or its
text when it is not JSON)}. The server's reply is the next user turn, kept whole as the result
("Invalid POST request", "Error in sending the GET request: ..." are error results). `FINISH(...)`
is the final report: a call named "Finish" with the text between its parentheses as `input`.
A request line may sit in a ``` fence or after some prose; text around it stays the turn's content.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

from agenther.adapters.grammar import FINISH, Grammar, call, one_call_per_turn

FENCE_LINE = re.compile(r"^[ \t]*```[\w-]*[ \t]*\n?", re.MULTILINE)
REQUEST = re.compile(r"^[ \t]*(?P<method>GET|POST|PUT|PATCH|DELETE)[ \t]+(?P<url>\S+)[ \t]*$", re.MULTILINE)
FINAL = re.compile(r"^[ \t]*FINISH[ \t]*\(", re.MULTILINE | re.IGNORECASE)
WITH_BODY = ("POST", "PUT", "PATCH")
_DECODER = json.JSONDecoder()


def parse_turn(text: str, step: int) -> tuple[str | None, dict] | None:
    """(the turn's text around the action, the call) or None when the turn holds no request line."""
    plain = FENCE_LINE.sub("", text)
    found = [m for m in (REQUEST.search(plain), FINAL.search(plain)) if m is not None]
    if not found:
        return None
    m = min(found, key=lambda x: x.start())
    before = plain[: m.start()].strip()
    if m.re is FINAL:
        inner, after = _parenthesized(plain[m.end():])
        if inner is None:
            return None  # "FINISH(" with no closing parenthesis: not a report we can read
        return _left(before, after), call(step, FINISH, {"input": inner.strip()})
    method, url = m["method"], m["url"]
    rest = plain[m.end():].strip()
    arguments = url_arguments(url)
    if method in WITH_BODY and rest:
        arguments["body"], rest = _body(rest)
    return _left(before, rest), call(step, method, arguments)


def url_arguments(url: str) -> dict:
    """{"url": the URL before "?", "query": its parameters} (a repeated parameter: a list)."""
    base, _, query = url.partition("?")
    params: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params[key] = [*params[key], value] if isinstance(params.get(key), list) else (
            [params[key], value] if key in params else value)
    return {"url": base, "query": params} if params else {"url": base}


def _body(text: str) -> tuple[object, str]:
    """The request body (JSON when it is JSON, else the text) and any text after it."""
    try:
        value, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return text, ""
    return value, text[end:].strip()


def _parenthesized(text: str) -> tuple[str | None, str]:
    """The text up to the parenthesis closing FINISH( (the last one on its line or after), and what follows."""
    close = text.rfind(")")
    if close < 0:
        return None, ""
    return text[:close], text[close + 1:].strip()


def _left(before: str, after: str) -> str | None:
    return "\n\n".join(t for t in (before, after) if t) or None


def _reply(text: str) -> str | None:
    return text  # the server's reply is the whole next user turn


def parse(messages: list[dict]) -> list[dict]:
    return one_call_per_turn(messages, parse_turn, _reply)


GRAMMAR = Grammar("http", parse, "HTTP-style lines: GET url?x=y, POST url + a JSON body, FINISH(answer); "
                                 "the replies in the next user turns")
