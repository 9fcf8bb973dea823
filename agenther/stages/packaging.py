"""The package stage's rows (agenther/stages/package.py writes the summary around them): every
accepted relabel and success as a sample (agenther/stages/samples.py), every preference pair
(agenther/stages/pairs.py), to the export files, with bounded memory (`package_into`).

Inputs: `verified` (schema.VERIFIED; rows with verified == True are accepted relabels) and
`classified` (schema.CLASSIFIED, every trajectory: the source of successes and of the
trajectories that preference pairs compare against).

Every accepted relabel ends as exactly one hindsight sample or one rejection (stage "package":
duplicate_prompt, near_duplicate_prompt, unexportable), so counts reconcile. A hindsight
sample is kept only if BOTH its SFT and ShareGPT rows validate, so the two files hold the
same samples. Successes that cannot be exported are counted, not rejected (they were never
relabel candidates).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from agenther import schema
from agenther.export import tokens
from agenther.export.dedup import dedup_prompts
from agenther.export.files import ANNOTATED, SortedJsonlSink
from agenther.export.registry import exporters
from agenther.params import check_section
from agenther.stages.pairs import hindsight_pairs, natural_pairs
from agenther.stages.samples import (
    hindsight_messages,
    lineage_meta,
    sample_meta,
    sample_rows,
    sample_weight,
    trim_trailing,
    user_side,
)
from agenther.tables import DEFAULT_BATCH_ROWS, TableWriter, iter_batches

STAGE = "package"
COUNTS = (  # Packaged.counts keys; hindsight_samples + rejections = accepted_in
    *("accepted_in", "hindsight_samples", "rewritten_turns", "success_samples", "success_unexportable"),
    *("duplicates", "near_duplicates", "unexportable", "sharegpt_assistant_text_dropped"),
    *("dpo_natural", "dpo_natural_skipped", "dpo_hindsight", "dpo_hindsight_unpaired", "dpo_invalid"),
)


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
    p = check_section("package", params)  # the section's defaults (agenther/params.py) and checks
    base = lineage_meta(lineage or {}) | {"pair_level": p["dpo_pairs"]}
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
            pair = sample_rows(samples[row_id], r, weight, sample_meta(r, "hindsight", base))
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
                        pair = sample_rows(trim_trailing(r["messages"]), r, 1.0, sample_meta(r, "success", base))
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
            for row in natural_pairs(by_task, p["max_pairs_per_task"], base, counts, p["dpo_pairs"]):
                emit("dpo.jsonl", row)
            kept_here = [k for task in sorted(by_task) for k in kept_by_task.get(task, [])]
            for row in hindsight_pairs(kept_here, by_task, base, counts, p["dpo_pairs"]):
                emit("dpo.jsonl", row)
            done.update(r["id"] for r, _ in kept_here)
    unpaired = [k for k in hindsight_kept if k[0]["id"] not in done]  # a task with no other run
    for row in hindsight_pairs(unpaired, {}, base, counts, p["dpo_pairs"]):
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
