"""The exporters: one module per consumer's file(s), each an `Exporter` registered here.

The package stage writes the ANNOTATED rows (`sft.jsonl`, `dpo.jsonl`, `sharegpt.jsonl`: every
sample with its `weight`, per-turn weights and lineage). Every consumer format is derived from
them by an exporter, and an exporter is all a format is: its rows, the files it writes at the end,
its part of the dataset card. The sink (agenther.export.files), the card (agenther.export.card) and
the token measure (agenther.stages.samples) read the exporters from `exporters()` only, so adding a
format is one module and one line in BUILTIN (or, outside this package, an entry point in the
group `agenther.exporters` naming an `Exporter`): no other export changes.

The built-in ones are imported by name here (not looked up by string) so that the dependency is
visible to the code-dependency checks of dvc.yaml (tests/test_layout.py).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from agenther.export import llamafactory, openai_ft, parquet, trl
from agenther.export.exporter import ANNOTATED, Exporter

GROUP = "agenther.exporters"
BUILTIN = (openai_ft.EXPORTER, trl.EXPORTER, llamafactory.EXPORTER, parquet.EXPORTER)

_LOADED: list[tuple[Exporter, ...]] = []


def _add(found: dict[str, Exporter], exporter: Exporter) -> None:
    """Its name and files must not clash with an exporter's already found, nor with the annotated files."""
    if exporter.name in found:
        raise ValueError(f"two exporters are named {exporter.name!r}")
    taken = dict.fromkeys(ANNOTATED, "the package stage") | {
        f: repr(e.name) for e in found.values() for f in (*e.files, *e.published)}
    clash = [f for f in (*exporter.files, *exporter.published) if f in taken]
    if clash:
        raise ValueError(f"exporter {exporter.name!r}: {clash[0]} is written by {taken[clash[0]]} already")
    found[exporter.name] = exporter


def _plugins() -> list[Exporter]:
    out = []
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        plugin = point.load()
        if not isinstance(plugin, Exporter):
            raise TypeError(f"entry point {point.name} ({GROUP}) names a {type(plugin).__name__}, not an Exporter")
        out.append(plugin)
    return out


def exporters() -> tuple[Exporter, ...]:
    """Every exporter: the built-in ones, then the plugins' (entry points of GROUP, by name)."""
    if not _LOADED:
        found: dict[str, Exporter] = {}
        for exporter in (*BUILTIN, *_plugins()):
            _add(found, exporter)
        _LOADED.append(tuple(found.values()))
    return _LOADED[0]


def layout() -> tuple[str, ...]:
    """Every file the exporters may write into the output folder (patterns), published ones too."""
    return tuple(f for e in exporters() for f in (*e.files, *e.published))
