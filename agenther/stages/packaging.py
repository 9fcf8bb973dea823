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

import atexit
import pickle
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from agenther import schema
from agenther.export import tokens
from agenther.export.dedup import dedup_prompts
from agenther.export.files import ANNOTATED, SortedJsonlSink, read_run
from agenther.export.registry import exporters
from agenther.params import Package
from agenther.stages import Spread, in_process
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
from agenther.tables import DEFAULT_BATCH_ROWS, TableWriter, count_rows, read_rows

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



@dataclass(frozen=True)
class Plan:
    """What every shard of a package run needs, small: the package params, the lineage metadata, which
    bucket each pairable task's rows go to, the kept hindsight relabels by task and each run's round."""
    params: Package
    base: dict
    bucket_of: dict[str, int]
    kept_by_task: dict[str, list[tuple[dict, float]]]
    round_of: Mapping[str, int] | None
    tokens: tuple[bool, str | None] = (False, None)  # measure the trainer files' token lengths, with which model's


@dataclass(frozen=True)
class Shard:
    """One shard's work: `rows` (offset, count) of the classified table (successes out, pairable rows
    spilled to their buckets) or one `bucket` (its preference pairs); its sink's runs go to `folder`."""
    plan: Path  # the Plan, pickled in the run's scratch folder (read once per process)
    classified: Path
    folder: Path
    buffer_rows: int
    rows: tuple[int, int] | None = None
    bucket: int | None = None


@dataclass
class ShardResult:
    runs: dict[str, list[str]]  # the shard's sorted runs per export file (SortedJsonlSink.adopt)
    rows: dict[str, int]
    counts: dict
    paired: list[str] = field(default_factory=list)  # the kept relabels this bucket paired (or tried to)
    lengths: Lengths | None = None  # its rows' token lengths (trainer files), when measured


@dataclass(frozen=True)
class Lengths:
    """A shard's rows of the measured files, tokenized by the first local tokenizer that loads."""
    tokenizer: str | None  # None: none loads, or its chat template failed on a row (then measured at the end)
    skipped: tuple[str, ...]  # the tokenizers before it that could not be had, and why
    files: dict[str, list[tuple[int, bool]]]  # file -> (tokens, exact) per row


