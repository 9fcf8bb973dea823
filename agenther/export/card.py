"""dataset_card.md: what the exported data is, where it came from, how it was made, how to load it.

Rendered from the run summary alone (no clock, no environment), so the card is as
reproducible as the data. Every key is optional: a missing section says "not recorded".
"""

from __future__ import annotations

import fnmatch
from typing import Any

from agenther.export.registry import exporters

# Licences of the shipped sources, from data/raw/SOURCES.md.
KNOWN_SOURCES = {
    "tau-bench": ("sierra-research/tau-bench (historical_trajectories)", "MIT"),
    "toolbench": ("OpenBMB/ToolBench (data_example)", "Apache-2.0"),
}

TASK_FILES = {  # agenther.export.tasks: where an environment replays the log
    "tasks/*.jsonl": ("tau-bench tasks: `user_id`, `instruction`, `actions` (`[{name, kwargs}]`), `outputs`; "
                      "`sample_id`, `data_hash`, `told`, `source`",
                      "a tau-bench runner (the environment's name is the file's)"),
}
ANNOTATED_FILES = {  # file: (format, who reads it as it is); the consumers' files are the exporters'
    "sft.jsonl": ("annotated: OpenAI-format `messages` (per-assistant-message 0/1 `weight`), `tools`, `weight`, "
                  "`metadata` (lineage)", "agenther's own record (every file above is derived from these three)"),
    "dpo.jsonl": ("annotated: `prompt`, `chosen`, `rejected`, `tools`, `weight`, `metadata`", "agenther's own record"),
    "sharegpt.jsonl": ("annotated: sharegpt + `weight`, `metadata` (incl. `turn_weights`)", "agenther's own record"),
}


def files_described() -> dict[str, tuple[str, str]]:
    """The files table's rows: every exporter's files, then the annotated ones."""
    return {pattern: what for e in exporters() for pattern, what in e.describe.items()} | TASK_FILES | ANNOTATED_FILES


INTRO = """\
Training data made from LLM-agent runs. A run that failed its goal A often fully achieved
some other goal B; an LLM wrote B as the user prompt that run satisfies (a *hindsight
prompt*), judges verified it, and the pair (B, the run) became a training sample. Tool calls
and tool results are kept as structure in every export."""

METHOD = """\
1. **classify**: failure or not, which kind, how severe (0 = near miss .. 1 = nothing done).
2. **extract**: the achieved goal, computed from what the run did: the write calls that
   succeeded (with their arguments) and the facts the agent reported from read results, each
   pointing at its steps. An error result is never an achievement, nor is a write the agent was
   not allowed to make (where the log has ground truth). The sample is the run cut after the
   last step that evidences the goal; a turn inside it that asks for or attempts something the
   goal does not contain cuts it shorter, or rejects the record.
3. **relabel**: an LLM puts the computed goal into the words of a user's request; it never sees
   the failed goal or the transcript. Attempts that fail a check (confidence, coverage,
   grounding, pasting the record) are retried with the reason, then dropped.
4. **verify**: judges check the prompt against the sample; a judge's rejection is final.
   Deterministic first: replay, where the log's environment can be replayed (tau-bench airline:
   the sample's trained writes, run from the initial state, reach the run's state at its cut),
   coverage (the prompt asks for every write the sample trains on, and
   the sample meets every requirement of the prompt) and grounding (every number, ID, date and
   name of the prompt occurs in the sample); then policy (the writes break no rule the agent
   was given), and LLM judges of the whole sample and of its tool evidence.
5. **package**: exact and near-duplicate prompts removed, samples weighted, every exported
   row validated against its trainer's format."""

WEIGHTS = """\
Each sample has a weight: `sample_weight` in the TRL, LLaMA-Factory and Parquet files, `weight` in
the annotated files. Hindsight samples: `max(min_weight, 1 - weight_alpha * severity)`: a near miss
(severity 0) weighs 1, a run that did little of its original goal weighs less. Original successes and
natural preference pairs weigh 1.

Per turn: in a hindsight sample, assistant turns that do not contribute to its goal (calls that
failed, repeats of an earlier call, reads nothing later uses) stay as context with weight 0: they
are never to be trained on. The annotated `sft.jsonl` carries the 0/1 `weight` on each assistant
message, the annotated `sharegpt.jsonl` the same as `metadata.turn_weights` (one per
`conversations` entry). Every consumer file trains exactly the weight-1 turns, each by its
consumer's own mechanism, and no file makes a user turn or a tool result a training target:"""

