"""The last stage: package the accepted samples, then account for the whole run.

Everything here is read back from the work folder, so the summary is the same whether
the stages ran in one process (`agenther run`) or in several (`dvc repro`, Prefect).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import polars as pl

import agenther
from agenther import gates, prompts
from agenther.export.card import render_dataset_card
from agenther.export.registry import exporters
from agenther.export.report import render_report
from agenther.export.tasks import export_tasks
from agenther.llm import BUDGET_EXHAUSTED, LLMs, Usage
from agenther.params import Params, params_hash
from agenther.stages import LLM_STAGES
from agenther.stages.packaging import Exported, Spread, export_samples, in_process
from agenther.tables import batch_rows, gate_table, read_table, scan_columns, write_table
from agenther.workdir import read_stats, write_text_atomic


def package_run(params: Params, work: Path, out: Path, llms: LLMs, spread: Spread = in_process,
                round_of: Mapping[str, int] | None = None) -> dict:
    """Package the work folder's accepted samples into `out` and write the run's summary.
    `spread`: how the shards run (agenther/stages/packaging.py: in this process, or the executor's
    workers). `round_of` (trajectory id -> round; agenther/rounds.py publishing the union of rounds):
    each sample's metadata also says the round that made it."""
    classified_path = gate_table(work, "classified", params)  # big: read in batches
    verified = read_table(work, "verified", params)  # small: one row per judged relabel
    lineage = {
        "agenther_version": agenther.__version__,
        "params_hash": params_hash(params),
        "models": {"relabel": llms.main_name(), "judges": llms.judge_names(params)},
        "prompt_hashes": prompts.all_hashes(),
    }
    packaged = export_samples(verified.filter(pl.col("verified")), classified_path, params.package, lineage, out,
                              batch_rows(params), tokenizer_model=params.llm.local_model, round_of=round_of,
                              spread=spread)
    add_tasks(packaged, verified, params, out)
    rejected = pl.concat([read_table(work, f"{s}_rejected", params) for s in ("extract", "relabel", "verify")]
                         + [packaged.rejections])
    write_table(rejected.sort("stage", "id"), out / "rejected.parquet")
    classified = scan_columns(classified_path, ["is_failure", "recoverable", "failure_type", "severity", "source_format"])
    summary = summarize(params, work, classified, verified, packaged, rejected, lineage, llms)
    # gate bounds this log's kind of signal cannot meet, left out, and distribution checks that only warned
    summary["gates"] |= {k: v for k, v in gates.gate_notes(work / "gates").items() if v}
    reviewed = out / "review" / "score.json"  # `agenther review score` of these relabels: kept on a rerun
    if reviewed.exists():
        summary["review"] = json.loads(reviewed.read_text())
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    card = render_dataset_card(summary)
    write_text_atomic(out / "dataset_card.md", card)
    for exporter in exporters():  # files made from the summary and the card (the Parquet dataset's README)
        if exporter.publish is not None:
            exporter.publish(out, summary, card)
    write_text_atomic(out / "report.html", render_report(summary, verified, rejected, classified, work, out))
    return summary


def add_tasks(packaged: Exported, verified: pl.DataFrame, params: Params, out: Path) -> None:
    """The hindsight tasks of the exported samples (agenther/export/tasks.py), counted with the exports."""
    exported = verified.filter(pl.col("verified") & ~pl.col("id").is_in(packaged.rejections["id"].to_list()))
    tasks = export_tasks(exported.to_dicts(), params, out)
    packaged.digests.update(tasks.digests)
    packaged.files.update(tasks.rows)
    packaged.counts.update(hindsight_tasks=sum(tasks.rows.values()), hindsight_tasks_skipped=len(tasks.skipped))


def _by_reason(rejected: pl.DataFrame, stage: str) -> dict[str, int]:
    return dict(sorted(Counter(rejected.filter(pl.col("stage") == stage)["reason"].to_list()).items()))


def _usage(stats: dict) -> Usage:
    return Usage(**stats.get("usage", {}))


