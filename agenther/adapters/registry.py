"""The log formats ingest knows: one registry, the built-in formats registered like a plugin's.

What a format is: agenther/adapters/adapter.py. The built-in modules (tau_bench, toolbench,
messages) each expose `ADAPTER`, registered below the way a plugin's is; a plugin package exposes
its own under the `agenther.adapters` entry-point group, e.g. in its pyproject.toml:

    [project.entry-points."agenther.adapters"]
    my-format = "my_package.my_module:ADAPTER"

Adding a format is that one module: detection, `--format`, the trajectories gate's allowed
`source_format` values and which logs carry more than a success flag all read this registry.
"""

from __future__ import annotations

from agenther.adapters import messages, tau_bench, toolbench
from agenther.adapters.adapter import Adapter
from agenther.adapters.plugins import Registry

FORMATS: Registry[Adapter] = Registry(Adapter, "agenther.adapters", (tau_bench.ADAPTER, toolbench.ADAPTER,
                                                                     messages.ADAPTER))


def adapters() -> list[Adapter]:
    """Every registered format, in detection order: specific ones, then generic ones."""
    return sorted(FORMATS.items().values(), key=lambda a: a.generic)


def format_names() -> tuple[str, ...]:
    return tuple(a.name for a in adapters())


def adapter(name: str) -> Adapter:
    found = next((a for a in adapters() if a.name == name), None)
    if found is None:
        raise KeyError(f"unknown format {name!r} (expected auto, {', '.join(format_names())})")
    return found


def with_failure_signals() -> frozenset[str]:
    """Formats whose logs carry more than a success flag for the rule classifier to read."""
    return frozenset(a.name for a in adapters() if a.failure_signals)
