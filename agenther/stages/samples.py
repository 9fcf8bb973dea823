"""Stage 4: accepted hindsight relabels (and original successes) become training data.

Inputs: `verified` (schema.VERIFIED; rows with verified == True are accepted relabels) and
`classified` (schema.CLASSIFIED, every trajectory: the source of successes and of the
trajectories that preference pairs compare against).

Outputs, one row per sample, each with `weight` and `metadata` (lineage, source, judges):
- SFT (OpenAI chat format) and ShareGPT (LLaMA-Factory): a hindsight sample is the run cut
  after the last step that evidences its achieved goal (agenther.evidence.goal: `sample_end`), with its
  FIRST user turn replaced by the hindsight prompt (system and later user turns inside the cut
  stay: extract rejected any that ask for something the sample does not do), ending on an
  assistant turn. Its assistant turns that do not contribute (failed or repeated calls, reads
  nothing uses) stay as context with a per-message `weight` 0, the others weigh 1 (OpenAI's
  assistant-message weight; ShareGPT rows carry the same as `metadata.turn_weights`).
  Successes join with their original prompt when `include_successes`.
- DPO (preference pairs), two kinds, each at the STEP where the two runs diverge (default,
  `dpo_pairs: "step"`): the runs are aligned assistant turn by assistant turn from their first user
  turn; turns that take the same action (the same tool calls with the same arguments, or both a
  text reply: paraphrases) are shared history; the first turn whose action differs (or, while the
  histories are identical, whose text differs) is the step. prompt = the
  chosen run's messages before that turn, chosen = its turn there, rejected = the other run's
  turn there: ONE assistant turn each, so no user or tool text is ever a training target.
  natural: a success (chosen) and a failure (rejected) of one task.
  hindsight: prompt opens with [system, hindsight prompt]; chosen = the relabeled sample's turn
  (only a turn it trains on: weight 1), rejected = the turn of a run of the same task that lacks
  some of the chosen's tool calls.
  `metadata.prompt_shared` is true when the other run's history up to its turn is the same turn
  for turn (tau-bench's simulated user words every trial differently: then false).
  `dpo_pairs: "trajectory"` instead pairs whole continuations (everything after the shared
  opening, later user turns and tool results included): DPO then also scores that environment
  text as if the model wrote it; kept only to reproduce trajectory-level setups.

Weight direction: severity 0 is a near miss, 1 is "nothing of the goal done" (schema.CLASSIFIED).
A hindsight sample weighs max(min_weight, 1 - weight_alpha * severity): near misses count fully,
runs that wandered far from their goal count less. Successes and natural pairs weigh 1.

Every accepted relabel ends as exactly one hindsight sample or one rejection (stage "package":
duplicate_prompt, near_duplicate_prompt, unexportable), so counts reconcile. A hindsight
sample is kept only if BOTH its SFT and ShareGPT rows validate, so the two files hold the
same samples. Successes that cannot be exported are counted, not rejected (they were never
relabel candidates).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from agenther import schema
from agenther.evidence.goal import AchievedGoal, first_user_index, rewrites_of, sample_messages, sample_steps
from agenther.export import formats as exports
from agenther.export import tokens
from agenther.export.card import render_dataset_card
from agenther.export.dedup import dedup_prompts
from agenther.export.files import ANNOTATED, SortedJsonlSink
from agenther.export.registry import exporters
from agenther.export.schemas import validate_dpo, validate_sft
from agenther.tables import DEFAULT_BATCH_ROWS, TableWriter, iter_batches

STAGE = "package"
DEFAULTS = {
    "weight_alpha": 0.5,
    "min_weight": 0.2,
    "include_successes": True,
    "near_dup_threshold": 0.9,
    "max_pairs_per_task": 4,
    "dpo_pairs": "step",  # "step" | "trajectory" (see the module docstring)
}
PAIR_LEVELS = ("step", "trajectory")
COUNTS = (  # Packaged.counts keys; hindsight_samples + rejections = accepted_in
    *("accepted_in", "hindsight_samples", "rewritten_turns", "success_samples", "success_unexportable"),
    *("duplicates", "near_duplicates", "unexportable", "sharegpt_assistant_text_dropped"),
    *("dpo_natural", "dpo_natural_skipped", "dpo_hindsight", "dpo_hindsight_unpaired", "dpo_invalid"),
)

__all__ = ["Exported", "export_samples", "package_into", "render_dataset_card", "sample_weight"]


@dataclass
class Exported:
    """What the package stage wrote: the files are in its output folder."""
    rejections: pl.DataFrame  # schema.REJECTION rows, stage "package"
    counts: dict  # COUNTS
    digests: dict[str, str]  # file (path in the output folder) -> sha256, of the files written
    rows: dict[str, int]  # sft / dpo / sharegpt -> rows written (the annotated files)
    files: dict[str, int]  # every export file written -> rows (dataset_info.json: datasets named)
    not_written: dict[str, str]  # export file -> why it was not written
    token_lengths: dict  # per measured file (TRL's): percentiles, total, the max_length that cuts no row (or why none)


# --- message helpers ---------------------------------------------------------------------


def sample_weight(severity: float | None, alpha: float, min_weight: float) -> float:
    """max(min_weight, 1 - alpha * severity); unknown severity counts as the worst (1)."""
    s = 1.0 if severity is None else min(1.0, max(0.0, float(severity)))
    return round(float(max(min_weight, 1.0 - alpha * s)), 6)  # a float, whichever bound wins


def trim_trailing(messages: list[dict]) -> list[dict]:
    """Cut after the last assistant turn: a training sample ends where the model last spoke."""
    end = len(messages)
    while end and messages[end - 1]["role"] != "assistant":
        end -= 1
    return list(messages[:end])


def hindsight_messages(row: dict) -> list[dict]:
    """The hindsight sample of an accepted relabel (goal.sample_messages: its window of the run, the
    rewritten user turns in place), each assistant turn weighted 1 (trains) or 0 (context only),
    ending on an assistant turn."""
    goal = AchievedGoal.model_validate_json(row["achieved_goal"])
    train = set(goal.train_steps)
    sample = sample_messages(row["messages"], goal, rewrites_of(row))
    return trim_trailing([{**m, "weight": int(step in train)} if m["role"] == "assistant" else m
                          for step, m in zip(sample_steps(row["messages"], goal), sample, strict=True)])


def user_side(messages: list[dict]) -> str:
    """The user turns of a sample, one per line: what a hindsight request is as a whole."""
    return "\n".join(m.get("content") or "" for m in messages if m["role"] == "user")


def _canonical_args(arguments: str | None) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return arguments or ""


def tool_evidence(messages: list[dict]) -> frozenset[tuple[str, str]]:
    """What a run did, as (tool name, canonical JSON arguments) of its assistant tool calls."""
    return frozenset(
        (call["name"], _canonical_args(call.get("arguments")))
        for m in messages
        if m["role"] == "assistant"
        for call in m.get("tool_calls") or []
    )


def _turn_key(message: dict) -> tuple:
    """A turn's content without call ids (ids are random per run, so two trials never share them)."""
    calls = tuple((c["name"], _canonical_args(c.get("arguments"))) for c in message.get("tool_calls") or [])
    return (message["role"], message.get("content") or "", calls)