def summarize(params: Params, work: Path, classified: pl.DataFrame, verified: pl.DataFrame, packaged: Exported,
              rejected: pl.DataFrame, lineage: dict, llms: LLMs) -> dict:
    ingest = read_stats(work, "ingest")
    stats = {s: read_stats(work, s) for s in ("extract", "relabel", "verify")}
    failures = classified.filter(pl.col("is_failure"))
    accepted = int(verified["verified"].sum()) if verified.height else 0
    judges = {}
    for name in params.verify.judges:
        verdicts = [j["accept"] for row in verified["judgements"].to_list() for j in row if j["judge"] == name]
        judges[name] = {"accepted": sum(verdicts), "rejected": len(verdicts) - sum(verdicts),
                        "not_asked": verified.height - len(verdicts)}
    stages = {
        "ingest": {"in": ingest["records_in"], "out": ingest["trajectories"], "quarantined": ingest["quarantined"],
                   **{k: ingest[k] for k in ("duplicates", "trials", "detected", "partial_paths") if ingest.get(k)}},
        "classify": {
            "in": classified.height, "failures": failures.height, "successes": classified.height - failures.height,
            "recoverable": int(failures["recoverable"].sum()) if failures.height else 0,
            "by_failure_type": dict(sorted(Counter(failures["failure_type"].to_list()).items())),
        },
        "extract": {"in": stats["extract"]["in"], "out": stats["extract"]["out"], "rejected": _by_reason(rejected, "extract")},
        "relabel": {"in": stats["relabel"]["in"], "out": stats["relabel"]["out"], "rejected": _by_reason(rejected, "relabel")},
        "verify": {"in": stats["verify"]["in"], "out": accepted, "rejected": _by_reason(rejected, "verify"),
                   "policy": params.verify.policy, "judges": judges},
        "package": {"in": accepted, **packaged.counts, "rejected": _by_reason(rejected, "package")},
    }
    n_rejected = {s: stats[s]["rejected"] for s in stats}
    checks = {
        "ingest: records_in = trajectories + quarantined + dropped repeats":
            ingest["records_in"] == ingest["trajectories"] + ingest["quarantined"] + ingest.get("duplicates", 0)
            == classified.height + ingest["quarantined"] + ingest.get("duplicates", 0),
        "extract: failures = extracted + rejected":
            failures.height == stats["extract"]["in"] == stats["extract"]["out"] + n_rejected["extract"],
        "relabel: in = relabeled + rejected": stats["relabel"]["in"] == stats["relabel"]["out"] + n_rejected["relabel"],
        "verify: in = accepted + rejected": stats["verify"]["in"] == accepted + n_rejected["verify"],
        "package: accepted = hindsight samples + rejected":
            accepted == packaged.counts["hindsight_samples"] + packaged.rejections.height,
        "run: failures = hindsight samples + all rejections":
            failures.height == packaged.counts["hindsight_samples"] + rejected.height,
    }
    usage = {s: _usage(read_stats(work, s)) for s in LLM_STAGES}
    total = Usage.total(usage.values())
    return {
        "input": {"path": str(params.ingest.input), "format": params.ingest.format,
                  "limit": params.ingest.limit},
        "source_formats": sorted(set(classified["source_format"].to_list())),
        "stages": stages,
        "gates": {
            "relabel_confidence_threshold": params.relabel.confidence_threshold,
            "relabels_proposed": stats["relabel"]["in"],
            "passed_confidence_gate": stats["relabel"]["out"],
            "passed_judges": accepted,
            "exported_hindsight_samples": packaged.counts["hindsight_samples"],
        },
        "reconciliation": {"ok": all(checks.values()), "checks": checks},
        "llm": {s: _rounded(u) for s, u in usage.items()} | {"total": _rounded(total)}
               | _accounting(params, total, rejected, accepted),
        "exports": {"files": packaged.digests, **packaged.rows, "rows": packaged.files,
                    "not_written": packaged.not_written, "token_lengths": packaged.token_lengths},
        "lineage": lineage,
        "notes": llms.notes(),
    }


def _accounting(params: Params, total: Usage, rejected: pl.DataFrame, accepted: int) -> dict:
    """Budget and cost per accepted sample, from the stages' recorded usage and rejections,
    so they hold when the stages ran in separate processes too."""
    p = params.llm
    tokens = total.prompt_tokens + total.completion_tokens
    undone = rejected.filter((pl.col("reason") == BUDGET_EXHAUSTED)
                             | pl.col("detail").str.starts_with(BUDGET_EXHAUSTED))
    left = dict(sorted(Counter(undone["stage"].to_list()).items()))
    limit = {"usd": p.budget_usd, "tokens": p.budget_tokens}
    reached = ((limit["usd"] is not None and total.cost_usd >= limit["usd"])
               or (limit["tokens"] is not None and tokens >= limit["tokens"]))
    return {
        "budget": {"limit": limit, "spent": {"usd": round(total.cost_usd, 6), "tokens": tokens},
                   "exhausted": bool(reached or left or total.budget_refused), "refused_calls": total.budget_refused,
                   "records_left_undone": left},
        "accepted_samples": accepted,
        "cost_per_accepted_sample_usd": round(total.cost_usd / accepted, 6) if accepted else None,
        "tokens_per_accepted_sample": round(tokens / accepted, 1) if accepted else None,
    }


def _rounded(u: Usage) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(u).items()}