def package_into(sink: SortedJsonlSink, verified: pl.DataFrame, classified: Path, params: Package, lineage: dict,
                 batch_rows: int = DEFAULT_BATCH_ROWS, round_of: Mapping[str, int] | None = None,
                 spread: Spread = in_process, tokens_of: tuple[bool, str | None] = (False, None),
                 ) -> tuple[pl.DataFrame, dict, list[Lengths | None]]:
    """Every sample and pair of a run, rows to `sink` (its main sink: the files come out of its close).

    Memory is bounded by a batch, not by the table, and the work spreads over shards (`spread`: in
    this process, or an executor's workers; each shard writes its rows as sorted runs into the sink's
    scratch folder, which the workers share, and the results are the same whoever ran them):
    1. here: the accepted relabels (few: one per judged LLM answer), deduplicated by their requests,
       become hindsight samples; the light columns of `classified` say which tasks can pair, and
       each such task gets a bucket of about `batch_rows` rows (whole tasks);
    2. a shard per `batch_rows` rows of `classified`: successes out, rows of pairable tasks spilled
       to their bucket (a Parquet part per bucket and shard);
    3. a shard per bucket: its preference pairs (natural, and the hindsight ones of its tasks);
    4. here: the kept relabels of tasks no bucket holds (no other run) are counted unpaired.
    With `tokens_of` (measure?, the local model): each shard also measures its rows' token lengths.
    Returns (rejections, counts, every shard's lengths). `round_of` (trajectory id -> round, when packaging the union of
    rounds): every row's metadata gets `round`, the latest round of the runs it holds (a pair exists
    once both runs have arrived)."""
    base = lineage_meta(lineage or {}) | {"pair_level": params.dpo_pairs}
    counts = dict.fromkeys(COUNTS, 0)
    rejections: list[dict] = []

    accepted = (
        verified.filter(pl.col("verified").fill_null(False)) if "verified" in verified.columns else verified
    )
    rows = sorted(accepted.to_dicts(), key=lambda r: r["id"])
    counts["accepted_in"] = len(rows)
    by_id = {r["id"]: r for r in rows}
    own = SortedJsonlSink(sink.scratch / "main", batch_rows, runs_dir=sink.scratch / "main")  # rows made here
    emit = _Emitter(own, counts, round_of)

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
        params.near_dup_threshold,
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

    # Hindsight SFT + ShareGPT samples: both rows must validate, or neither is written.
    hindsight_kept = []
    for row_id in sorted(result.kept):
        r = by_id[row_id]
        weight = sample_weight(r.get("severity"), params.weight_alpha, params.min_weight)
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

    # Which tasks can pair: a success and a failure (natural), or a kept relabel and another run.
    light = pl.read_parquet(classified, columns=LIGHT)
    per_task = (light.filter(pl.col("task_key").is_not_null()).group_by("task_key")
                .agg(pl.len().alias("rows"), pl.col("success").eq(True).any().alias("has_success"),
                     (pl.col("is_failure").eq(True) & pl.col("success").ne_missing(True)).any().alias("has_failure")))
    hindsight_tasks = {r.get("task_key") for r, _ in hindsight_kept}
    pairable = per_task.filter((pl.col("has_success") & pl.col("has_failure"))
                               | (pl.col("task_key").is_in(list(hindsight_tasks)) & (pl.col("rows") > 1)))
    bucket_of = _buckets(pairable.sort("task_key").select("task_key", "rows").iter_rows(), batch_rows)
    del light, per_task, pairable
    kept_by_task: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for r, weight in hindsight_kept:
        kept_by_task[r.get("task_key")].append((r, weight))

    # 2 and 3: the shards (the plan in a file every worker reads, not in every job).
    plan = sink.scratch / "plan.pickle"
    plan.write_bytes(pickle.dumps(Plan(params, base, bucket_of, dict(kept_by_task), round_of, tokens_of)))
    total = count_rows(classified)
    jobs = [Shard(plan, classified, sink.scratch / f"rows-{i:05d}", batch_rows, rows=(start, batch_rows))
            for i, start in enumerate(range(0, total, batch_rows))]
    lengths: list[Lengths | None] = []
    _adopt(sink, counts, spread(rows_shard, jobs), lengths)
    buckets = max(bucket_of.values(), default=-1) + 1
    jobs = [Shard(plan, classified, sink.scratch / f"bucket-{b:05d}", batch_rows, bucket=b) for b in range(buckets)]
    paired = _adopt(sink, counts, spread(bucket_shard, jobs), lengths)

    # 4. A kept relabel of a task no bucket holds: no other run to pair with.
    unpaired = [k for k in hindsight_kept if k[0]["id"] not in paired]
    for row in hindsight_pairs(unpaired, {}, base, counts, params.dpo_pairs):
        emit("dpo.jsonl", row)
    _adopt(sink, {}, [_finish(own, {}, tokens_of)], lengths)
    return (schema.frame(sorted(rejections, key=lambda x: (x["id"], x["reason"])), schema.REJECTION), counts,
            lengths)


class _Emitter:
    """Rows to a sink, each with its round (rounds) and the ShareGPT text count."""

    def __init__(self, sink: SortedJsonlSink, counts: dict, round_of: Mapping[str, int] | None):
        self.sink, self.counts, self.round_of = sink, counts, round_of

    def __call__(self, name: str, row: dict) -> None:
        if self.round_of is not None:
            meta = row["metadata"]
            meta["round"] = max(self.round_of[meta[k]] for k in ("trajectory_id", "chosen_id", "rejected_id")
                                if meta.get(k))
        if name == "sharegpt.jsonl":
            self.counts["sharegpt_assistant_text_dropped"] += row["metadata"]["assistant_text_dropped"]
        self.sink.add(name, row)


