"""`agenther review sample RUN_DIR`: a stratified sample of a run's judged relabels, written as a
self-contained review page (review.html), the items themselves (items.json) and Label Studio's
import format with its labeling config.

Strata: accepted relabels by failure type, rejected ones by the judge that first turned them down,
so rare failure types and every judge get items. Each stratum gets a share of the sample in
proportion to its size, at least one item; items within a stratum are drawn with the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl

from agenther.review import page
from agenther.review.transcript import sample_turns
from agenther.workdir import TABLES, write_text_atomic

RESULT_CHARS = 600  # of a tool result shown as evidence


def stratum(row: dict) -> str:
    if row["verified"]:
        return f"accepted / {row['failure_type']}"
    refused = next((j["judge"] for j in row["judgements"] or [] if not j["accept"]), "no judge")
    return f"rejected / {refused}"


def allocate(sizes: dict[str, int], size: int) -> dict[str, int]:
    """Items per stratum: proportional to its size (largest remainders), then one for every stratum
    left without (taken from the largest share) while the sample has room for them all."""
    total = sum(sizes.values())
    if total <= size:
        return dict(sizes)
    share = {k: size * n // total for k, n in sizes.items()}
    for k in sorted(sizes, key=lambda k: (-(size * sizes[k] % total), k))[:size - sum(share.values())]:
        share[k] += 1
    if size >= len(sizes):
        for k in sorted(k for k in sizes if share[k] == 0):
            share[max(share, key=lambda j: (share[j], j))] -= 1
            share[k] = 1
    return share


def evidence(messages: list[dict], steps: list[int]) -> list[dict]:
    """The steps an achievement rests on, as a person reads them."""
    shown = []
    for step in steps:
        if not 0 <= step < len(messages):
            continue
        m = messages[step]
        calls = [f"{c['name']}({c['arguments']})" for c in m.get("tool_calls") or []]
        text = (m.get("content") or "")[:RESULT_CHARS]
        shown.append({"step": step, "role": m["role"], "text": "\n".join([*calls, text] if text else calls)})
    return shown


def item(row: dict) -> dict:
    turns = sample_turns(row)
    return {
        "id": row["id"],
        "stratum": stratum(row),
        "status": "accepted" if row["verified"] else "rejected",
        "failure_type": row["failure_type"],
        "hindsight_prompt": row["hindsight_prompt"],
        "original_goal": row["goal"],
        # the sample as the trainer sees it, turn by turn (tool results and system prompt cut)
        "turns": [t | {"text": t["text"][:RESULT_CHARS]} if t["role"] in ("tool", "system") else t for t in turns],
        "achievements": [{"kind": a["kind"], "text": a["text"], "evidence": evidence(row["messages"], a["steps"])}
                         for a in row["achievements"] or []],
        # kept for scoring, never shown on the page (a label must not lean on the judges)
        "judges": {j["judge"]: j["accept"] for j in row["judgements"] or []},
    }


def sample_items(verified: pl.DataFrame, size: int, seed: int) -> list[dict]:
    rows = sorted(verified.to_dicts(), key=lambda r: r["id"])
    strata: dict[str, list[dict]] = {}
    for row in rows:
        strata.setdefault(stratum(row), []).append(row)
    rng = random.Random(seed)
    chosen = []
    for key, n in sorted(allocate({k: len(v) for k, v in strata.items()}, size).items()):
        chosen += rng.sample(strata[key], n)
    return [item(r) for r in sorted(chosen, key=lambda r: (stratum(r), r["id"]))]


def write_review(run_dir: Path, size: int, seed: int, out: Path | None = None) -> Path:
    """Write the review files into `out` (default RUN_DIR/review); returns that folder."""
    run_dir = Path(run_dir)
    table = run_dir / TABLES["verified"]
    if not table.exists():
        raise FileNotFoundError(f"{table} is missing: review needs a run's work folder (agenther run --out DIR)")
    items = sample_items(pl.read_parquet(table), size, seed)
    out = Path(out) if out else run_dir / "review"
    out.mkdir(parents=True, exist_ok=True)
    run = {"run_dir": run_dir.resolve().name, "size": size, "seed": seed}
    write_text_atomic(out / "items.json", json.dumps({"run": run, "items": items}, indent=2) + "\n")
    write_text_atomic(out / "review.html", page.render(run, items))
    write_text_atomic(out / "label_studio.json", json.dumps(page.label_studio_tasks(items), indent=2) + "\n")
    write_text_atomic(out / "label_studio_config.xml", page.LABEL_STUDIO_CONFIG)
    return out
