"""The code's shape, checked: dvc.yaml lists exactly the code, the tables and the params each stage's
record names (agenther/stages/__init__.py), no module imports itself back (no cycles), and the product
never imports the dev tooling."""

from __future__ import annotations

import pkgutil

import yaml
from conftest import ROOT

import agenther
from agenther.stages import PIPELINE, STAGES
from agenther.workdir import STATS, TABLES
from tasks.caching import agenther_imports, agenther_modules, module_file


def code_of(*modules: str) -> set[str]:
    """The .py files of `modules`, every agenther module they import (inside functions too), and
    the packages those live in."""
    names = set(agenther_modules(*modules))
    names |= {name.rsplit(".", depth)[0] for name in names for depth in range(1, name.count(".") + 1)}
    return {str(module_file(name).relative_to(ROOT)) for name in names}


def stage_code(stage: str) -> set[str]:
    """The .py files `agenther stage <stage>` runs: the runner and the module of the stage's function
    (its record), and their imports."""
    return code_of("agenther.runner", STAGES[stage].module)


def dvc_code_deps(stage: str, pipeline: str = "dvc.yaml") -> set[str]:
    """The .py files a dvc.yaml stage lists as deps (a listed folder stands for its .py files;
    paths are relative to the stage's wdir)."""
    spec = yaml.safe_load((ROOT / pipeline).read_text())["stages"][stage]
    assert ((ROOT / pipeline).parent / spec.get("wdir", ".")).resolve() == ROOT  # its paths: from the project root
    deps = spec["deps"]
    files: set[str] = set()
    for dep in deps:
        path = ROOT / dep
        if dep.startswith("agenther/") and path.is_dir():
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")}
        elif dep.endswith(".py"):
            files.add(dep)
    return files


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    for stage in STAGES:
        expected, listed = stage_code(stage), dvc_code_deps(stage)
        assert listed == expected, (f"dvc.yaml stage {stage}: missing {sorted(expected - listed)}, "
                                    f"not imported {sorted(listed - expected)}")


def test_dvc_yaml_reads_writes_and_params_are_each_stage_record():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(spec) == [s.name for s in PIPELINE]
    for stage in PIPELINE:
        deps, outs = spec[stage.name]["deps"], spec[stage.name]["outs"]
        tables = {f"data/interim/{TABLES[t]}" for t in stage.reads}
        assert tables <= set(deps), f"dvc.yaml stage {stage.name}: its input tables {sorted(tables - set(deps))}"
        written = [f"data/interim/{TABLES[t]}" for t in stage.writes] + (
            [f"data/interim/{STATS[stage.name]}"] if stage.stats else ["data/processed"])
        assert outs == written, f"dvc.yaml stage {stage.name}: outs {outs}, its record writes {written}"
        # params: the record's sections; `llm` (its keys that change answers) when the stage may ask the
        # LLM; `gates` for a stage whose input table is gated
        listed = {p.split(".")[0] for p in spec[stage.name]["params"]}
        expected = set(stage.sections) | ({"llm"} if stage.llm != "never" else set()) | (
            {"gates"} if stage.batched else set())
        assert listed == expected, f"dvc.yaml stage {stage.name}: params {sorted(listed)}, its record {sorted(expected)}"


def test_every_stage_record_names_a_function_that_exists():
    for stage in PIPELINE:
        assert callable(stage.load()), stage.function


def test_the_rounds_pipeline_lists_exactly_the_code_a_round_runs():
    # `agenther round`: agenther.rounds, which runs every stage (the runner imports them by name)
    expected = code_of("agenther.rounds", *(s.module for s in PIPELINE))
    listed = dvc_code_deps("rounds", "rounds/dvc.yaml")
    assert "agenther/rounds.py" in listed
    assert listed == expected, (f"rounds/dvc.yaml: missing {sorted(expected - listed)}, "
                                f"not imported {sorted(listed - expected)}")


def import_graph() -> dict[str, set[str]]:
    modules = {m.name for m in pkgutil.walk_packages(agenther.__path__, "agenther.")} | {"agenther"}
    graph = {}
    for name in modules:
        path = module_file(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = (agenther_imports(package, path.read_text(encoding="utf-8")) & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_agenther_modules():
    graph = import_graph()
    assert {"agenther.runner", "agenther.stages.verify", "agenther.tables"} <= graph.keys()  # the walk found them
    assert "agenther.stages.relabel" in graph["agenther.stages.verify"]  # and their imports
    assert cycles(graph) == []


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_product_does_not_import_the_dev_tooling():
    graph = import_graph()
    product = [m for m in graph if not m.startswith("agenther.devtools") and m != "agenther.cli"]
    assert "agenther.devtools.s3_cli" in graph["agenther.cli"]  # `agenther s3` (the walk sees the edge)
    assert not [m for m in product if any(i.startswith("agenther.devtools") for i in graph[m])]