def _adopt(sink: SortedJsonlSink, counts: dict, results: Iterable[ShardResult], lengths: list) -> set[str]:
    """The shards' runs into the main sink, their counts added, their token lengths to `lengths`; the
    relabel ids they paired."""
    paired: set[str] = set()
    for result in results:
        sink.adopt(result.runs, result.rows)
        for key, n in result.counts.items():
            counts[key] += n
        paired.update(result.paired)
        lengths.append(result.lengths)
    return paired


def _finish(sink: SortedJsonlSink, counts: dict, tokens_of: tuple[bool, str | None],
            paired: list[str] | None = None) -> ShardResult:
    """A shard's sink closed into runs, and (if asked) its rows of the trainer files measured."""
    runs, rows = sink.finish_runs()
    measure, model = tokens_of
    return ShardResult(runs, rows, counts, paired or [], _measure(runs, model) if measure else None)


_TOKENIZER: list[tuple[object, tuple[str, ...]]] = []  # per process: (the first local tokenizer that loads, skipped)


def _measure(runs: dict[str, list[str]], model: str | None) -> Lengths:
    """The token lengths of a shard's rows of the measured files (tokens.row_lengths over its runs)."""
    if not _TOKENIZER:
        # freed at exit before the interpreter tears llama_cpp's module down (its __del__ needs it)
        atexit.register(_TOKENIZER.clear)
        skipped: list[str] = []
        for tok, why in tokens.local_tokenizers(model):
            if tok is not None:
                _TOKENIZER.append((tok, tuple(skipped)))
                break
            skipped.append(why)
        else:
            _TOKENIZER.append((None, tuple(skipped)))
    tok, skipped = _TOKENIZER[0]
    if tok is None:
        return Lengths(None, skipped, {})
    files = {}
    try:
        for name in (n for e in exporters() for n in e.measured if n in runs):
            files[name] = tokens.row_lengths(tok, (line for run in runs[name] for _, line in read_run(Path(run))))
    except Exception:  # a chat template that cannot render a row: measure_lengths says why, at the end
        return Lengths(None, skipped, {})
    return Lengths(tok.name, skipped, files)  # type: ignore[attr-defined]



_PLANS: dict[Path, Plan] = {}  # per process: a worker reads a run's plan once


def _plan(path: Path) -> Plan:
    if path not in _PLANS:
        _PLANS.clear()  # another run's plan is done with
        _PLANS[path] = pickle.loads(path.read_bytes())
    return _PLANS[path]


def rows_shard(shard: Shard) -> ShardResult:
    """Successes out; the rows of pairable tasks spilled to their bucket (bucket-NNNNN/<shard>.parquet)."""
    plan, counts = _plan(shard.plan), dict.fromkeys(COUNTS, 0)
    sink = SortedJsonlSink(shard.folder, shard.buffer_rows, runs_dir=shard.folder)
    emit = _Emitter(sink, counts, plan.round_of)
    batch = read_rows(shard.classified, *shard.rows)
    if plan.params.include_successes:
        for r in batch.filter(pl.col("success").eq(True)).to_dicts():
            try:
                pair = sample_rows(trim_trailing(r["messages"]), r, 1.0, sample_meta(r, "success", plan.base))
            except ValueError:
                counts["success_unexportable"] += 1
            else:
                emit("sft.jsonl", pair[0])
                emit("sharegpt.jsonl", pair[1])
                counts["success_samples"] += 1
    if plan.bucket_of:
        numbered = batch.with_columns(
            pl.col("task_key").replace_strict(plan.bucket_of, default=None, return_dtype=pl.Int64).alias("_bucket"))
        for (bucket,), part in numbered.filter(pl.col("_bucket").is_not_null()).group_by("_bucket"):
            spill = shard.plan.parent / f"spill-{int(bucket):05d}" / f"{shard.folder.name}.parquet"
            spill.parent.mkdir(parents=True, exist_ok=True)
            with TableWriter(spill, schema.CLASSIFIED) as writer:
                writer.write(part.drop("_bucket"))
    return _finish(sink, counts, plan.tokens)


