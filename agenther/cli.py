"""The `agenther` command."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agenther import stopping
from agenther.devtools import s3_cli

if TYPE_CHECKING:  # imported when a command runs: `agenther --help` stays instant
    from agenther.params import Params


def _run_args(parser: argparse.ArgumentParser, limit: str) -> None:
    """What `run` and `round` both take: the logs, the params and the models."""
    parser.add_argument("--input", help="log file or folder, or s3://bucket/prefix/ (default: params ingest.input)")
    # No `choices`: the formats are a registry (plugins add theirs); ingest names the known ones.
    parser.add_argument("--format", help="log format: auto, tau-bench, toolbench, messages or a plugin's "
                                         "(default: params ingest.format)")
    parser.add_argument("--limit", type=int, help=limit)
    parser.add_argument("--params", help="params.yaml (default: built-in defaults)")
    parser.add_argument("--model", help="litellm model for relabeling, or 'local' (default: params llm.model)")
    parser.add_argument("--judge-model", help="litellm model for the evidence judge")
    parser.add_argument("--api-base", help="OpenAI-compatible endpoint for --model")
    parser.add_argument("--map", action="append", default=[], metavar="KEY=VALUE",
                        help="messages format mapping, e.g. --map messages_path=data.turns --map role_key=from "
                             "--map roles.human=user")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agenther", description="Turn failed agent runs into training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline on a log file or folder")
    run.add_argument("--out", required=True, help="output folder")
    _run_args(run, limit="only the first N trajectories")
    run.add_argument("-v", "--verbose", action="store_true")

    one_round = sub.add_parser("round", help="one incremental round: only logs no earlier round of this lineage "
                                              "processed, then the union of rounds published (agenther/rounds.py)")
    one_round.add_argument("--root", required=True, help="rounds root: <root>/<lineage>/round-NNNN, published/")
    _run_args(one_round, limit="only the first N trajectories of the new files")
    one_round.add_argument("--push-url", help="upload the round and the union to <url>/<lineage>/round-NNNN and "
                                              "<url>/<lineage>/published (S3 settings from the environment)")
    one_round.add_argument("-v", "--verbose", action="store_true")

    rounds = sub.add_parser("rounds", help="list the lineages under a rounds root and their rounds with counts")
    rounds.add_argument("--root", default="data/rounds", help="rounds root (default: data/rounds, as dvc.yaml)")
    rounds.add_argument("--json", action="store_true", help="the manifests as JSON")

    stage = sub.add_parser("stage", help="run one stage, file to file (what dvc.yaml calls)")
    stage.add_argument("name", help="ingest | classify | extract | relabel | verify | package")
    stage.add_argument("--params", default="params.yaml")
    stage.add_argument("--work", default="data/interim", help="folder of the per-stage tables")
    stage.add_argument("--out", default="data/processed", help="folder of the datasets (package stage)")
    stage.add_argument("-v", "--verbose", action="store_true")

    inspect = sub.add_parser("inspect", help="dry run, no LLM call: format, detected fields, one record's steps, "
                                             "how many failures would reach relabeling and why not the others")
    inspect.add_argument("input", help="log file or folder")
    inspect.add_argument("--format", help="as for run")
    inspect.add_argument("--limit", type=int, help="only the first N trajectories")
    inspect.add_argument("--params", help="params.yaml (default: built-in defaults)")
    inspect.add_argument("--map", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    inspect.add_argument("--json", action="store_true", help="print the findings as JSON")
    inspect.add_argument("-v", "--verbose", action="store_true")

    replay = sub.add_parser("replay", help="replay a log in its environment: are the recorded state hashes and "
                                           "rewards reproduced? (agenther/envs)")
    replay.add_argument("log", help="log file or folder")
    replay.add_argument("--format", help="as for run")
    replay.add_argument("--params", help="params.yaml (default: built-in defaults; replay.env picks the environment)")
    replay.add_argument("--json", action="store_true", help="print the counts as JSON")

    review = sub.add_parser("review", help="measure precision: sample relabels for people to label, score the labels")
    actions = review.add_subparsers(dest="action", required=True)
    sample = actions.add_parser("sample", help="write RUN_DIR/review/review.html (+ items.json, Label Studio import)")
    sample.add_argument("run_dir", help="a run's folder (agenther run --out), with 04_verified.parquet")
    sample.add_argument("--size", type=int, help="items (default: params review.size)")
    sample.add_argument("--seed", type=int, help="(default: params review.seed)")
    sample.add_argument("--params", help="params.yaml (default: built-in defaults)")
    score = actions.add_parser("score", help="precision of accepted relabels and judge agreement from label files")
    score.add_argument("run_dir")
    score.add_argument("labels", nargs="+", help="label files the review page downloaded (one per annotator)")

    s3_cli.add_parser(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    ingest: dict = {}
    if args.input:
        ingest["input"] = args.input
    if args.format:
        ingest["format"] = args.format
    if args.limit is not None:
        ingest["limit"] = args.limit
    if args.map:
        mapping: dict = {}
        for item in args.map:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--map expects KEY=VALUE, got {item!r}")
            if key.startswith("roles."):
                mapping.setdefault("roles", {})[key.removeprefix("roles.")] = value
            else:
                mapping[key] = None if value.lower() in ("", "null", "none") else value
        ingest["messages"] = mapping
    llm = {k: v for k in ("model", "judge_model", "api_base") if (v := getattr(args, k, None))}
    return {k: v for k, v in {"ingest": ingest, "llm": llm}.items() if v}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # At exit, skip the interpreter's last cyclic garbage collection over litellm's and Great
    # Expectations' object graphs: ~2 s of exit on 2 cores, after a Ctrl-C too. The process's
    # memory goes back to the system anyway; files are closed by their `with` blocks.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "verbose", False):  # our own steps; the libraries' INFO chatter stays out
        logging.getLogger("agenther").setLevel(logging.INFO)
    if args.command == "s3":
        return s3_cli.run(args)
    if args.command == "review":
        return _review(args)
    if args.command == "rounds":
        return _rounds(args)
    if args.command == "replay":
        return _replay(args)
    with stopping.on_signals():
        try:
            return _main(args)
        except stopping.Interrupted as exc:
            # `with` blocks have unwound (the local model server is stopped); open LLM calls are
            # abandoned; stage outputs are whole or absent. Exit like a process the signal ended.
            print(f"agenther: stopped by {signal.Signals(exc.signum).name}: answers received so far "
                  "are in the LLM cache; run the same command again to resume", file=sys.stderr)
            return exc.exit_code


def _main(args: argparse.Namespace) -> int:
    # Imported here so that `agenther --help` is instant (litellm and polars take seconds).
    from agenther.llm import LLMError, LLMs
    from agenther.llm.models import LocalModelError
    from agenther.params import ParamsError, load_params
    from agenther.pipeline import run
    from agenther.stages.ingest import IngestError

    try:
        if args.command == "stage":
            return _stage(args, load_params(args.params))
        if args.command == "round":
            return _round(args, load_params(args.params, _overrides(args)))
        if args.command == "inspect":
            from agenther.inspect import inspect_logs, print_report

            found = inspect_logs(load_params(args.params, _overrides(args)))
            if args.json:
                print(json.dumps(found, indent=2))
            else:
                print_report(found)
            return 0
        params = load_params(args.params, _overrides(args))
        with LLMs.from_params(params) as llms:
            summary = run(params, args.out, llms)
            calls = sum(u.calls for u in llms.usage().values())  # this run's (summary.json: the data's)
    except (IngestError, ParamsError, LLMError, LocalModelError, ValueError) as exc:
        print(f"agenther: error: {exc}", file=sys.stderr)
        return 2
    stages = summary["stages"]
    print(json.dumps({
        "records_in": stages["ingest"]["in"],
        "quarantined": stages["ingest"]["quarantined"],
        "failures": stages["classify"]["failures"],
        "relabels_proposed": summary["gates"]["relabels_proposed"],
        "passed_confidence_gate": summary["gates"]["passed_confidence_gate"],
        "passed_judges": summary["gates"]["passed_judges"],
        "exports": {k: summary["exports"][k] for k in ("sft", "dpo", "sharegpt")},
        "reconciled": summary["reconciliation"]["ok"],
        "llm_calls": calls,
        "up_to_date": bool(summary.get("unchanged")),  # every stage skipped: outputs as they were
        "out": args.out,
    }, indent=2))
    return 0 if summary["reconciliation"]["ok"] else 1


def _stage(args: argparse.Namespace, params: Params) -> int:
    from agenther.llm import LLMs
    from agenther.runner import run_stage

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with LLMs.from_params(params) as llms:
        carried = carry_budget(llms, args.name, work)
        result = run_stage(args.name, params, work, Path(args.out), llms)
    if carried is not None:
        _record_carried(work, args.name, carried)
        result = result | {"budget_carried_in": carried}
    if args.name == "package":
        result = {"gates": result["gates"], "reconciled": result["reconciliation"]["ok"]}
    print(json.dumps({args.name: result}, sort_keys=True))
    return 0


def _round(args: argparse.Namespace, params: Params) -> int:
    from agenther.llm import LLMs
    from agenther.pipeline import fuse_relabel_verify
    from agenther.rounds import push_targets, run_round

    with LLMs.from_params(params) as llms:
        result = run_round(params, args.root, llms, fuse=fuse_relabel_verify(llms))
    print(f"agenther round: {result.message}", file=sys.stderr)
    pushed = []
    if args.push_url:
        from agenther.s3 import push_dir

        for local, url in push_targets(result, args.push_url):
            pushed.append({"url": url, "objects": len(push_dir(local, url))})
    print(json.dumps({"lineage": result.lineage, "round": result.round, "folder": str(result.folder),
                      **result.entry.get("counts", {}), "published": result.entry.get("published"),
                      "reconciled": result.reconciled, "pushed": pushed}, indent=2))
    return 0 if result.reconciled else 1


def _rounds(args: argparse.Namespace) -> int:
    from agenther.lineage import format_rounds, list_lineages

    lineages = list_lineages(args.root)
    print(json.dumps(lineages, indent=2) if args.json else format_rounds(lineages))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from agenther.adapters.common import Quarantined
    from agenther.envs import EnvError
    from agenther.envs.replay_log import replay_records
    from agenther.params import ParamsError, load_params
    from agenther.stages.ingest import IngestError, read_logs

    try:
        params = load_params(args.params, {"ingest": {"input": args.log} | ({"format": args.format} if args.format else {})})
        rows = (r for r in read_logs(args.log, params.ingest.format) if not isinstance(r, Quarantined))
        report = replay_records(rows, params)
    except (EnvError, IngestError, ParamsError) as exc:
        print(f"agenther replay: error: {exc}", file=sys.stderr)
        return 2
    print(report.model_dump_json(indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ground_truth == report.agent_runs == report.with_hash else 1


def _review(args: argparse.Namespace) -> int:
    try:
        if args.action == "sample":
            from agenther.params import load_params
            from agenther.review.sample import write_review

            review = load_params(args.params).review
            size = args.size if args.size is not None else review.size
            out = write_review(Path(args.run_dir), size, args.seed if args.seed is not None else review.seed)
            print(f"agenther review: open {out / 'review.html'} in a browser; label; download; then "
                  f"agenther review score {args.run_dir} LABELS.json")
        else:
            from agenther.review.score import score_run

            print(json.dumps(score_run(Path(args.run_dir), [Path(p) for p in args.labels]), indent=2, sort_keys=True))
    except (OSError, ValueError) as exc:
        print(f"agenther review: error: {exc}", file=sys.stderr)
        return 2
    return 0


def carry_budget(llms, stage: str, work: Path) -> dict | None:
    """Charge this process's budget with what the earlier LLM stages of `work` spent.

    `agenther stage` (and so `dvc repro`) runs each stage in its own process with a fresh
    Budget; without this, every stage could spend the whole llm.budget_* again. The earlier
    stages' recorded usage (their NN_<stage>.json: real calls only, cache hits are free) is
    charged before the first call, so the cap holds for the run as in `agenther run`, where
    one process shares one Budget (which never calls this: no double counting).
    Returns what was carried in, or None for stages that make no LLM call."""
    from agenther.stages import LLM_STAGES
    from agenther.workdir import read_stats

    if stage not in LLM_STAGES:
        return None
    tokens, usd, stages = 0, 0.0, []
    for earlier in LLM_STAGES[:LLM_STAGES.index(stage)]:
        try:
            usage = read_stats(work, earlier).get("usage") or {}
        except FileNotFoundError:
            continue  # not run in this folder (the stage's own input check reports what is missing)
        tokens += int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        usd += float(usage.get("cost_usd", 0.0))
        stages.append(earlier)
    llms.budget.charge(tokens, usd)
    return {"from": stages, "tokens": tokens, "usd": round(usd, 6)}


def _record_carried(work: Path, stage: str, carried: dict) -> None:
    """Add what the stage's budget started from to its stats file (NN_<stage>.json)."""
    from agenther.workdir import STATS, write_text_atomic

    path = work / STATS[stage]
    stats = json.loads(path.read_text())
    stats["budget_carried_in"] = carried
    write_text_atomic(path, json.dumps(stats, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
