"""The `watch-logs` flow: notice new log files in a folder or new objects under an S3 prefix,
and announce each with an event.

Deployed on a short interval (flows/serve.py, prefect.yaml). Each run lists the folder's (or the
prefix's) .json/.jsonl files, compares them with what it has seen (a small JSON state file, by default
`.agenther-cache/watch/<name>-<hash>.json` under the working folder: outside the watched
folder, which may be DVC-tracked; not a Prefect Variable, which holds at most 5,000
characters, too few for a growing folder), and emits one `agenther.logs.arrived` event per
new or changed file:

    resource: {"prefect.resource.id": "agenther.logs.<absolute path or s3:// URL>"}
    payload:  {"path": "<absolute path or s3:// URL>", "name": "<slug of the path under the root>",
               "folder": <the watched root>, "size": ...}

The `hindsight/on-new-logs` deployment has a trigger on that event and runs the pipeline
with `input` = the file (ingest reads s3:// URLs) and `out_dir` = a folder of its own (see flows/serve.py).
One flow for both kinds of root; only the listing differs (`FolderLister`, `PrefixLister`):
- a file is identified by its path, size and mtime; an object by its key, ETag and size
  (listed page by page; S3 has no mtime a writer controls, and a new upload gets a new ETag);
- one younger than `min_age_s` (file mtime; object LastModified, the store's clock) may still be
  being written (or, on S3, replaced by a quick second upload): it waits for the next run.
A file whose event could not be sent is not marked as seen: the next run tries again; an event
sent again for a version already announced (a run killed before it saved its state) carries the
same id, which the server deduplicates.
Overlapping runs (a slow tick, late runs after a restart) are kept apart by a lock on the
state file, not by a deployment concurrency limit: the OS releases a lock when its process
dies, where a server-side slot held by a killed run stays taken and silences the watcher.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from prefect import flow, get_run_logger
from prefect.events import emit_event

from agenther.adapters import SUFFIXES
from agenther.s3 import folder_prefix, is_s3_url, list_objects, parse_s3_url

EVENT = "agenther.logs.arrived"
RESOURCE_PREFIX = "agenther.logs."
STATE_DIR = Path(".agenther-cache/watch")  # git-ignored, like the LLM cache


def slug(relative: Path | PurePosixPath) -> str:
    """A folder name for a log file's outputs: 'a/b/run 1.jsonl' -> 'a-b-run-1'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(relative.with_suffix("")).replace(os.sep, "-")).strip("-") or "log"


@dataclass(frozen=True)
class Listed:
    """One log file as a lister sees it."""
    where: str  # absolute path or s3:// URL: what the event names and hindsight reads
    relative: PurePosixPath  # under the watched root: names the run's outputs
    signature: list  # what says it changed: [size, mtime_ns] (file) or [size, ETag] (object)
    age_s: float  # since it was last written

    @property
    def size(self) -> int:
        return self.signature[0]


def _is_log(relative: PurePosixPath) -> bool:
    return relative.suffix in SUFFIXES and not any(part.startswith(".") for part in relative.parts)


class FolderLister:
    """The log files under a local folder."""

    def __init__(self, folder: str):
        self.root = Path(folder).resolve()

    def __str__(self) -> str:
        return str(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def files(self) -> dict[str, Listed]:
        now, found = time.time(), {}
        for p in sorted(self.root.rglob("*")):
            relative = PurePosixPath(p.relative_to(self.root).as_posix())
            if p.is_file() and _is_log(relative):
                st = p.stat()
                found[str(p)] = Listed(str(p), relative, [st.st_size, st.st_mtime_ns], now - st.st_mtime)
        return found


class PrefixLister:
    """The log objects under s3://bucket/prefix/ (settings and keys from the environment: agenther/s3.py)."""

    def __init__(self, url: str):
        self.bucket, key = parse_s3_url(url)
        self.prefix = folder_prefix(key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def exists(self) -> bool:
        return True  # an empty prefix is an empty folder: objects may come

    def files(self) -> dict[str, Listed]:
        now, found = time.time(), {}
        for o in list_objects(self.bucket, self.prefix):
            relative = PurePosixPath(o.key.removeprefix(self.prefix))
            if _is_log(relative):
                found[o.url] = Listed(o.url, relative, [o.size, o.etag], now - o.last_modified)
        return found


def lister(root: str) -> FolderLister | PrefixLister:
    return PrefixLister(root) if is_s3_url(root) else FolderLister(root)


def default_state(root: str | Path) -> Path:
    where = str(lister(str(root)))
    name = slug(PurePosixPath(where.rstrip("/").rsplit("/", 1)[-1] or "bucket"))
    return STATE_DIR / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}.json"


def _load(state: Path) -> dict[str, list]:
    try:
        return json.loads(state.read_text())["seen"]
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError):
        get_run_logger().warning("unreadable watch state %s: starting afresh (every file counts as new)", state)
        return {}


def _save(state: Path, seen: dict[str, list]) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"seen": seen}, indent=1, sort_keys=True))
    tmp.replace(state)  # atomic: a killed run never leaves half a state file


@flow(name="watch-logs", log_prints=True)
def watch_logs(folder: str = "data/incoming", state_file: str | None = None, min_age_s: float = 2.0) -> list[str]:
    """Emit `agenther.logs.arrived` for every new or changed log file in `folder` (a local folder
    or an s3://bucket/prefix/); returns their paths or URLs."""
    root = lister(folder)
    if not root.exists():
        print(f"{root} does not exist (yet): nothing to watch")
        return []
    state = Path(state_file) if state_file else default_state(folder)
    state.parent.mkdir(parents=True, exist_ok=True)
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another watch-logs run is scanning {root}: skipped")
            return []
        return _announce(root, state, min_age_s)


def _announce(root: FolderLister | PrefixLister, state: Path, min_age_s: float) -> list[str]:
    listed = root.files()
    seen = {p: sig for p, sig in _load(state).items() if p in listed}  # forget deleted files
    arrived = [f for where, f in listed.items() if f.age_s >= min_age_s and seen.get(where) != f.signature]
    sent = []
    for f in arrived:
        event = emit_event(
            event=EVENT,
            # One id per file version: if this run dies between sending and saving the state, the
            # next run sends the same event again and the server drops it as already seen.
            id=uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([f.where, f.signature])),
            resource={"prefect.resource.id": RESOURCE_PREFIX + f.where, "prefect.resource.name": f.relative.name},
            payload={"path": f.where, "name": slug(f.relative), "folder": str(root), "size": f.size},
        )
        if event is None:  # no events client: no Prefect API to send to
            get_run_logger().warning("could not emit %s for %s (is PREFECT_API_URL set?)", EVENT, f.where)
            continue
        seen[f.where] = f.signature
        sent.append(f.where)
    _save(state, seen)
    print(f"{len(sent)} new log file(s) in {root}" + "".join(f"\n  {p}" for p in sent))
    return sent


if __name__ == "__main__":
    watch_logs()