def _remap_call_ids(messages: list[dict], mapping: dict[str, str]) -> list[dict]:
    return [
        {**m, "tool_call_id": mapping.get(m.get("tool_call_id"), m.get("tool_call_id"))}
        if m["role"] == "tool"
        else m
        for m in messages
    ]


# --- DPO pairs -----------------------------------------------------------------------------


def natural_pair(success: list[dict], failure: list[dict]) -> tuple[list, list, list, bool] | None:
    """(prompt, chosen, rejected, prompt_shared) for a success and a failure of one task, or None.

    The prompt is the longest shared opening of the two runs, cut back until it ends on a
    user or tool turn that both runs answer with an assistant turn. It always reaches the first
    user turn: when the runs differ before that (tau-bench's simulated user words its opening
    differently in every trial), the prompt is the success's opening and `prompt_shared` is False.
    """
    fs, ff = first_user_index(success), first_user_index(failure)
    if fs is None or ff is None:
        return None
    common = 0
    while common < min(len(success), len(failure)) and _turn_key(success[common]) == _turn_key(
        failure[common]
    ):
        common += 1
    cut = None
    for k in range(common, fs, -1):  # never shorter than system + first user turn
        if (
            success[k - 1]["role"] in ("user", "tool")
            and k < len(success)
            and k < len(failure)
            and success[k]["role"] == "assistant"
            and failure[k]["role"] == "assistant"
        ):
            cut = k
            break
    if cut is not None:
        # The prompt is the success's copy; the failure's results must answer its call ids.
        mapping = {
            fc["id"]: sc["id"]
            for fm, sm in zip(failure[:cut], success[:cut], strict=True)
            for fc, sc in zip(fm.get("tool_calls") or [], sm.get("tool_calls") or [], strict=False)
        }
        prompt, chosen, rejected = success[:cut], success[cut:], _remap_call_ids(failure[cut:], mapping)
        shared = True
    else:
        prompt, chosen, rejected = success[: fs + 1], success[fs + 1 :], failure[ff + 1 :]
        shared = common >= fs + 1
    chosen, rejected = trim_trailing(chosen), trim_trailing(rejected)
    if not chosen or not rejected or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        return None
    if [_turn_key(m) for m in chosen] == [_turn_key(m) for m in rejected]:
        return None
    return prompt, chosen, rejected, shared


