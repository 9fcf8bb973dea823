"""Sample quality with the embedded default: how many relabel candidates become samples, why the
others are rejected, what the LLM calls cost in prompt tokens, how long it takes; and a review
sheet of every accepted sample for a person to check.

    .venv/bin/python bench/quality.py                      # tau-bench (200 records, 116 failures) + ToolBench
    .venv/bin/python bench/quality.py --sources tau-bench --limit 40 --model qwen2.5-coder-0.5b

Each source runs the whole pipeline (agenther.pipeline.run, as `agenther run` does) with
params.yaml, in a fresh work folder and a fresh LLM cache (so every call is made and timed).
"Before" is the relabel prompt as the pipeline built it up to commit bce834a (its template read
from git, the achievements list and the compacted transcript), tokenized by the same model: what
a relabel call cost before the achieved goal was computed.
Prints a table; writes <out>/quality.json and <out>/review.md (every accepted sample: prompt, the
writes it trains on, the facts, the user turns kept, the judges' reasons).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agenther.evidence.goal import AchievedGoal, describe_action  # noqa: E402
from agenther.llm.models import DEFAULT_MODEL, model_path  # noqa: E402
from agenther.params import Params, load_params  # noqa: E402
from agenther.pipeline import run  # noqa: E402
from agenther.review.transcript import markdown, sample_turns  # noqa: E402

SOURCES = {
    "tau-bench": (ROOT / "data/raw/tau-bench/gpt-4o-airline.json", "tau-bench"),
    "toolbench": (ROOT / "data/raw/toolbench/answer", "toolbench"),
}
BEFORE_COMMIT = "bce834a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--model", default=None, help=f"embedded model (default: params.yaml's, else {DEFAULT_MODEL})")
    ap.add_argument("--limit", type=int, default=None, help="first N records of each source")
    ap.add_argument("--out", default=str(ROOT / "out/bench-quality"))
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, review = {}, []
    for name in args.sources:
        path, fmt = SOURCES[name]
        overrides = {"ingest": {"input": str(path), "format": fmt, "limit": args.limit},
                     "llm": {"cache_dir": tempfile.mkdtemp(prefix="agenther-bench-cache-")}}
        if args.model:
            overrides["llm"]["local_model"] = args.model
        params = load_params(ROOT / "params.yaml", overrides)
        work = out / name
        started = time.perf_counter()
        summary = run(params, work)
        wall = time.perf_counter() - started
        results[name] = measure(work, summary, wall, params)
        review += review_rows(name, work)
        print_table(name, results[name])
    (out / "quality.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "review.md").write_text(render_review(review))
    print(f"\nwrote {out / 'quality.json'} and {out / 'review.md'} ({len(review)} accepted samples to review)")


def measure(work: Path, summary: dict, wall: float, params: Params) -> dict:
    classified = pl.read_parquet(work / "01_classified.parquet", columns=["id", "is_failure"])
    rejected = pl.read_parquet(work / "rejected.parquet")
    candidates = pl.read_parquet(work / "02_extracted.parquet", columns=["id"]).height
    verified = pl.read_parquet(work / "04_verified.parquet", columns=["id", "verified"])
    accepted = int(verified["verified"].sum()) if verified.height else 0
    llm = summary["llm"]
    relabel, total = llm["relabel"], llm["total"]
    per_call = relabel["prompt_tokens"] / relabel["calls"] if relabel["calls"] else None
    by_reason = (rejected.group_by("stage", "reason").agg(pl.len().alias("n")).sort("stage", "n", descending=[False, True])
                 .to_dicts())
    return {
        "records": classified.height,
        "failures": int(classified["is_failure"].sum()),
        "candidates": candidates,
        "accepted": accepted,
        "acceptance_of_candidates": round(accepted / candidates, 3) if candidates else None,
        "hindsight_samples_exported": summary["gates"]["exported_hindsight_samples"],
        "rejections": by_reason,
        "relabel_calls": relabel["calls"],
        "prompt_tokens_per_relabel_call": round(per_call, 1) if per_call else None,
        "prompt_tokens_per_relabel_call_before": before_tokens(work, params),
        "prompt_tokens_per_accepted_sample": round(total["prompt_tokens"] / accepted, 1) if accepted else None,
        "llm_calls": total["calls"],
        "calls_per_accepted_sample": round(total["calls"] / accepted, 2) if accepted else None,
        "rewritten_turns_per_sample": (round(summary["stages"]["package"]["rewritten_turns"] / exported, 2)
                                       if (exported := summary["gates"]["exported_hindsight_samples"]) else None),
        "relabeled_by_rules": int((pl.read_parquet(work / "03_relabeled.parquet", columns=["relabel_model"])
                                   ["relabel_model"] == "rules").sum()),
        "wall_s": round(wall, 1),
        "seconds_per_accepted_sample": round(wall / accepted, 1) if accepted else None,
        "model": summary["lineage"]["models"]["relabel"],
    }


def before_tokens(work: Path, params: Params) -> float | None:
    """Median prompt tokens of the relabel call as built before (commit bce834a) for these candidates."""
    try:
        template = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:agenther/prompts/relabel.txt"],
                                  capture_output=True, text=True, check=True).stdout
        from llama_cpp import Llama
    except (subprocess.CalledProcessError, FileNotFoundError, ImportError):
        return None
    from string import Template

    from agenther.evidence.render import estimate_tokens, render

    vocab = Llama(model_path=str(model_path(params.llm.local_model)), vocab_only=True, verbose=False)
    counts = []
    for row in pl.read_parquet(work / "02_extracted.parquet").to_dicts():
        evidence = {s for a in row["achievements"] for s in a["steps"]}
        ranked = sorted(row["achievements"], key=lambda a: a["kind"] != "action")[:12]
        achievements = "\n".join(f"- {a['text']} (steps {', '.join(map(str, a['steps']))})" for a in ranked)
        budget = max(512, params.llm.context_tokens - params.llm.max_tokens - 600)
        transcript = render(row["messages"], keep=evidence, budget_tokens=max(256, budget - estimate_tokens(achievements)))
        text = Template(template).substitute(achievements=achievements, transcript=transcript)
        counts.append(len(vocab.tokenize(text.encode(), add_bos=False)))
    return statistics.median(counts) if counts else None


def review_rows(source: str, work: Path) -> list[dict]:
    verified = pl.read_parquet(work / "04_verified.parquet")
    rows = []
    for r in verified.filter(pl.col("verified")).to_dicts() if verified.height else []:
        goal = AchievedGoal.model_validate_json(r["achieved_goal"])
        turns = sample_turns(r)
        assistant = [t for t in turns if t["role"] == "assistant"]
        rows.append({
            "source": source, "id": r["id"], "original_goal": r["goal"], "relabel_model": r["relabel_model"],
            "failure_type": r["failure_type"], "writes": [describe_action(a) for a in goal.actions],
            "facts": [f.text for f in goal.facts], "excluded": [f"{e.tool} (step {e.call_step}): {e.reason}"
                                                                 for e in goal.excluded],
            "turns": turns,
            "sample": f"steps {goal.start}-{goal.sample_end - 1} of {len(r['messages'])} (after the system prompt); "
                      f"{sum(t['weight'] == 1 for t in assistant)} of {len(assistant)} assistant turns train "
                      f"(the rest weigh 0); {sum(t['before'] is not None for t in turns)} user turns rewritten",
            "judges": [f"{j['judge']} ({j['model']}): {'accept' if j['accept'] else 'REJECT'}: {j['reason']}"
                       for j in r["judgements"]],
        })
    return rows


def render_review(rows: list[dict]) -> str:
    out = ["# Accepted hindsight samples: review sheet", "",
           "For each: would you train a model on it? Read every turn as the trainer sees it (role, weight, "
           "text or tool call; a rewritten user turn shows what the user originally said). The user side must "
           "ask for every write listed, the writes must do everything it asks, and every turn of weight 1 must "
           "follow from what the user said before it.", ""]
    for i, r in enumerate(rows, 1):
        out += [f"## {i}. {r['id']} ({r['source']}, {r['failure_type']}, relabeled by {r['relabel_model']})", "",
                f"Original (failed) goal: {r['original_goal'][:300]}", "",
                "Writes it trains on:", *(f"- {w}" for w in r["writes"] or ["(none)"]), "",
                "Facts it reported:", *(f"- {f[:300]}" for f in r["facts"] or ["(none)"]), ""]
        if r["excluded"]:
            out += ["Left out of the goal:", *(f"- {e}" for e in r["excluded"]), ""]
        out += [f"Sample: {r['sample']}", "", *markdown(r["turns"]), "",
                "Judges:", *(f"- {j}" for j in r["judges"]), "", "Verdict: ____", ""]
    return "\n".join(out) + "\n"


def print_table(name: str, m: dict) -> None:
    print(f"\n== {name}: {m['records']} records, {m['failures']} failures, model {m['model']}")
    rows = [("relabel candidates", m["candidates"]), ("accepted (passed every judge)", m["accepted"]),
            ("acceptance of candidates", m["acceptance_of_candidates"]),
            ("hindsight samples exported", m["hindsight_samples_exported"]),
            ("relabel calls", m["relabel_calls"]),
            ("prompt tokens per relabel call (now, mean)", m["prompt_tokens_per_relabel_call"]),
            ("prompt tokens per relabel call (before, median)", m["prompt_tokens_per_relabel_call_before"]),
            ("prompt tokens per accepted sample (all calls)", m["prompt_tokens_per_accepted_sample"]),
            ("LLM calls", m["llm_calls"]), ("LLM calls per accepted sample", m["calls_per_accepted_sample"]),
            ("relabels that needed no model (rules)", m["relabeled_by_rules"]),
            ("rewritten user turns per exported sample", m["rewritten_turns_per_sample"]),
            ("wall time (s)", m["wall_s"]), ("seconds per accepted sample", m["seconds_per_accepted_sample"])]
    for label, value in rows:
        print(f"  {label:<50} {value}")
    print("  rejections (stage / reason / count):")
    for r in m["rejections"]:
        print(f"    {r['stage']:<8} {r['reason']:<28} {r['n']}")


if __name__ == "__main__":
    main()
