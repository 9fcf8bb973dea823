"""The whole pipeline for one command: ingest -> classify -> extract -> relabel -> verify -> package.

Plain function calls over polars frames; every stage's table is written as Parquet so
the run can be inspected, and so that the orchestrated runs (Prefect, DVC) that call the
same stage functions produce the same files.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import polars as pl

import agenther
from agenther import prompts, schema
from agenther.classify import classify
from agenther.extract import extract
from agenther.ingest import MessagesMapping, ingest
from agenther.llm import LLMClient, Usage
from agenther.package import package, render_dataset_card, write_exports
from agenther.params import params_hash
from agenther.providers import LLMs
from agenther.relabel import relabel
from agenther.verify import verify

log = logging.getLogger("agenther")

TABLES = {
    "trajectories": "00_trajectories.parquet",
    "classified": "01_classified.parquet",
    "extracted": "02_extracted.parquet",
    "relabeled": "03_relabeled.parquet",
    "verified": "04_verified.parquet",
    "rejected": "rejected.parquet",
    "quarantine": "quarantine.parquet",
}


def write_table(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.write_parquet(tmp, statistics=False)
    tmp.replace(path)  # never leave a half-written table for the next stage


def run(params: dict, out_dir: str | Path, llms: LLMs | None = None) -> dict:
    """Run every stage; write tables, exports, summary.json and dataset_card.md into out_dir.

    `llms`: the language models to use; by default built from params (and, for the embedded
    default, a local llama.cpp server started only if some record needs an LLM)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        llms = llms or stack.enter_context(LLMs.from_params(params))
        return _run(params, out, llms)


def _run(params: dict, out: Path, llms: LLMs) -> dict:
    p_in = params["ingest"]
    mapping = MessagesMapping.from_params(p_in.get("messages") or {})
    ingested = ingest(p_in["input"], fmt=p_in["format"], mapping=mapping, limit=p_in["limit"])
    write_table(ingested.trajectories, out / TABLES["trajectories"])
    if ingested.quarantine.height:
        write_table(ingested.quarantine, out / TABLES["quarantine"])
        for q in ingested.quarantine.iter_rows(named=True):
            log.warning("quarantined %s %s: %s", q["source_file"], q["record_pointer"], q["reason"])

    need_llm = params["classify"]["mode"] == "llm"
    classified = classify(ingested.trajectories, params, llms.main() if need_llm else None)
    write_table(classified, out / TABLES["classified"])

    extracted = extract(classified, params, llms.main() if params["extract"]["mode"] == "llm" else None)
    write_table(extracted.kept, out / TABLES["extracted"])

    if extracted.kept.height:
        relabeled = relabel(extracted.kept, params, llms.main())
        verified = verify(relabeled.kept, params, llms.main(), llms.judge())
    else:  # nothing to relabel: no LLM is started at all
        relabeled = schema.StageOutput(schema.empty(schema.RELABELED), schema.empty(schema.REJECTION))
        verified = schema.StageOutput(schema.empty(schema.VERIFIED), schema.empty(schema.REJECTION))
    write_table(relabeled.kept, out / TABLES["relabeled"])
    write_table(verified.kept, out / TABLES["verified"])

    lineage = {
        "agenther_version": agenther.__version__,
        "params_hash": params_hash(params),
        "models": {"relabel": llms.main_name(), "judges": llms.judge_names(params)},
        "prompt_hashes": prompts.all_hashes(),
    }
    accepted = verified.kept.filter(pl.col("verified"))
    packaged = package(accepted, classified, params["package"], lineage)
    digests = write_exports(packaged, out)

    rejected = pl.concat([extracted.rejected, relabeled.rejected, verified.rejected, packaged.rejections])
    write_table(rejected.sort("stage", "id"), out / TABLES["rejected"])

    summary = summarize(ingested, classified, extracted, relabeled, verified, packaged, llms, lineage, digests, params)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "dataset_card.md").write_text(render_dataset_card(summary))
    return summary