def _action(message: dict) -> tuple:
    """What an assistant turn does: its tool calls (name, canonical arguments); () = a text reply."""
    return tuple((c["name"], _canonical_args(c.get("arguments"))) for c in message.get("tool_calls") or [])


def step_pair(chosen_run: list[dict], other_run: list[dict],
              trained_only: bool = False) -> tuple[list, list, list, bool] | None:
    """(prompt, [chosen turn], [rejected turn], prompt_shared) at the step where two runs diverge.

    Both runs are walked assistant turn by assistant turn from their first user turn; the first
    pair of turns that differ is the step: in what they do (tool calls and arguments, or a text
    reply), or, while the two histories are still the same turn for turn, in any way (None if there is none before either run ends,
    or the chosen turn does not answer a user or tool turn, or with `trained_only` the chosen
    turn has weight 0: a dead end of a hindsight sample is no example to prefer)."""
    fc, fo = first_user_index(chosen_run), first_user_index(other_run)
    if fc is None or fo is None:
        return None
    mine = [i for i in range(fc + 1, len(chosen_run)) if chosen_run[i]["role"] == "assistant"]
    theirs = [j for j in range(fo + 1, len(other_run)) if other_run[j]["role"] == "assistant"]
    for i, j in zip(mine, theirs, strict=False):
        shared = [_turn_key(m) for m in chosen_run[:i]] == [_turn_key(m) for m in other_run[:j]]
        differs = _turn_key(chosen_run[i]) != _turn_key(other_run[j]) if shared else (
            _action(chosen_run[i]) != _action(other_run[j]))
        if not differs:
            continue
        if chosen_run[i - 1]["role"] not in ("user", "tool") or (trained_only and chosen_run[i].get("weight") == 0):
            return None
        return chosen_run[:i], [chosen_run[i]], [other_run[j]], shared
    return None


def hindsight_candidates(chosen_row: dict, same_task: list[dict]) -> Iterator[dict]:
    """The trajectories (by id) of the same task that lack one of the chosen's tool calls.

    Lacking a call, not merely differing: a run that made every call the relabeled run made
    (and more) may well satisfy the hindsight prompt too, so it is no safe negative.
    """
    evidence = tool_evidence(chosen_row["messages"])
    for other in same_task:
        if other["id"] != chosen_row["id"] and evidence - tool_evidence(other["messages"]):
            yield other


def hindsight_rejected(chosen_row: dict, same_task: list[dict]) -> tuple[dict, list[dict]] | None:
    """Trajectory level: the first candidate's whole continuation after its first user turn."""
    for other in hindsight_candidates(chosen_row, same_task):
        fu = first_user_index(other["messages"])
        rejected = trim_trailing(other["messages"][fu + 1 :]) if fu is not None else []
        if rejected and rejected[0]["role"] == "assistant":
            return other, rejected
    return None


# --- metadata ------------------------------------------------------------------------------


