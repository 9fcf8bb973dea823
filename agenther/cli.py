"""The `agenther` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from agenther import s3_cli

FORMATS = ("auto", "tau-bench", "toolbench", "messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agenther", description="Turn failed agent runs into training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline on a log file or folder")
    run.add_argument("--input", help="log file or folder (default: params ingest.input)")
    run.add_argument("--format", choices=FORMATS, help="log format (default: params ingest.format)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--limit", type=int, help="only the first N trajectories")
    run.add_argument("--params", help="params.yaml (default: built-in defaults)")
    run.add_argument("--model", help="litellm model for relabeling, or 'local' (default: params llm.model)")
    run.add_argument("--judge-model", help="litellm model for the evidence judge")
    run.add_argument("--api-base", help="OpenAI-compatible endpoint for --model")
    run.add_argument("--map", action="append", default=[], metavar="KEY=VALUE",
                     help="messages format mapping, e.g. --map messages_path=data.turns --map role_key=from "
                          "--map roles.human=user")
    run.add_argument("-v", "--verbose", action="store_true")

    stage = sub.add_parser("stage", help="run one stage, file to file (what dvc.yaml calls)")
    stage.add_argument("name", help="ingest | classify | extract | relabel | verify | package")
    stage.add_argument("--params", default="params.yaml")
    stage.add_argument("--work", default="data/interim", help="folder of the per-stage tables")
    stage.add_argument("--out", default="data/processed", help="folder of the datasets (package stage)")
    stage.add_argument("-v", "--verbose", action="store_true")

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
    llm = {k: v for k, v in {"model": args.model, "judge_model": args.judge_model,
                             "api_base": args.api_base}.items() if v}
    return {k: v for k, v in {"ingest": ingest, "llm": llm}.items() if v}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "s3":
        return s3_cli.run(args)
    # Imported here so that `agenther --help` is instant (litellm and polars take seconds).
    from agenther.ingest import IngestError
    from agenther.llm import LLMError
    from agenther.local_model import LocalModelError
    from agenther.params import ParamsError, load_params
    from agenther.pipeline import run

    try:
        if args.command == "stage":
            return _stage(args, load_params(args.params))
        params = load_params(args.params, _overrides(args))
        summary = run(params, args.out)
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
        "llm_calls": summary["llm"]["total"]["calls"],
        "out": args.out,
    }, indent=2))
    return 0 if summary["reconciliation"]["ok"] else 1


def _stage(args: argparse.Namespace, params: dict) -> int:
    from pathlib import Path

    from agenther.providers import LLMs
    from agenther.stages import run_stage

    Path(args.work).mkdir(parents=True, exist_ok=True)
    with LLMs.from_params(params) as llms:
        result = run_stage(args.name, params, Path(args.work), Path(args.out), llms)
    if args.name == "package":
        result = {"gates": result["gates"], "reconciled": result["reconciliation"]["ok"]}
    print(json.dumps({args.name: result}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