SAMPLE_WEIGHTS = """\
Applying `sample_weight`: none of these trainers reads a per-sample weight. Resampling works with
every one of them: draw rows with probability proportional to `sample_weight` (with replacement, as
many as there are), then train on the result as usual. A row of `trl/sft.jsonl` or `llamafactory/`
is one trained turn and carries its sample's weight, so each turn is drawn by its sample's weight.

```python
import numpy as np
from datasets import load_dataset

rows = load_dataset("json", data_files="trl/sft.jsonl", split="train")  # or llamafactory/hindsight.jsonl
weights = np.asarray(rows["sample_weight"], dtype=float)
drawn = np.random.default_rng(0).choice(len(rows), size=len(rows), p=weights / weights.sum())
rows = rows.select(drawn)  # TRL: train on it; LLaMA-Factory: rows.to_json(...) and name that file
```"""


def _training() -> str:
    return "\n\n".join([WEIGHTS, *(e.training for e in exporters() if e.training), SAMPLE_WEIGHTS])


LIMITATIONS = """\
- The default relabeling model is a small local model: its prompts are plainer and sometimes
  vaguer than a large model's. Judges reduce label noise but do not remove it, and judges
  that share a model with the relabeler are not independent.
- The grounding check is lexical: it catches invented numbers, IDs and dates, not a wrong
  paraphrase.
- Multi-turn logs (simulated users) keep the later user turns inside the sample (each checked
  not to ask for anything the sample does not do); SFT trains only on the assistant turns, and a
  preference pair's chosen and rejected are one assistant turn each (the step where the runs
  diverge), so no user or tool text is a training target. With `package.dpo_pairs: trajectory`
  pairs hold whole continuations instead, and DPO then scores later user turns and tool results too.
- A step pair's rejected turn answered its own run's history; when that history differs from the
  prompt (`metadata.prompt_shared` false: e.g. the simulated user worded the request differently)
  it is preferred against under a history it did not see.
- Which tools change state is decided from their names and schemas unless params list them
  (`tools.writes` / `tools.reads`); a write tool named like a read would escape the coverage check.
- Hindsight pairs: the rejected run is one of the same task that lacks some of the chosen
  run's tool calls: a plausible, not a verified, non-satisfier.
- ShareGPT cannot hold assistant text and a tool call in one turn: the text is dropped there
  (`metadata.assistant_text_dropped`); the SFT and DPO files keep it.
- DPO prompts may end on a tool result; TRL releases older than the one that accepts a last
  prompt role of `tool` reject such rows.
- The TRL files are checked with `datasets` 5.2, which loads nested values that differ between
  rows as JSON, as written. `datasets` 4.0 (what LLaMA-Factory 0.9.5 pins) fills every tool call's
  `arguments` with the other rows' keys as nulls and turns date strings into datetimes: load the
  TRL files with `datasets` >= 5 (TRL 1.16 itself needs >= 4.7). `tools` is JSON text everywhere,
  and the LLaMA-Factory and Parquet files hold no such nested values, so they load the same on both.
- `openai/sft.jsonl` has no `tools` on rows whose source logged no tool schemas (OpenAI rejects
  an empty list); every other file has every column in every row.
- `openai/sft.jsonl` and the annotated files keep `tools` as OpenAI's nested objects: one run's
  file loads with `datasets`, but files of runs over different sources (other tool schemas) do
  not load in one call. The TRL, LLaMA-Factory and Parquet files do."""

def _loading(exports: dict) -> str:
    return "\n\n".join(e.loading(exports) for e in exporters() if e.loading)


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != int(value):
        return f"{value:.4f}".rstrip("0")
    if isinstance(value, float):
        return str(int(value))
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_n(c) for c in row) + " |" for row in rows]