def _lineage_meta(lineage: dict) -> dict:
    return {
        "agenther_version": lineage.get("agenther_version"),
        "params_hash": lineage.get("params_hash"),
        "models": lineage.get("models") or {},
        "prompt_hashes": lineage.get("prompt_hashes") or {},
    }


def _judges(row: dict) -> list[dict]:
    return [
        {
            "judge": j.get("judge"),
            "model": j.get("model"),
            "accept": j.get("accept"),
            "confidence": None if j.get("confidence") is None else float(j["confidence"]),
            "reason": j.get("reason"),
        }
        for j in row.get("judgements") or []
    ]


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _sample_meta(row: dict, kind: str, base: dict) -> dict:
    hindsight = kind == "hindsight"
    return base | {
        "sample_id": f"{kind}:{row['id']}",
        "kind": kind,
        "trajectory_id": row["id"],
        "source_file": row.get("source_file"),
        "source_format": row.get("source_format"),
        "task_key": row.get("task_key"),
        "original_goal": row.get("goal"),
        "failure_type": row.get("failure_type"),
        "severity": _float(row.get("severity")),
        "relabel_confidence": _float(row.get("relabel_confidence")) if hindsight else None,
        "relabel_model": row.get("relabel_model") if hindsight else None,
        "judges": _judges(row) if hindsight else [],
        # the user turns the relabeler rewrote: [{step, before, after}] (step: in the source trajectory)
        "rewrites": json.loads(row.get("rewrites") or "[]") if hindsight else [],
    }


# --- the stage -----------------------------------------------------------------------------


# Columns of `classified` that say which rows package needs, read for the whole table (small).
LIGHT = ["id", "task_key", "success", "is_failure"]


Batches = Callable[..., Iterable[pl.DataFrame]]  # batches(columns=None): the table, a batch at a time


