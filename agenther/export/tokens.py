"""Token lengths of the TRL exports, measured with a real tokenizer: the embedded local model's.

The GGUF of the local model (agenther.llm.models) carries its tokenizer and chat template. Its
vocabulary is loaded alone (llama.cpp `vocab_only`: no weights, well under a second), each row is
rendered with the chat template the way transformers renders it (trim_blocks, lstrip_blocks, its
`tojson`), and the text is tokenized. That is what TRL feeds the model: SFT rows as
`messages` + `tools`; preference rows as prompt + chosen and prompt + rejected (DPO's `max_length`
bounds the pair's longer side).

Tokenizing is the slow part (llama.cpp's BPE: ~12 ms of CPU for a ~22 kB tau-bench row, ~16 kB of
which is the same policy and tool schemas in every row). llama.cpp splits a text at its special
tokens first and tokenizes each piece on its own, so the count of a row is the count of its special
tokens plus the counts of the pieces between them: the text is split at the template's turn markers
that the vocabulary parses as one special token (ChatML's `<|im_start|>` / `<|im_end|>`), and each
piece is counted once per distinct text (a bounded cache keyed by its digest): the system turn
shared by every row is tokenized once per run (tests/test_exports.py checks the sum against
llama.cpp's count of the whole text).

A row is whatever conversation its trainer tokenizes: `messages`; `prompt` + `completion`; or
`prompt` + `chosen` and `prompt` + `rejected` (the longer counts). `tokens` in the stats is the sum
over the rows: what one epoch over the file feeds the model.

`max_length` is what the card's loading snippets set: the longest row plus a margin for tokenizer
differences, rounded up to a multiple of 128, so that no sample is cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

PERCENTILES = (50, 90, 99)
MARGIN = 32  # tokens between the longest measured row and max_length
ROUND = 128
# A row whose rendered text is longer than this is not tokenized: its UTF-8 byte count stands in, an
# upper bound for a byte-level BPE (a token is at least one byte). 1 MB is ~250k tokens, beyond any
# context window, and BPE over one such text (e.g. a 50 MB tool result) takes gigabytes.
MAX_EXACT_BYTES = 1_000_000
# Turn markers a chat template writes literally, e.g. <|im_start|> (ChatML), <|eot_id|> (Llama 3).
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")
CACHE_PIECES = 1 << 16  # counts of distinct pieces kept (a digest and an int each); emptied when full


class ChatTokenizer:
    """A GGUF's tokenizer and chat template, without the model's weights."""

    def __init__(self, gguf: Path, name: str):
        import jinja2
        import llama_cpp
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        with _quiet():
            self.vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        template = self.vocab.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{gguf.name} carries no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(template)
        self.name = name
        # The template's markers that llama.cpp parses as one special token: the text splits there.
        markers = sorted({m for m in MARKER.findall(template) if self._is_special(m)}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, markers)) + ")") if markers else None
        self._markers = frozenset(markers)
        self._pieces: dict[bytes, int] = {}

    def _tokens(self, data: bytes) -> int:
        return len(self.vocab.tokenize(data, add_bos=False, special=True))

    def _is_special(self, marker: str) -> bool:
        return self._tokens(marker.encode()) == 1 and len(self.vocab.tokenize(marker.encode(), add_bos=False,
                                                                               special=False)) > 1

    def _piece(self, text: str) -> int:
        """The tokens of the text between two markers, counted once per distinct text."""
        data = text.encode()
        key = hashlib.blake2b(data, digest_size=16).digest()
        n = self._pieces.get(key)
        if n is None:
            if len(self._pieces) >= CACHE_PIECES:
                self._pieces.clear()
            n = self._pieces[key] = self._tokens(data)
        return n

    def count(self, messages: list[dict], tools: list[dict] | None) -> tuple[int, bool]:
        """(tokens, exact): exact unless the text is over MAX_EXACT_BYTES (then its byte count)."""
        text = self.template.render(messages=messages, tools=tools or None, add_generation_prompt=False)
        data = text.encode()
        if len(data) > MAX_EXACT_BYTES:
            return len(data), False
        if self._split is None:
            return self._tokens(data), True
        return sum(1 if piece in self._markers else self._piece(piece)
                   for piece in self._split.split(text) if piece), True


@contextlib.contextmanager
def _quiet():
    """llama.cpp prints its loading log on fd 2 even when asked not to."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()  # llama-cpp-python logs through Python's (buffered) sys.stderr
        os.dup2(saved, 2)
        os.close(saved)


def local_tokenizers(model: str | None) -> Iterator[tuple[ChatTokenizer | None, str]]:
    """The tokenizers of local model `model`, then of the other installed ones, in that order:
    (tokenizer, "") or (None, why this one cannot be had)."""
    from agenther.llm import models as local_model

    for name in (n for n in dict.fromkeys([model, local_model.DEFAULT_MODEL, *sorted(local_model.MODELS)]) if n):
        try:
            path = local_model.model_path(name)
        except Exception as exc:  # not installed here: try the next one
            yield None, f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            continue
        try:
            yield ChatTokenizer(path, name), ""
        except Exception as exc:  # no llama.cpp runtime, or no template in the file
            yield None, f"{name}: {exc}"


def local_tokenizer(model: str | None) -> tuple[ChatTokenizer | None, str]:
    """(the first tokenizer local_tokenizers gives, why none) ."""
    reasons = []
    for tok, why in local_tokenizers(model):
        if tok is not None:
            return tok, ""
        reasons.append(why)
    return None, "; ".join(reasons) or "no local model"


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def max_length_for(longest: int) -> int:
    return ROUND * math.ceil((longest + MARGIN) / ROUND)


def stats(lengths: list[tuple[int, bool]]) -> dict:
    """Percentiles of the rows' lengths; `upper_bounds`: rows counted in bytes (see MAX_EXACT_BYTES)."""
    values = sorted(n for n, _ in lengths)
    out = {"rows": len(values), "tokens": sum(values), **{f"p{p}": percentile(values, p) for p in PERCENTILES},
           "max": values[-1], "max_length": max_length_for(values[-1])}
    bounded = sum(not exact for _, exact in lengths)
    if bounded:
        out["upper_bounds"] = bounded
    return out


def conversations(row: dict) -> list[list[dict]]:
    """The conversation(s) a trainer tokenizes from one row (see the module docstring)."""
    if "messages" in row:
        return [row["messages"]]
    sides = [side for side in ("completion", "chosen", "rejected") if side in row]
    if "prompt" not in row or not sides:
        raise ValueError(f"a row with keys {sorted(row)} is no conversation a trainer reads")
    return [row["prompt"] + row[side] for side in sides]


def row_lengths(tok: ChatTokenizer, lines: Iterable[str]) -> list[tuple[int, bool]]:
    """(tokens, exact) per JSONL row: its longest conversation, rendered with the row's `tools`."""
    out = []
    for line in lines:
        row = json.loads(line)
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        counts = [tok.count(messages, tools) for messages in conversations(row)]
        out.append((max(n for n, _ in counts), all(exact for _, exact in counts)))
    return out
