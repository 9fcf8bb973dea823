"""The content-addressed answer cache on disk: one JSON file per request, under the sha256 of
everything that determines the answer (model identity, messages, sampling parameters, response
format). Same key, same answer: a rerun makes zero calls and its outputs stay byte-identical.

An entry is `{"key", "sha256" (of the body), "body": {"raw", "prompt_tokens", "completion_tokens"}}`
at `<cache_dir>/<key[:2]>/<key>.json`, written to a temporary file and renamed into place, so a
killed run never leaves half an entry; an unreadable or corrupt entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("agenther.llm")

_MADE_DIRS: set[Path] = set()  # cache shard folders this process has created or found


def request_key(request: dict) -> str:
    """The cache key of a request (the dict complete_json builds, with the api_base of a server
    named by its model name): everything that can change an answer. Changing what goes in
    invalidates every user's cache: do it only when an answer could differ."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: Path | str, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.json"


def get(cache_dir: Path | str | None, key: str) -> dict | None:
    """The cached body for `key`, or None (no cache, no entry, or an entry that fails its checks)."""
    if cache_dir is None:
        return None
    path = entry_path(cache_dir, key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("unreadable LLM cache entry %s (%s): treated as a miss", path.name, exc)
        return None
    try:
        entry = json.loads(text)
        body = entry["body"]
        if entry["key"] != key or entry["sha256"] != _digest(body):
            raise ValueError("checksum mismatch")
        return body
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("corrupt LLM cache entry %s (%s): treated as a miss", path.name, exc)
        return None


def put(cache_dir: Path | str | None, key: str, body: dict) -> None:
    if cache_dir is None:
        return
    path = entry_path(cache_dir, key)
    folder = path.parent
    if folder not in _MADE_DIRS:  # one mkdir per shard folder and process, not one per call
        folder.mkdir(parents=True, exist_ok=True)
        _MADE_DIRS.add(folder)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    entry = json.dumps({"key": key, "sha256": _digest(body), "body": body}, sort_keys=True)
    try:
        tmp.write_text(entry)
    except FileNotFoundError:  # the folder went away since (a test or a user cleaned the cache)
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(entry)
    tmp.replace(path)  # atomic: a killed run never leaves half an entry


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