def package_into(sink, verified: pl.DataFrame, classified: Batches, params: dict, lineage: dict,
                 batch_rows: int = DEFAULT_BATCH_ROWS, round_of: Mapping[str, int] | None = None,
                 ) -> tuple[pl.DataFrame, dict]:
    """package() over a `classified` table read in batches, rows to `sink.add(file, row)`.

    Memory is bounded by a batch, not by the table: accepted relabels are few (one per judged
    LLM answer) and held whole; `classified` is read three times: its light columns (which
    tasks can pair), then batch by batch (successes go straight out; rows of tasks that can
    pair are spilled to Parquet buckets of about `batch_rows` rows, whole tasks per bucket),
    then bucket by bucket for the preference pairs. Returns (rejections, counts).
    `round_of` (trajectory id -> round, when packaging the union of rounds): every row's metadata
    gets `round`, the latest round of the runs it holds (a pair exists once both runs have arrived)."""
    p = DEFAULTS | (params or {})
    if p["dpo_pairs"] not in PAIR_LEVELS:
        raise ValueError(f"package.dpo_pairs must be one of {PAIR_LEVELS}, not {p['dpo_pairs']!r}")
    base = _lineage_meta(lineage or {}) | {"pair_level": p["dpo_pairs"]}
    counts = dict.fromkeys(COUNTS, 0)
    rejections: list[dict] = []

    accepted = (
        verified.filter(pl.col("verified").fill_null(False)) if "verified" in verified.columns else verified
    )
    rows = sorted(accepted.to_dicts(), key=lambda r: r["id"])
    counts["accepted_in"] = len(rows)
    by_id = {r["id"]: r for r in rows}

    def emit(name: str, row: dict) -> None:
        if round_of is not None:
            meta = row["metadata"]
            meta["round"] = max(round_of[meta[k]] for k in ("trajectory_id", "chosen_id", "rejected_id") if meta.get(k))
        if name == "sharegpt.jsonl":
            counts["sharegpt_assistant_text_dropped"] += row["metadata"]["assistant_text_dropped"]
        sink.add(name, row)

    # 1. Dedup the hindsight requests: a sample's whole user side (an empty opening is no sample at all).
    samples: dict[str, list[dict]] = {}
    for r in rows:
        why = "accepted without a hindsight prompt" if not (r.get("hindsight_prompt") or "").strip() else None
        if why is None:
            try:
                samples[r["id"]] = hindsight_messages(r)
            except ValueError as exc:
                why = str(exc)
        if why is not None:
            rejections.append(schema.rejection(r["id"], STAGE, "unexportable", why))
            counts["unexportable"] += 1
    result = dedup_prompts(
        [(r["id"], user_side(samples[r["id"]]), r.get("relabel_confidence")) for r in rows if r["id"] in samples],
        p["near_dup_threshold"],
    )
    for d in result.dropped:
        counts["duplicates" if d.reason == "duplicate_prompt" else "near_duplicates"] += 1
        rejections.append(
            schema.rejection(
                d.id,
                STAGE,
                d.reason,
                f"the sample's user side duplicates the one kept for {d.kept_id} (similarity {d.similarity})",
            )
        )

    # 2. Hindsight SFT + ShareGPT samples: both rows must validate, or neither is written.
    hindsight_kept = []
    for row_id in sorted(result.kept):
        r = by_id[row_id]
        weight = sample_weight(r.get("severity"), p["weight_alpha"], p["min_weight"])
        try:
            pair = _sample_rows(samples[row_id], r, weight, _sample_meta(r, "hindsight", base))
        except ValueError as exc:
            rejections.append(schema.rejection(row_id, STAGE, "unexportable", str(exc)))
            counts["unexportable"] += 1
            continue
        emit("sft.jsonl", pair[0])
        emit("sharegpt.jsonl", pair[1])
        hindsight_kept.append((r, weight))
        counts["rewritten_turns"] += len(pair[0]["metadata"]["rewrites"])
    counts["hindsight_samples"] = len(hindsight_kept)

    # 3. Which tasks can pair: a success and a failure (natural), or a kept relabel and another run.
    light = pl.concat(list(classified(columns=LIGHT)) or [schema.empty({c: schema.CLASSIFIED[c] for c in LIGHT})])
    per_task = (light.filter(pl.col("task_key").is_not_null()).group_by("task_key")
                .agg(pl.len().alias("rows"), pl.col("success").eq(True).any().alias("has_success"),
                     (pl.col("is_failure").eq(True) & pl.col("success").ne_missing(True)).any().alias("has_failure")))
    hindsight_tasks = {r.get("task_key") for r, _ in hindsight_kept}
    pairable = per_task.filter((pl.col("has_success") & pl.col("has_failure"))
                               | (pl.col("task_key").is_in(list(hindsight_tasks)) & (pl.col("rows") > 1)))
    bucket_of = _buckets(pairable.sort("task_key").select("task_key", "rows").iter_rows(), batch_rows)
    del light, per_task, pairable

    # 4. One pass over every row: successes out, rows of pairable tasks spilled to their bucket.
    with tempfile.TemporaryDirectory(prefix="agenther-package-") as spill_dir:
        spills = _Spills(Path(spill_dir), max(bucket_of.values(), default=-1) + 1)
        for batch in classified():
            for r in batch.to_dicts():
                if p["include_successes"] and r.get("success") is True:
                    try:
                        pair = _sample_rows(trim_trailing(r["messages"]), r, 1.0, _sample_meta(r, "success", base))
                    except ValueError:
                        counts["success_unexportable"] += 1
                    else:
                        emit("sft.jsonl", pair[0])
                        emit("sharegpt.jsonl", pair[1])
                        counts["success_samples"] += 1
            spills.add(batch, bucket_of)
        spills.close()

        # 5. Preference pairs, one bucket (a few whole tasks) at a time.
        kept_by_task: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for r, weight in hindsight_kept:
            kept_by_task[r.get("task_key")].append((r, weight))
        done: set[str] = set()
        for bucket in spills.read():
            by_task: dict[str, list[dict]] = defaultdict(list)
            for r in sorted(bucket, key=lambda r: r["id"]):
                by_task[r["task_key"]].append(r)
            for row in _natural_pairs(by_task, p["max_pairs_per_task"], base, counts, p["dpo_pairs"]):
                emit("dpo.jsonl", row)
            kept_here = [k for task in sorted(by_task) for k in kept_by_task.get(task, [])]
            for row in _hindsight_pairs(kept_here, by_task, base, counts, p["dpo_pairs"]):
                emit("dpo.jsonl", row)
            done.update(r["id"] for r, _ in kept_here)
    unpaired = [k for k in hindsight_kept if k[0]["id"] not in done]  # a task with no other run
    for row in _hindsight_pairs(unpaired, {}, base, counts, p["dpo_pairs"]):
        emit("dpo.jsonl", row)

    return (schema.frame(sorted(rejections, key=lambda x: (x["id"], x["reason"])), schema.REJECTION), counts)


