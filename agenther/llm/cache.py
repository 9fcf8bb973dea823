"""The content-addressed answer cache on disk: one JSON file per request, under the sha256 of
everything that determines the answer (model identity, messages, sampling parameters, response
format). Same key, same answer: a rerun makes zero calls and its outputs stay byte-identical.

An entry is `{"key", "sha256" (of the body), "body": {"raw", "prompt_tokens", "completion_tokens"}}`
at `<cache_dir>/<key[:2]>/<key>.json`, written to a temporary file and renamed into place, so a
killed run never leaves half an entry; an unreadable or corrupt entry is a miss.

`cache_dir` may be `s3://bucket/prefix`: the same entries as objects `<prefix>/<key[:2]>/<key>.json`,
shared by every process and machine that reaches the store (Dask workers, several runs). A PUT is
atomic (a reader sees the old object, the new one or none), and two writers of one key write the
same answer's entry or equally valid ones, so no lock is needed. One boto3 client per process
(agenther.s3.shared_client: settings and keys from the environment, never from the URL, never logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from agenther.llm.errors import LLMError
from agenther.s3 import (
    NOT_FOUND,
    ensure_bucket,
    error_code,
    is_s3_url,
    parse_s3_url,
    s3_settings,
    shared_client,
    store_errors,
)

log = logging.getLogger("agenther.llm")

_MADE_DIRS: set[Path] = set()  # cache shard folders this process has created or found
_BUCKETS: set[tuple[int, str]] = set()  # (pid, bucket) this process has made sure exists


class CacheError(LLMError):
    """An s3:// cache cannot be written after the client's retries: the run stops with one line,
    as for a failing provider (`transient` for a store that is down or overloaded, so an
    orchestrator may retry; not for refused keys or a missing permission)."""


def cache_location(cache_dir: str | Path | None) -> Path | str | None:
    """llm.cache_dir as the cache functions take it: a local folder as a Path, an s3:// URL as
    it is (a Path would fold "s3://" into "s3:/"), None or "" for no cache."""
    if not cache_dir:
        return None
    return cache_dir if is_s3_url(cache_dir) else Path(cache_dir)


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
    if is_s3_url(cache_dir):
        text = _s3_get(cache_dir, key)
        if text is None:
            return None
        return _checked(text, key, f"{key}.json")
    path = entry_path(cache_dir, key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("unreadable LLM cache entry %s (%s): treated as a miss", path.name, exc)
        return None
    return _checked(text, key, path.name)


def _checked(text: str, key: str, name: str) -> dict | None:
    try:
        entry = json.loads(text)
        body = entry["body"]
        if entry["key"] != key or entry["sha256"] != _digest(body):
            raise ValueError("checksum mismatch")
        return body
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("corrupt LLM cache entry %s (%s): treated as a miss", name, exc)
        return None


def put(cache_dir: Path | str | None, key: str, body: dict) -> None:
    if cache_dir is None:
        return
    entry = json.dumps({"key": key, "sha256": _digest(body), "body": body}, sort_keys=True)
    if is_s3_url(cache_dir):
        _s3_put(cache_dir, key, entry)
        return
    path = entry_path(cache_dir, key)
    folder = path.parent
    if folder not in _MADE_DIRS:  # one mkdir per shard folder and process, not one per call
        folder.mkdir(parents=True, exist_ok=True)
        _MADE_DIRS.add(folder)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(entry)
    except FileNotFoundError:  # the folder went away since (a test or a user cleaned the cache)
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(entry)
    tmp.replace(path)  # atomic: a killed run never leaves half an entry


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# -- on S3 ------------------------------------------------------------------------------------------
def entry_object(cache_dir: str, key: str) -> tuple[str, str]:
    """(bucket, object key) of an entry under an s3:// cache_dir: the local layout, as keys."""
    bucket, prefix = parse_s3_url(cache_dir)
    return bucket, "/".join(part for part in (prefix, key[:2], f"{key}.json") if part)


REFUSED = ("403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")


def _s3_get(cache_dir: str, key: str) -> str | None:
    bucket, name = entry_object(cache_dir, key)
    try:
        return shared_client().get_object(Bucket=bucket, Key=name)["Body"].read().decode()
    except (*store_errors(), UnicodeDecodeError) as exc:
        if error_code(exc) in (*NOT_FOUND, "NoSuchBucket"):  # a first put creates the bucket
            return None
        log.warning("unreadable LLM cache entry %s (%s): treated as a miss", f"{key}.json",
                    error_code(exc) or type(exc).__name__)
        return None


def _s3_put(cache_dir: str, key: str, entry: str) -> None:
    bucket, name = entry_object(cache_dir, key)
    client = shared_client()
    try:
        if (os.getpid(), bucket) not in _BUCKETS:  # once per bucket and process, as the local cache's mkdir
            ensure_bucket(client, bucket, s3_settings().region)
            _BUCKETS.add((os.getpid(), bucket))
        client.put_object(Bucket=bucket, Key=name, Body=entry.encode(), ContentType="application/json")
    except store_errors() as exc:
        # The answer is in hand but could not be kept: say so plainly (no keys: settings stay out).
        code = error_code(exc)
        transient = not code or code.startswith("5") or code in ("SlowDown", "RequestTimeout", "InternalError",
                                                                  "ServiceUnavailable", "Throttling")
        hint = "; the store refused these keys: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's " \
               "permissions" if code in REFUSED else ""
        raise CacheError(f"LLM cache {cache_dir}: cannot write {key}.json ({code or exc}){hint}", transient) from None
