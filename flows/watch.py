"""The `watch-logs` flow: notice new log files in a folder and announce each with an event.

Deployed on a short interval (flows/serve.py, prefect.yaml). Each run lists the folder's
.json/.jsonl files, compares them with what it has seen (a small JSON state file, by default
`.agenther-cache/watch/<folder>-<hash>.json` under the working folder: outside the watched
folder, which may be DVC-tracked; not a Prefect Variable, which holds at most 5,000
characters, too few for a growing folder), and emits one `agenther.logs.arrived` event per
new or changed file:

    resource: {"prefect.resource.id": "agenther.logs.<absolute path>"}
    payload:  {"path": "<absolute path>", "name": "<slug of the path>", "folder": ..., "size": ...}

The `hindsight/on-new-logs` deployment has a trigger on that event and runs the pipeline
with `input` = the file and `out_dir` = a folder of its own (see flows/serve.py).
A file younger than `min_age_s` may still be being written: it waits for the next run.
A file whose event could not be sent is not marked as seen: the next run tries again.
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
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event

from agenther.adapters import SUFFIXES

EVENT = "agenther.logs.arrived"
RESOURCE_PREFIX = "agenther.logs."
STATE_DIR = Path(".agenther-cache/watch")  # git-ignored, like the LLM cache


def slug(relative: Path) -> str:
    """A folder name for a log file's outputs: 'a/b/run 1.jsonl' -> 'a-b-run-1'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(relative.with_suffix("")).replace(os.sep, "-")).strip("-") or "log"


def default_state(folder: Path) -> Path:
    absolute = str(folder.resolve())
    return STATE_DIR / f"{slug(Path(folder.resolve().name))}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}.json"


def scan(folder: Path, min_age_s: float) -> dict[str, list[int]]:
    """Settled log files under `folder`: absolute path -> [size, mtime_ns]."""
    now = time.time()
    found = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix not in SUFFIXES or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        st = p.stat()
        if now - st.st_mtime >= min_age_s:
            found[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
    return found


def _load(state: Path) -> dict[str, list[int]]:
    try:
        return json.loads(state.read_text())["seen"]
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError):
        get_run_logger().warning("unreadable watch state %s: starting afresh (every file counts as new)", state)
        return {}


def _save(state: Path, seen: dict[str, list[int]]) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"seen": seen}, indent=1, sort_keys=True))
    tmp.replace(state)  # atomic: a killed run never leaves half a state file


@flow(name="watch-logs", log_prints=True)
def watch_logs(folder: str = "data/incoming", state_file: str | None = None, min_age_s: float = 2.0) -> list[str]:
    """Emit `agenther.logs.arrived` for every new or changed log file in `folder`; returns their paths."""
    root = Path(folder)
    if not root.is_dir():
        print(f"{root} does not exist (yet): nothing to watch")
        return []
    state = Path(state_file) if state_file else default_state(root)
    state.parent.mkdir(parents=True, exist_ok=True)
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another watch-logs run is scanning {root}: skipped")
            return []
        return _announce(root, state, min_age_s)


def _announce(root: Path, state: Path, min_age_s: float) -> list[str]:
    seen = {p: sig for p, sig in _load(state).items() if Path(p).exists()}  # forget deleted files
    current = scan(root, min_age_s)
    arrived = [path for path, signature in current.items() if seen.get(path) != signature]
    sent = []
    for path in arrived:
        size = current[path][0]
        event = emit_event(
            event=EVENT,
            resource={"prefect.resource.id": RESOURCE_PREFIX + path, "prefect.resource.name": Path(path).name},
            payload={"path": path, "name": slug(Path(path).relative_to(root.resolve())), "folder": str(root.resolve()),
                     "size": size},
        )
        if event is None:  # no events client: no Prefect API to send to
            get_run_logger().warning("could not emit %s for %s (is PREFECT_API_URL set?)", EVENT, path)
            continue
        seen[path] = current[path]
        sent.append(path)
    _save(state, seen)
    print(f"{len(sent)} new log file(s) in {root}" + "".join(f"\n  {p}" for p in sent))
    return sent


if __name__ == "__main__":
    watch_logs()