def _buckets(tasks: Iterable[tuple[str, int]], batch_rows: int) -> dict[str, int]:
    """task -> bucket number: consecutive tasks (in key order) fill a bucket up to batch_rows rows;
    a task is never split (a task bigger than that gets a bucket of its own)."""
    bucket_of, bucket, filled = {}, 0, 0
    for task, rows in tasks:
        if filled and filled + rows > batch_rows:
            bucket, filled = bucket + 1, 0
        bucket_of[task] = bucket
        filled += rows
    return bucket_of


class _Spills:
    """Rows of pairable tasks, appended to one Parquet file per bucket, read back bucket by bucket."""

    def __init__(self, folder: Path, buckets: int):
        self.writers = [TableWriter(folder / f"bucket-{b:05d}.parquet", schema.CLASSIFIED) for b in range(buckets)]

    def add(self, batch: pl.DataFrame, bucket_of: dict[str, int]) -> None:
        if not self.writers:
            return
        numbered = batch.with_columns(
            pl.col("task_key").replace_strict(bucket_of, default=None, return_dtype=pl.Int64).alias("_bucket"))
        for (bucket,), part in numbered.filter(pl.col("_bucket").is_not_null()).group_by("_bucket"):
            self.writers[int(bucket)].write(part.drop("_bucket"))

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def read(self) -> Iterator[list[dict]]:
        for w in self.writers:
            yield pl.read_parquet(w.path).to_dicts()


def _sample_rows(messages: list[dict], row: dict, weight: float, meta: dict) -> tuple[dict, dict]:
    """The SFT and ShareGPT rows of one sample; ValueError (with the reason) if either is invalid."""
    tools = exports.parse_tools(row.get("tools"))
    sft = exports.sft_row(messages, tools, weight, meta)
    validate_sft(sft)
    return sft, exports.sharegpt_row(messages, tools, weight, meta)


def _natural_pairs(by_task: dict[str, list[dict]], cap: int, base: dict, counts: dict,
                   level: str = "step") -> list[dict]:
    """Each failure (by id) with the first success (by id) that makes a valid pair; `cap` per task."""
    out = []
    for task in sorted(by_task):
        successes = [r for r in by_task[task] if r.get("success") is True]
        failures = [r for r in by_task[task] if r.get("is_failure") is True and r.get("success") is not True]
        made = 0
        for f in failures:
            if made >= cap:
                break
            for s in successes:
                pair = (step_pair(s["messages"], f["messages"]) if level == "step"
                        else natural_pair(s["messages"], f["messages"]))
                if pair is None:
                    continue
                prompt, chosen, rejected, shared = pair
                meta = _sample_meta(s, "natural", base) | {
                    "sample_id": f"natural:{s['id']}|{f['id']}",
                    "chosen_id": s["id"],
                    "rejected_id": f["id"],
                    "prompt_shared": shared,
                    # the losing side's diagnosis: what went wrong in the rejected run
                    "failure_type": f.get("failure_type"),
                    "severity": _float(f.get("severity")),
                }
                if _append_valid(out, prompt, chosen, rejected, s, 1.0, meta, counts):
                    counts["dpo_natural"] += 1
                    made += 1
                break
            else:
                if successes:
                    counts["dpo_natural_skipped"] += 1
    return out


