"""Cache keys for the stage tasks: what a batch's result depends on, and nothing else.

A key is the sha256 of
- the content of the task's input (a batch: the sha256 of the table it reads and its rows' range;
  ingest: the input log files' bytes),
- the params sections the stage's record names (agenther/stages/__init__.py: its `sections`, and
  `llm` when it asks the LLM; so `tools` for extract, relabel and verify), without settings that change how a run goes but not what it
  produces (agenther.params.RUNTIME_ONLY); llm.api_base is in: another server serving the same
  model name may answer otherwise (the LLM response cache keys on it too),
- the code version: the sha256 of the stage module's source and of every agenther module it
  imports (transitively), plus the source of the wrappers here (tasks/stages.py, tasks/caching.py),
- the prompt templates' hashes (agenther.prompts.all_hashes()).

Prefect's `INPUTS` policy alone would share entries between different tasks with equal inputs
and ignore code/prompt changes (STACK.md), hence a key of our own.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
from functools import cache
from pathlib import Path

from agenther import prompts
from agenther.adapters import log_input
from agenther.envs import GROUP
from agenther.params import RUNTIME_ONLY, Params
from agenther.stages import STAGES

KEY_VERSION = "agenther-prefect-cache-v2"  # bump to invalidate every entry at once (v2: BatchResult.n_in)

WRAPPERS = ("tasks.stages", "tasks.caching")
NOT_IN_KEY = {"llm": RUNTIME_ONLY.get("llm", ())}


def sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))  # length-prefixed: no ambiguity between parts
        h.update(data)
    return h.hexdigest()


def files_digest(path: str | Path) -> str:
    """sha256 of the log files ingest would read under `path` (names, sizes and bytes; for S3
    objects names, ETags and sizes: see agenther.workdir.logs_digest)."""
    try:
        found = log_input(path)
    except (OSError, ValueError) as exc:
        return sha256("unreadable", str(path), str(exc))  # ingest raises its own clear error
    if not found.exists:
        return sha256("missing", str(path))
    h = hashlib.sha256()
    for f in found.files:
        h.update(sha256(found.name_of(f), f.read_bytes() if isinstance(f, Path) else f.signature).encode())
    return h.hexdigest()


def params_digest(params: Params, sections: tuple[str, ...]) -> str:
    chosen = {section: getattr(params, section).model_dump(mode="json", exclude=set(NOT_IN_KEY.get(section, ())))
              for section in sections}
    return sha256(json.dumps(chosen, sort_keys=True))


def module_file(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def agenther_imports(package: str, source: str) -> set[str]:
    """agenther modules named by `source`'s imports (`from agenther import schema` names a module);
    `package` is the importing module's package, for relative imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("agenther")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("agenther"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # kept below only if it is a module
    return found


def agenther_modules(*roots: str) -> dict[str, Path]:
    """`roots` and every agenther module they import, transitively (imports inside functions
    too): module name -> source file."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            path = module_file(name)
        except (ImportError, ValueError):
            path = None
        if path is None:
            continue  # `from agenther.x import some_function`: not a module
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(agenther_imports(package, path.read_text(encoding="utf-8")) - seen.keys())
        if name == "agenther.envs":  # environments are loaded by entry point, not imported: the built-in ones count
            todo.extend(ep.module for ep in importlib.metadata.entry_points(group=GROUP)
                        if ep.module.startswith("agenther."))
    return seen


@cache
def code_version(*modules: str) -> str:
    """sha256 over the source of `modules` and every agenther module they import, transitively."""
    sources = {name: sha256(path.read_text(encoding="utf-8")) for name, path in agenther_modules(*modules).items()}
    return sha256(json.dumps(sorted(sources.items())))


@cache
def wrappers_version() -> str:
    """The wrappers' own source, not what they import: the package and summary code they reach
    does not change what a stage computes."""
    return sha256(*(module_file(name).read_text(encoding="utf-8") for name in WRAPPERS))


def stage_key(stage: str, params: Params, content_digest: str) -> str:
    """The cache key of one run of `stage` over input content `content_digest`."""
    record = STAGES[stage]  # the params sections its output depends on, the module that computes it
    code = sha256(code_version(record.module), wrappers_version())
    prompt_hashes = json.dumps(prompts.all_hashes(), sort_keys=True) if stage != "ingest" else ""
    return sha256(KEY_VERSION, stage, content_digest, params_digest(params, record.params_read(params)),
                  code, prompt_hashes)