def _reasons(rejected: Any) -> str:
    if isinstance(rejected, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "-"
    return _n(rejected)


def _llm_usage(llm: dict) -> dict:
    """The summary holds either one usage dict or {model_role: usage, ..., "total": usage}."""
    return llm["total"] if isinstance(llm.get("total"), dict) else llm


def _source(s: dict, stages: dict) -> list[str]:
    source = s.get("input") or {}
    # "auto" says nothing about licences: prefer the formats the run actually detected, when recorded
    formats = s.get("source_formats") or [source.get("format")]
    lines = [f"- input: `{source.get('path', 'not recorded')}` (format: {', '.join(map(str, formats))})"]
    for fmt in formats:
        origin = KNOWN_SOURCES.get(str(fmt))
        if origin:
            lines.append(
                f"- origin: {origin[0]}; licence: {origin[1]} (check upstream before redistributing)"
            )
    if not any(str(f) in KNOWN_SOURCES for f in formats):
        lines.append(
            "- licence: not known to agenther (that of your logs); rows name theirs in metadata.source_format"
        )
    quarantined = s.get("quarantined", (stages.get("ingest") or {}).get("quarantined"))
    lines.append(
        f"- records quarantined at ingest (malformed, kept aside with the reason): {_n(quarantined)}"
    )
    return lines


def _counts(stages: dict, gates: dict) -> list[str]:
    rows = [
        [
            name,
            (st or {}).get("in"),
            (st or {}).get("out", (st or {}).get("hindsight_samples")),
            _reasons((st or {}).get("rejected")),
        ]
        for name, st in stages.items()
    ]
    lines = _table(["stage", "in", "out", "rejected (reason: n)"], rows) if rows else ["not recorded"]
    classify = stages.get("classify") or {}
    if classify:
        lines += [
            "",
            f"Classified: {_n(classify.get('failures'))} failures, {_n(classify.get('successes'))} "
            f"successes, {_n(classify.get('recoverable'))} failures worth relabeling.",
        ]
    lines += ["", "Relabels through the gates:", ""]
    lines += _table(["gate", "value"], [[k, v] for k, v in gates.items()]) if gates else ["not recorded"]
    verify = stages.get("verify") or {}
    if verify.get("judges"):
        lines += ["", f"Judges (policy: {verify.get('policy', '-')}):", ""]
        lines += _table(
            ["judge", "accepted", "rejected", "not asked"],
            [
                [j, v.get("accepted"), v.get("rejected"), v.get("not_asked")]
                for j, v in verify["judges"].items()
            ],
        )
    pkg = stages.get("package") or {}
    if pkg:
        g = {
            k: _n(pkg.get(k))
            for k in (
                "hindsight_samples",
                "rewritten_turns",
                "success_samples",
                "duplicates",
                "near_duplicates",
                "dpo_natural",
                "dpo_hindsight",
            )
        }
        lines += [
            "",
            f"Packaging: {g['hindsight_samples']} hindsight samples, {g['success_samples']} original "
            f"successes; {g['duplicates']} exact and {g['near_duplicates']} near-duplicate user sides removed; "
            f"{g['dpo_natural']} natural and {g['dpo_hindsight']} hindsight preference pairs.",
            "",
            f"Rewritten: {g['rewritten_turns']} user turns across the hindsight samples, so that each "
            "conversation asks for what its run achieved (each sample's `metadata.rewrites` holds every "
            "rewritten turn's original: step, before, after). The agent's turns, tool calls and tool "
            "results are never rewritten.",
        ]
        if pkg.get("hindsight_tasks") is not None:
            lines += ["", f"Hindsight tasks with a verifiable reward (`tasks/`): {_n(pkg['hindsight_tasks'])}; each one's "
                          "`actions`, replayed from the environment's initial state, give its `data_hash`."]
    return lines


def _lineage(lineage: dict, llm: dict) -> list[str]:
    models = lineage.get("models") or {}
    lines = [
        f"- relabeling model: {models.get('relabel', 'not recorded')}",
        f"- judges: {', '.join(map(str, models.get('judges') or [])) or 'not recorded'}",
        f"- agenther {lineage.get('agenther_version', '-')}, params hash `{lineage.get('params_hash', '-')}`",
    ]
    hashes = lineage.get("prompt_hashes") or {}
    if hashes:
        lines.append(
            "- prompt templates (sha256/12): " + ", ".join(f"{k} `{v}`" for k, v in sorted(hashes.items()))
        )
    usage = _llm_usage(llm)
    if usage:
        lines.append(
            f"- LLM calls: {_n(usage.get('calls'))} ({_n(usage.get('cache_hits'))} from cache); tokens: "
            f"{_n(usage.get('prompt_tokens'))} prompt + {_n(usage.get('completion_tokens'))} completion; "
            f"cost: ${_n(usage.get('cost_usd'))}"
        )
    return lines


def _files(exports: dict) -> list[str]:
    digests = exports.get("files") or {}
    rows = exports.get("rows") or {}
    legacy = {"sft.jsonl": exports.get("sft"), "dpo.jsonl": exports.get("dpo"), "sharegpt.jsonl": exports.get("sharegpt")}
    listed = []
    for pattern, (fmt, who) in files_described().items():
        matches = [f for f in digests if fnmatch.fnmatch(f, pattern)] or ([] if exports.get("not_written") else [pattern])
        listed += [[f, rows.get(f, legacy.get(f)), fmt, who, digests.get(f)] for f in matches]
    table = _table(["file", "rows", "format", "read as is by", "sha256"], listed)
    missing = exports.get("not_written") or {}
    if missing:
        table += ["", "Not written:", ""] + [f"- `{f}`: {why}" for f, why in sorted(missing.items())]
    return table


def _token_lengths(exports: dict) -> list[str]:
    lengths = exports.get("token_lengths") or {}
    if not lengths.get("files"):
        return [f"Not measured: {lengths.get('not_measured', 'not recorded')}. The loading snippets set no "
                "`max_length` then: pass `max_length=None` (no truncation) or measure first."]
    rows = [[f, v.get("rows"), v.get("tokens"), v.get("p50"), v.get("p90"), v.get("p99"), v.get("max"),
             v.get("max_length")] for f, v in lengths["files"].items()]
    return [f"Tokenizer: {lengths.get('tokenizer')}; rendered with its chat template and the row's tools "
            "(prompt-completion rows: prompt + completion; preference rows: the longer of prompt + chosen, "
            "prompt + rejected). `tokens`: the sum over the rows, one epoch.", "",
            *_table(["file", "rows", "tokens", "p50", "p90", "p99", "max", "max_length"], rows),
            *[f"\n{f}: {v['upper_bounds']} rows over 1 MB of text are counted in bytes (an upper bound: a "
              "token is at least one byte), not tokenized." for f, v in lengths["files"].items() if v.get("upper_bounds")]]


def render_dataset_card(summary: dict) -> str:
    """The card as Markdown; tolerant of any missing key of the summary."""
    s = summary or {}
    stages = s.get("stages") or {}
    exports = s.get("exports") or {}

    out = [_title(s), "", INTRO, "", "## Files", ""]
    out += _files(exports)
    out += ["", "## Token lengths", "", *_token_lengths(exports)]
    out += ["", "## Source", "", *_source(s, stages)]
    out += [
        "",
        "## How it was made",
        "",
        METHOD,
        "",
        "Per-stage counts:",
        "",
        *_counts(stages, s.get("gates") or {}),
    ]
    out += ["", "## Weights: what trains", "", _training()]
    out += ["", "## Models and lineage", "", *_lineage(s.get("lineage") or {}, s.get("llm") or {})]
    out += ["", "## Known limitations", "", LIMITATIONS]
    out += ["", "## How to load", "", _loading(exports)]
    checks = s.get("reconciliation") or {}
    if checks:
        out += [
            "",
            "## Reconciliation",
            "",
            f"All counts reconcile: {'yes' if checks.get('ok') else 'NO'}",
            "",
        ]
        out += [f"- {k}: {'ok' if v else 'MISMATCH'}" for k, v in (checks.get("checks") or {}).items()]
    return "\n".join(out) + "\n"


def _title(s: dict) -> str:
    """What the files hold, in numbers: a run with no hindsight sample must not promise any."""
    package = (s.get("stages") or {}).get("package") or {}
    hindsight, successes = package.get("hindsight_samples"), package.get("success_samples")
    if hindsight is None:
        return "# agenther agent trajectories"
    if not hindsight:
        return f"# agenther agent trajectories: {successes or 0} original successes, no hindsight-relabeled sample"
    return f"# agenther agent trajectories: {hindsight} hindsight-relabeled samples, {successes or 0} original successes"