def _hindsight_pairs(
    kept: list[tuple[dict, float]], by_task: dict[str, list[dict]], base: dict, counts: dict, level: str = "step"
) -> list[dict]:
    out = []
    for r, weight in kept:
        sample = hindsight_messages(r)
        fu = first_user_index(sample)
        found = None
        if level == "step":
            for other in hindsight_candidates(r | {"messages": sample}, by_task.get(r.get("task_key"), [])):
                pair = step_pair(sample, other["messages"], trained_only=True)
                # The step must be one the relabel rests on: the chosen turn makes a call the other
                # run never made. Diverging earlier (asking vs acting, another lookup first) says
                # nothing about the hindsight prompt, and the other run's turn there may be as good.
                if pair is not None and tool_evidence(pair[1]) - tool_evidence(other["messages"]):
                    found = other, pair
                    break
        else:
            rejected_run = hindsight_rejected(r | {"messages": sample}, by_task.get(r.get("task_key"), []))
            chosen = sample[fu + 1 :]
            if rejected_run is not None and chosen and chosen[0]["role"] == "assistant":
                system = [m for m in sample[:fu] if m["role"] == "system"]
                prompt = [*system, {"role": "user", "content": r["hindsight_prompt"]}]
                found = rejected_run[0], (prompt, chosen, rejected_run[1], False)
        if found is None:
            counts["dpo_hindsight_unpaired"] += 1
            continue
        other, (prompt, chosen, rejected, _) = found
        meta = _sample_meta(r, "hindsight", base) | {
            "sample_id": f"hindsight:{r['id']}|{other['id']}",
            "chosen_id": r["id"],
            "rejected_id": other["id"],
            "prompt_shared": False,  # neither run saw the hindsight prompt
        }
        if _append_valid(out, prompt, chosen, rejected, r, weight, meta, counts):
            counts["dpo_hindsight"] += 1
    return out


def _append_valid(
    out: list,
    prompt: list,
    chosen: list,
    rejected: list,
    source: dict,
    weight: float,
    meta: dict,
    counts: dict,
) -> bool:
    try:
        row = exports.dpo_row(
            prompt, chosen, rejected, exports.parse_tools(source.get("tools")), weight, meta
        )
        validate_dpo(row)
    except ValueError:
        counts["dpo_invalid"] += 1  # e.g. a tool result without its call: never write a broken pair
        return False
    out.append(row)
    return True


def export_samples(verified: pl.DataFrame, classified: Path, params: dict, lineage: dict, out: Path,
                   batch_rows: int = DEFAULT_BATCH_ROWS, tokenizer_model: str | None = None,
                   measure_tokens: bool = True, round_of: Mapping[str, int] | None = None) -> Exported:
    """The package stage's product: `package_into` over the classified table at `classified`
    (read in batches), its rows written to the export files in `out` (sorted by sample id,
    bounded memory: SortedJsonlSink), then the token lengths of the files the exporters name as
    `measured` (TRL's), with the local model's tokenizer (`tokenizer_model`, else the first one installed). `round_of`: package_into."""
    sink = SortedJsonlSink(out, batch_rows)
    rejections, counts = package_into(
        sink, verified, lambda columns=None: iter_batches(classified, batch_rows, columns), params, lineage, batch_rows,
        round_of)
    digests = sink.close()
    lengths = measure_lengths(Path(out), digests, tokenizer_model) if measure_tokens else {
        "tokenizer": None, "not_measured": "not asked"}
    return Exported(rejections, counts, digests, {name.removesuffix(".jsonl"): sink.rows[name] for name in ANNOTATED},
                    {name: sink.rows[name] for name in digests}, dict(sink.not_written), lengths)


def measure_lengths(out: Path, written: dict, model: str | None) -> dict:
    """{"tokenizer": model name, "files": {file: tokens.stats}} or {"tokenizer": None, "not_measured": why}."""
    todo = [name for e in exporters() for name in e.measured if name in written]
    if not todo:
        return {"tokenizer": None, "not_measured": "no trainer file written"}
    reasons = []
    for tok, why in tokens.local_tokenizers(model):  # the run's local model first, then any installed one
        if tok is None:
            reasons.append(why)
            continue
        try:
            files = {}
            for name in todo:
                with (out / name).open(encoding="utf-8") as fh:
                    files[name] = tokens.stats(tokens.row_lengths(tok, fh))
        except Exception as exc:  # a chat template that cannot render these rows (tool calls, null content)
            reasons.append(f"{tok.name}: its chat template failed ({type(exc).__name__}: {exc})")
            continue
        return {"tokenizer": f"{tok.name} (GGUF vocabulary and chat template)", "files": files} | (
            {"skipped": reasons} if reasons else {})
    return {"tokenizer": None, "not_measured": f"no local tokenizer ({'; '.join(reasons) or 'no local model'})"}