def _by_reason(df: pl.DataFrame) -> dict[str, int]:
    return dict(sorted(Counter(df["reason"].to_list()).items()))


def _usage_dict(u: Usage) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(u).items()}


def summarize(ingested, classified, extracted, relabeled, verified, packaged, llms: LLMs, lineage: dict,
              digests: dict, params: dict) -> dict:
    n_traj = ingested.trajectories.height
    failures = classified.filter(pl.col("is_failure"))
    accepted = int(verified.kept["verified"].sum()) if verified.kept.height else 0
    judges = {}
    for name in params["verify"]["judges"]:
        verdicts = [j["accept"] for row in verified.kept["judgements"].to_list() for j in row if j["judge"] == name]
        judges[name] = {"accepted": sum(verdicts), "rejected": len(verdicts) - sum(verdicts),
                        "not_asked": verified.kept.height - len(verdicts)}
    stages = {
        "ingest": {"in": ingested.records_in, "out": n_traj, "quarantined": ingested.quarantine.height},
        "classify": {
            "in": n_traj, "failures": failures.height, "successes": n_traj - failures.height,
            "recoverable": int(failures["recoverable"].sum()) if failures.height else 0,
            "by_failure_type": dict(sorted(Counter(failures["failure_type"].to_list()).items())),
        },
        "extract": {"in": failures.height, "out": extracted.kept.height, "rejected": _by_reason(extracted.rejected)},
        "relabel": {"in": extracted.kept.height, "out": relabeled.kept.height,
                    "rejected": _by_reason(relabeled.rejected)},
        "verify": {"in": relabeled.kept.height, "out": accepted, "rejected": _by_reason(verified.rejected),
                   "policy": params["verify"]["policy"], "judges": judges},
        "package": {"in": accepted, **packaged.counts, "rejected": _by_reason(packaged.rejections)},
    }
    checks = {
        "ingest: records_in = trajectories + quarantined":
            ingested.records_in == n_traj + ingested.quarantine.height,
        "classify: trajectories = failures + successes": True,  # by construction; kept for the reader
        "extract: failures = extracted + rejected": failures.height == extracted.kept.height + extracted.rejected.height,
        "relabel: in = relabeled + rejected":
            extracted.kept.height == relabeled.kept.height + relabeled.rejected.height,
        "verify: in = accepted + rejected": relabeled.kept.height == accepted + verified.rejected.height,
        "package: accepted = hindsight samples + rejected":
            accepted == packaged.counts["hindsight_samples"] + packaged.rejections.height,
    }
    usage = llms.usage()
    return {
        "input": {"path": str(params["ingest"]["input"]), "format": params["ingest"]["format"],
                  "limit": params["ingest"]["limit"]},
        "source_formats": sorted(set(ingested.trajectories["source_format"].to_list())),
        "stages": stages,
        "gates": {
            "relabel_confidence_threshold": params["relabel"]["confidence_threshold"],
            "relabels_proposed": extracted.kept.height,
            "passed_confidence_gate": relabeled.kept.height,
            "passed_judges": accepted,
            "exported_hindsight_samples": packaged.counts["hindsight_samples"],
        },
        "reconciliation": {"ok": all(checks.values()), "checks": checks},
        "llm": {name: _usage_dict(u) for name, u in sorted(usage.items())} | {"total": _usage_dict(_total(usage))},
        "exports": {"files": digests, "sft": len(packaged.sft), "dpo": len(packaged.dpo),
                    "sharegpt": len(packaged.sharegpt)},
        "lineage": lineage,
        "notes": llms.notes(),
    }


def _total(usage: dict[str, Usage]) -> Usage:
    total = Usage()
    for u in usage.values():
        total.add(u)
    return total


__all__ = ["run", "write_table", "TABLES", "LLMClient"]
