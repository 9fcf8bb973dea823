"""`agenther inspect PATH`: what a run would do with these logs, before it calls any LLM.

It runs the real ingest, classify and extract stages (the runner's, in a temporary work folder;
classify and extract in rule mode, so no LLM is asked) and shows: the format and chat-log mapping
(given and detected), the text-action grammar and the actions per run, one record as the canonical
steps the stages see, the counts of successes, failures and quarantined (and repaired) records with
reasons, and how many failures would reach relabeling with the current params and why the others
would not. A distribution gate that fails is a warning here (inspect looks; it does not stop on a
distribution); a broken schema still stops it.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import polars as pl

from agenther.gates import gate_notes
from agenther.params import Params
from agenther.workdir import TABLES

SHOWN_STEPS = 12


def inspect_logs(params: Params) -> dict:
    """The dry run's findings (also what `agenther inspect` prints)."""
    from agenther.evidence.render import render
    from agenther.llm import LLMs
    from agenther.runner import run_stages
    from agenther.stages.ingest import detect_format

    rule = params.model_copy(deep=True)
    notes = [f"{stage}.mode is llm: inspect used rule mode, a run would ask the LLM"
             for stage in ("classify", "extract") if getattr(params, stage).mode == "llm"]
    rule.classify.mode = rule.extract.mode = "rule"
    rule.gates.distributions = "warn"
    with tempfile.TemporaryDirectory(prefix="agenther-inspect-") as tmp, LLMs.from_params(rule) as llms:
        work = Path(tmp)
        stats = run_stages(("ingest", "classify", "extract"), rule, work, work, llms)
        classified = pl.read_parquet(work / TABLES["classified"])
        quarantine = pl.read_parquet(work / TABLES["quarantine"])
        rejected = pl.read_parquet(work / TABLES["extract_rejected"])
        extracted = pl.read_parquet(work / TABLES["extracted"], columns=["id"])
        actions = pl.read_parquet(work / TABLES["trajectories"], columns=["messages"]).select(
            pl.col("messages").list.eval(pl.element().struct.field("tool_calls").list.len()).list.sum())
        gate_found = gate_notes(work / "gates")
    failures = classified.filter(pl.col("is_failure"))
    shown = (failures.filter(pl.col("id").is_in(extracted["id"].to_list())) if extracted.height else failures) \
        if failures.height else classified
    example = shown.row(0, named=True) if shown.height else None
    ingest = stats["ingest"]
    return {
        "input": str(params.ingest.input),
        "format": params.ingest.format if params.ingest.format != "auto"
        else detect_format(params.ingest.input),
        "detected": ingest.get("detected", {}),
        "partial_paths": ingest.get("partial_paths", {}),
        "records_in": ingest["records_in"],
        "trials": ingest.get("trials", 0),
        "repeats_dropped": ingest.get("duplicates", 0),
        "repaired": ingest.get("repaired", 0),
        "text_actions": ingest.get("text_actions"),
        "actions_per_run": _spread(actions.to_series().to_list()),
        "gate_warnings": gate_found["warnings"],
        "gates_adapted": gate_found["adapted"],
        "quarantined": dict(Counter(quarantine["reason"].to_list()).most_common(5)),
        "successes": classified.height - failures.height,
        "failures": failures.height,
        "failure_types": dict(Counter(failures["failure_type"].to_list())),
        "would_relabel": extracted.height,
        "would_not": dict(Counter(rejected["reason"].to_list())),
        "why_not_examples": {r["reason"]: r["detail"] for r in rejected.unique("reason", keep="first").to_dicts()},
        "example": None if example is None else {
            "id": example["id"], "steps": render(example["messages"][:SHOWN_STEPS], budget_tokens=1500),
            "more_steps": max(0, len(example["messages"]) - SHOWN_STEPS)},
        "notes": notes,
    }


def _spread(counts: list[int]) -> dict:
    """How many actions (tool calls, parsed text actions included) the runs hold."""
    ordered = sorted(counts)
    if not ordered:
        return {"runs": 0}
    return {"runs": len(ordered), "min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1],
            "none": sum(c == 0 for c in ordered)}


def print_report(found: dict) -> None:
    print(f"input: {found['input']}  format: {found['format']}")
    if found["detected"]:
        print("detected chat-log fields: " + ", ".join(f"{k} <- {v!r}" for k, v in found["detected"].items()))
    grammar = found["text_actions"]
    if grammar is not None:
        how = {"detected": "detected", "given": "given in ingest.text_actions", "off": "off",
               "fallback": "none matched, applied by default"}[grammar["how"]]
        scores = ", ".join(f"{n} {c}" for n, c in grammar["scores"].items())
        print(f"text actions: grammar {grammar['name']!r} ({how})" + (f"; actions + results per grammar in the "
                                                                      f"first records: {scores}" if scores else ""))
    spread = found["actions_per_run"]
    if spread["runs"]:
        print(f"actions per run: median {spread['median']}, min {spread['min']}, max {spread['max']}; "
              f"{spread['none']} of {spread['runs']} runs with none")
    for path, (hits, records) in found["partial_paths"].items():
        print(f"warning: {path!r} is in {hits} of {records} records only")
    print(f"records: {found['records_in']} in, {found['successes']} successes, {found['failures']} failures, "
          f"{sum(found['quarantined'].values())} quarantined, {found['trials']} trials, "
          f"{found['repeats_dropped']} repeats dropped")
    for reason, n in found["quarantined"].items():
        print(f"  quarantined {n}: {reason}")
    if found["repaired"]:
        print(f"  repaired {found['repaired']}: a lone surrogate escape kept as its escape text")
    print(f"failure types: {json.dumps(found['failure_types'])}")
    print(f"would reach relabeling: {found['would_relabel']} of {found['failures']} failures")
    for reason, n in found["would_not"].items():
        print(f"  not {n}: {reason}: e.g. {found['why_not_examples'][reason]}")
    for note in found["notes"]:
        print(f"note: {note}")
    for note in found["gates_adapted"]:
        print(f"note: {note}")
    for warning in found["gate_warnings"]:
        print(f"warning: {warning} (a run would stop here unless gates.distributions: warn)")
    if found["example"]:
        more = f" (+{found['example']['more_steps']} more steps)" if found["example"]["more_steps"] else ""
        print(f"\none record as the stages see it: {found['example']['id']}{more}\n{found['example']['steps']}")