def bucket_shard(shard: Shard) -> ShardResult:
    """The preference pairs of one bucket's tasks (its rows, spilled by every rows shard)."""
    plan, counts = _plan(shard.plan), dict.fromkeys(COUNTS, 0)
    p = plan.params
    sink = SortedJsonlSink(shard.folder, shard.buffer_rows, runs_dir=shard.folder)
    emit = _Emitter(sink, counts, plan.round_of)
    parts = sorted((shard.plan.parent / f"spill-{shard.bucket:05d}").glob("*.parquet"))
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in sorted((r for part in parts for r in pl.read_parquet(part).to_dicts()), key=lambda r: r["id"]):
        by_task[r["task_key"]].append(r)
    for row in natural_pairs(by_task, p.max_pairs_per_task, plan.base, counts, p.dpo_pairs):
        emit("dpo.jsonl", row)
    kept_here = [k for task in sorted(by_task) for k in plan.kept_by_task.get(task, [])]
    for row in hindsight_pairs(kept_here, by_task, plan.base, counts, p.dpo_pairs):
        emit("dpo.jsonl", row)
    return _finish(sink, counts, plan.tokens, [r["id"] for r, _ in kept_here])


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


def export_samples(verified: pl.DataFrame, classified: Path, params: Package, lineage: dict, out: Path,
                   batch_rows: int = DEFAULT_BATCH_ROWS, tokenizer_model: str | None = None,
                   measure_tokens: bool = True, round_of: Mapping[str, int] | None = None,
                   spread: Spread = in_process) -> Exported:
    """The package stage's product: `package_into` over the classified table at `classified`,
    its rows written to the export files in `out` (sorted by sample id, bounded memory:
    SortedJsonlSink), then the token lengths of the files the exporters name as `measured` (TRL's),
    with the local model's tokenizer (`tokenizer_model`, else the first one installed).
    `round_of`, `spread`: package_into."""
    sink = SortedJsonlSink(out, batch_rows)
    rejections, counts, measured = package_into(sink, verified, Path(classified), params, lineage, batch_rows,
                                                round_of, spread, (measure_tokens, tokenizer_model))
    digests = sink.close(spread)
    lengths = (_lengths(measured, digests) or measure_lengths(Path(out), digests, tokenizer_model)) if measure_tokens \
        else {"tokenizer": None, "not_measured": "not asked"}
    return Exported(rejections, counts, digests, {name.removesuffix(".jsonl"): sink.rows[name] for name in ANNOTATED},
                    {name: sink.rows[name] for name in digests}, dict(sink.not_written), lengths)


def _lengths(measured: list[Lengths | None], written: dict) -> dict | None:
    """measure_lengths' result from the shards' lengths, when every shard measured its rows with the same
    tokenizer (the first that loads here: measure_lengths would use it too); else None."""
    todo = [name for e in exporters() for name in e.measured if name in written]
    if not todo or not measured or any(m is None or m.tokenizer is None for m in measured):
        return None  # nothing to measure (measure_lengths says so), or a shard could not: measure the files
    if len({(m.tokenizer, m.skipped) for m in measured}) != 1:  # type: ignore[union-attr]
        return None
    first = measured[0]
    files = {name: tokens.stats([n for m in measured for n in m.files.get(name, [])]) for name in todo}  # type: ignore[union-attr]
    return {"tokenizer": f"{first.tokenizer} (GGUF vocabulary and chat template)", "files": files} | (  # type: ignore[union-attr]
        {"skipped": list(first.skipped)} if first.skipped else {})  # type: ignore[union-attr]


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
