"""Great Expectations gates: one suite per table at every hand-over between stages.

`tables.gate_table` runs `check` on each table it hands to the next stage (trajectories,
classified, extracted, relabeled, verified). A failing gate raises `GateFailed` before the
next stage starts, so nothing downstream is written, and the validation result is kept as
JSON (`<work>/gates/<table>.json`: pass/fail, each expectation with its kwargs and observed value).

What a suite checks (see `_suite`):
- contract: the exact column set (GX) and each column's polars dtype (checked here: GX on
  pandas cannot express list<struct> types, and pandas dtypes change with nulls);
- values: non-null unique ids, non-null required columns, allowed enum values, ranges
  ([0, 1] severity and confidences, confidence >= relabel.confidence_threshold), and that only
  recoverable failures get past classify. Each table checks the columns its stage wrote plus
  the carried ones later stages compute with (severity, failure_type, relabel_confidence);
- distributions, only with at least `gates.min_rows_for_distribution` rows (small runs have
  nothing to judge): mean relabel confidence, acceptance rate of verify, the share of each
  failure type among failures. They catch a collapsing model: all-zero confidence, 100%
  acceptance, every failure put in one class. The failure-type share is not applied to failures
  the rule classifier knew from a success flag or a reward alone (one type by construction:
  `adapted` says so); `gates.distributions: warn` (what `agenther inspect` uses) turns a failed
  distribution check into a warning (`warnings`) instead of a stop.

GX only validates scalars: nested list columns reach it as their lengths (so "a trajectory has
messages" is a range check), and list-of-struct columns that carry values worth checking
(achievements, judgements) are also exploded into a sub-table with its own small suite.
Plain functions, no Prefect: the CLI, `dvc repro` and the Prefect flow all pass through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import polars as pl

from agenther import schema
from agenther.adapters.registry import format_names, with_failure_signals
from agenther.params import Gates, Params

CONTRACTS: dict[str, dict[str, pl.DataType]] = {
    "trajectories": schema.TRAJECTORY,
    "classified": schema.CLASSIFIED,
    "extracted": schema.EXTRACTED,
    "relabeled": schema.RELABELED,
    "verified": schema.VERIFIED,
}
MODES = ("rule", "llm")
CONTRACT_COLUMNS = set().union(*CONTRACTS.values())
DTYPE_CHECK = "expect_column_polars_dtype_to_be"  # ours, recorded next to the GX results


class GateFailed(ValueError):
    """A table broke its gate. A ValueError so the CLI reports it like other input errors.

    The message's first line is a summary; then one line per failed expectation with its
    kwargs and observed value."""

    def __init__(self, result: dict):
        self.result = result
        failed = [e for e in result["expectations"] if not e["success"] and not e.get("warning_only")]
        where = f" ({result['source']})" if result.get("source") else ""
        saved = f"; results in {result['results_file']}" if result.get("results_file") else ""
        knobs = sorted({k for e in failed for k in re.findall(r"\b(?:gates|relabel|verify|classify)\.[a-z_]+", e.get("why") or "")})
        change = f"; to change the bound: {', '.join(knobs)} in params.yaml" if knobs else ""
        head = (f"gate {result['table']!r} failed{where}: {len(failed)} of {len(result['expectations'])} "
                f"expectations on {result['rows']} rows{change}{saved}")
        super().__init__("\n".join([head, *(f"  - {describe(e)}" for e in failed)]))


# --- the suites ---------------------------------------------------------------------------

class _Suite:
    """Expectations per batch ("main" = the table, else an exploded sub-table)."""

    def __init__(self) -> None:
        self.batches: dict[str, list[Any]] = {}
        self.adapted: list[str] = []  # bounds that cannot hold for this log, and why they were left out

    def add(self, batch: str, expectation: Any, why: str = "", distribution: bool = False) -> None:
        """`distribution`: a check of the table's distribution (not of its schema or of each row's
        values), which gates.distributions: warn turns into a warning."""
        batch_list = self.batches.setdefault(batch, [])
        # GX returns results in its own order: `order` puts them back in suite order.
        expectation.meta = ({"order": len(batch_list)} | ({"why": why} if why else {})
                            | ({"distribution": True} if distribution else {}))
        batch_list.append(expectation)


def _suite(df: pl.DataFrame, table: str, params: Params, ok: set[str]) -> _Suite:
    """The expectations for `table`: the contract and ids; the values of the columns the stage
    that wrote it produced; the few carried columns later stages compute with (severity,
    failure_type, relabel_confidence); distributions when the table is big enough.
    Column checks only for columns that exist with the right dtype (`ok`): a missing or
    mistyped column is reported once, by the contract checks. Each GX expectation costs
    ~5 ms (row conditions and column pairs ~20-35 ms), so the suites avoid repeating checks
    on columns that later stages only pass through."""
    gxe = _gx().expectations
    g = params.gates
    stage = list(CONTRACTS).index(table)  # 0 trajectories .. 4 verified
    min_rows = g.min_rows_for_distribution
    s = _Suite()

    def has(*cols: str) -> bool:
        return all(c in ok for c in cols)

    def not_null(*cols: str) -> None:
        for c in cols:
            if has(c):
                s.add("main", gxe.ExpectColumnValuesToNotBeNull(column=c))

    def in_set(col: str, values: list, why: str = "") -> None:
        if has(col):
            s.add("main", gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(values)), why)

    def between(col: str, low: float | None, high: float | None, why: str = "") -> None:
        if has(col):
            s.add("main", gxe.ExpectColumnValuesToBeBetween(column=col, min_value=low, max_value=high), why)

    s.add("main", gxe.ExpectTableColumnsToMatchSet(column_set=list(CONTRACTS[table]), exact_match=True),
          "the table's columns are the contract between stages (agenther/schema.py)")
    not_null("id")
    if has("id"):
        s.add("main", gxe.ExpectColumnValuesToBeUnique(column="id"), "one row per trajectory")

    if table == "trajectories":  # written by ingest (the adapters)
        not_null("source_format", "source_file", "record_pointer", "task_key", "goal", "messages", "metadata")
        in_set("source_format", list(format_names()))
        between("messages", 1, None, "a trajectory has at least one message (a list column: checked as its length)")
        return s

    # Carried from classify to every later table: package weights samples by severity.
    sev_low, sev_high = g.severity
    between("severity", sev_low, sev_high, "0 = near miss .. 1 = nothing done; gates.severity")
    in_set("failure_type", [*schema.FAILURE_TYPES, schema.NOT_A_FAILURE])
    if table == "classified":
        not_null("is_failure", "failure_type", "severity", "recoverable", "classify_mode")
        in_set("classify_mode", list(schema.CLASSIFY_MODES))
        if has("is_failure", "failure_type"):
            failures = df.filter(pl.col("is_failure") & pl.col("failure_type").is_not_null())
            if one_signal(failures) and failures.height >= min_rows and g.max_failure_type_share < 1.0:
                # The rule classifier of a log whose only failure signal is a success flag (or a
                # reward) puts nearly every failure in one type by construction, whatever else the
                # log holds: the bound says nothing about the classifier there.
                s.adapted.append(f"gates.max_failure_type_share ({g.max_failure_type_share}) not applied: the "
                                 f"{failures.height} failures were classified by rule from logs whose only failure "
                                 "signal is a success flag or a reward (no ground truth, no finish type), so one type "
                                 "is most of them by construction")
            elif failures.height >= min_rows and g.max_failure_type_share < 1.0:
                # GX has no "share of each value" expectation (row conditions on the main batch
                # cost ~20 ms each): the shares are a small sub-table, GX checks its values.
                s.add("failure_type_shares", gxe.ExpectColumnValuesToBeBetween(
                    column="share", min_value=0.0, max_value=g.max_failure_type_share),
                    "share of one failure type among failures; one class for (nearly) every failure means a "
                    "collapsed classifier; gates.max_failure_type_share", distribution=True)
        return s

    # extracted and later: only recoverable failures get this far
    in_set("is_failure", [True], "only failures are carried past classify")
    in_set("recoverable", [True], "only recoverable failures are carried past classify")
    if table == "extracted":
        not_null("achievements", "extract_mode", "achieved_goal")
        in_set("extract_mode", list(MODES))
        between("achievements", 1, None, "extract keeps a failure only with an evidenced achievement")
        if has("achievements"):
            s.add("achievements", gxe.ExpectColumnValuesToNotBeNull(column="text"))
            s.add("achievements", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(schema.ACHIEVEMENT_KINDS)))
            s.add("achievements", gxe.ExpectColumnValuesToBeBetween(column="steps", min_value=1),
                  "every achievement points at the step(s) it came from")
        return s

    # relabeled and verified: the confidence a sample passed the confidence gate with
    c_low, c_high = g.relabel_confidence
    between("relabel_confidence", c_low, c_high, "a confidence is a probability; gates.relabel_confidence")
    if table == "relabeled":
        r = params.relabel
        not_null("hindsight_prompt", "relabel_confidence", "relabel_attempts", "relabel_model")
        between("relabel_confidence", r.confidence_threshold, None,
                "only relabels at or above relabel.confidence_threshold pass the confidence gate")
        between("relabel_attempts", 0, r.max_attempts,
                "0 (a conversation that already asked for its goal: no LLM call) .. relabel.max_attempts")
        # The relabeler's confidence distribution: over the rows an LLM wrote (rule-kept ones say 1.0).
        written = {"row_condition": _gx().expectations.row_conditions.Column("relabel_attempts") > 0}
        if has("relabel_attempts") and df.filter(pl.col("relabel_attempts") > 0).height >= min_rows:
            low, high = g.relabel_confidence_mean
            s.add("main", gxe.ExpectColumnMeanToBeBetween(column="relabel_confidence", min_value=low, max_value=high,
                                                          **written),
                  "mean confidence near 0 or 1 means a collapsed relabeler (all 0 / all 1); "
                  "gates.relabel_confidence_mean", distribution=True)
            if g.relabel_confidence_min_stdev > 0:
                s.add("main", gxe.ExpectColumnStdevToBeBetween(
                    column="relabel_confidence", min_value=g.relabel_confidence_min_stdev, **written),
                    "one confidence for every relabel; gates.relabel_confidence_min_stdev", distribution=True)
        return s

    assert stage == 4  # verified
    not_null("verified", "judgements")
    between("judgements", 1, None, "every row was judged at least once (a list column: checked as its length)")
    if df.height >= min_rows and has("verified"):
        low, high = g.acceptance_rate
        s.add("main", gxe.ExpectColumnMeanToBeBetween(column="verified", min_value=low, max_value=high),
              "share of relabels the judges accepted; (nearly) 100% means the judges rubber-stamp; "
              "gates.acceptance_rate", distribution=True)
    if has("judgements"):
        j_low, j_high = g.judge_confidence
        s.add("judgements", gxe.ExpectColumnValuesToBeInSet(column="judge", value_set=list(params.verify.judges)),
              "judges named in verify.judges")
        s.add("judgements", gxe.ExpectColumnValuesToNotBeNull(column="accept"))
        s.add("judgements", gxe.ExpectColumnValuesToNotBeNull(column="confidence"))
        s.add("judgements", gxe.ExpectColumnValuesToBeBetween(column="confidence", min_value=j_low, max_value=j_high),
              "a judge's confidence is a probability; gates.judge_confidence")
    return s


def one_signal(failures: pl.DataFrame) -> bool:
    """Were these failures all classified by the rule classifier from logs whose only failure
    signal is a success flag or a reward (a format without ground truth or a finish type)?"""
    if not failures.height or not {"classify_mode", "source_format"} <= set(failures.columns):
        return False
    return bool((failures["classify_mode"] == "rule").all()
                and not failures["source_format"].is_in(list(with_failure_signals())).any())


def _warning_only(entry: dict, g: Gates) -> bool:
    """A failed distribution check under gates.distributions: warn does not stop the run."""
    return bool(entry.get("distribution")) and g.distributions == "warn"


# --- running it ---------------------------------------------------------------------------

_LOCK = threading.Lock()  # one GX context per process; Prefect may call from threads
_STATE: dict[str, Any] = {}


class _GX:
    """Lazily imported GX (~3 s import) and one ephemeral context with its cached suites."""

    def __init__(self) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gx, self.expectations = gx, gxe
        # No Data Docs site (results are kept as JSON): no temp folder, no INFO line about it.
        config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("agenther")
        self.batch = self.source.add_dataframe_asset("table").add_batch_definition_whole_dataframe("whole")
        self.definitions: dict[str, Any] = {}

    def definition(self, expectations: list[Any]) -> Any:
        """A ValidationDefinition per distinct suite (suites vary with params and row counts)."""
        configs = [e.configuration.to_json_dict() for e in expectations]
        key = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if key not in self.definitions:
            suite = self.context.suites.add(self.gx.ExpectationSuite(name=key, expectations=expectations))
            self.definitions[key] = self.context.validation_definitions.add(
                self.gx.ValidationDefinition(name=key, data=self.batch, suite=suite))
        return self.definitions[key]


def _gx() -> _GX:
    if "gx" not in _STATE:
        _STATE["gx"] = _GX()
    return _STATE["gx"]


# Text columns whose values a suite checks (uniqueness, allowed sets); any other text column
# is only checked for nulls, so the gate sees its length: the tools schemas, metadata and
# goals of 100k trajectories would otherwise cost GB in pandas.
VALUE_COLUMNS = {"id", "source_format", "failure_type", "classify_mode", "extract_mode"}


def _scalar_frame(lf: pl.LazyFrame, columns: pl.Schema, ok: set[str]) -> pl.DataFrame:
    """GX handles scalars: a list column becomes its length, so does a text column whose values
    no expectation reads (VALUE_COLUMNS); a mistyped one only keeps its name. Collected with
    the streaming engine from a lazy scan: only these small columns are ever in memory."""
    cols = []
    for name, dtype in columns.items():
        if isinstance(dtype, pl.List) and name in ok:
            cols.append(pl.col(name).list.len().cast(pl.Int64))
        elif dtype == pl.String and name in ok and name not in VALUE_COLUMNS:
            cols.append(pl.col(name).str.len_bytes().cast(pl.Int64))
        elif dtype.is_nested() or (name in CONTRACT_COLUMNS and name not in ok):
            cols.append(pl.lit(None, dtype=pl.Int64).alias(name))
        else:
            cols.append(pl.col(name))
    return lf.select(cols).collect(engine="streaming")



def _sub_table(lf: pl.LazyFrame, scalars: pl.DataFrame, batch: str, ok: set[str]) -> tuple[pl.DataFrame, list[str]]:
    """The frame for a sub-batch and the column(s) that name its rows in messages."""
    if batch == "failure_type_shares":
        failures = scalars.filter(pl.col("is_failure") & pl.col("failure_type").is_not_null())
        shares = (failures.group_by("failure_type").agg(pl.len().cast(pl.Int64).alias("failures"))
                  .with_columns((pl.col("failures") / failures.height).alias("share")).sort("failure_type"))
        return shares, ["failure_type"]
    # achievements, judgements: one row per list element, with its row's id; list fields as lengths
    index = ["id"] if "id" in ok else []  # a missing id is reported by the main batch
    exploded = lf.select(*index, batch).explode(batch).drop_nulls(batch).unnest(batch).collect(engine="streaming")
    return exploded.with_columns(pl.col(c).list.len().cast(pl.Int64)
                                 for c, t in exploded.schema.items() if isinstance(t, pl.List)), index


def _dtype_checks(columns: pl.Schema, table: str) -> tuple[list[dict], set[str]]:
    entries, ok = [], set()
    for name, dtype in CONTRACTS[table].items():
        if name not in columns:
            continue  # reported by expect_table_columns_to_match_set
        observed = columns[name]
        entries.append({"batch": table, "type": DTYPE_CHECK, "kwargs": {"column": name, "dtype": str(dtype)},
                        "success": observed == dtype, "observed": {"observed_value": str(observed)},
                        "why": "the contract dtype (agenther/schema.py)"})
        if observed == dtype:
            ok.add(name)
    return entries, ok


_KEEP = ("observed_value", "details", "element_count", "unexpected_count", "unexpected_percent",
         "partial_unexpected_list", "partial_unexpected_index_list")


def _run(gx: _GX, batch: str, expectations: list[Any], frame: pl.DataFrame, index: list[str]) -> list[dict]:
    if not expectations:
        return []
    result = gx.definition(expectations).run(
        batch_parameters={"dataframe": frame.to_pandas()},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5,
                       "unexpected_index_column_names": index})
    raw = json.loads(json.dumps(result.to_json_dict(), default=_plain))["results"]
    entries = []
    for r in raw:
        cfg = r["expectation_config"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        entry = {"batch": batch, "type": cfg["type"], "kwargs": kwargs, "success": bool(r["success"]),
                 "observed": {k: r["result"][k] for k in _KEEP if k in r["result"]}}
        meta = cfg.get("meta") or {}
        if meta.get("why"):
            entry["why"] = meta["why"]
        if meta.get("distribution"):
            entry["distribution"] = True
        if (r.get("exception_info") or {}).get("raised_exception"):
            entry["success"] = False
            entry["exception"] = r["exception_info"]["exception_message"]
        entries.append((meta.get("order", len(raw)), entry))
    return [e for _, e in sorted(entries, key=lambda p: p[0])]


def _plain(value: Any) -> Any:
    """numpy scalars and anything else GX leaves in its results, as JSON."""
    return value.item() if hasattr(value, "item") else str(value)


def check(df: pl.DataFrame | pl.LazyFrame, table: str, params: Params, results_dir: Path | None,
          source: str | None = None) -> dict:
    """Validate `df` as `table`; write `results_dir/<table>.json`; raise GateFailed on failure (not for
    a distribution check under gates.distributions: warn: it goes to the result's `warnings`).
    `df` may be lazy (`pl.scan_parquet`): then only its scalar projection is ever collected.
    Returns the result: {table, success, rows, expectations: [{batch, type, kwargs, success, observed, why}]}."""
    if table not in CONTRACTS:
        raise ValueError(f"no gate for table {table!r}; gated tables: {', '.join(CONTRACTS)}")
    g = params.gates
    lf = df.lazy()
    columns = lf.collect_schema()
    with _LOCK:
        gx = _gx()
        entries, ok = _dtype_checks(columns, table)
        scalars = _scalar_frame(lf, columns, ok)
        suite = _suite(scalars, table, params, ok)
        entries += _run(gx, table, suite.batches.get("main", []), scalars, ["id"] if "id" in ok else [])
        for batch, expectations in suite.batches.items():
            if batch != "main":
                sub, index = _sub_table(lf, scalars, batch, ok)
                if sub.height:  # row checks on no rows pass: skip the ~20 ms
                    entries += _run(gx, f"{table}.{batch}", expectations, sub, index)
    for e in entries:
        if not e["success"] and _warning_only(e, g):
            e["warning_only"] = True  # reported in `warnings`, does not stop the run
    result = {
        "table": table,
        "source": source,
        "success": all(e["success"] or e.get("warning_only") for e in entries),
        "warnings": [f"gate {table!r}: {describe(e)}" for e in entries if e.get("warning_only")],
        "rows": scalars.height,
        "distribution_checks": scalars.height >= g.min_rows_for_distribution,
        "statistics": {"evaluated": len(entries), "failed": sum(not e["success"] for e in entries)},
        "note": "list columns are validated as their lengths; batches '<table>.achievements' and "
                "'<table>.judgements' are the exploded list elements, '<table>.failure_type_shares' the share "
                "of each failure type among failures",
        "expectations": entries,
        "adapted": suite.adapted,
    }
    if results_dir is not None:
        path = Path(results_dir) / f"{table}.json"
        result["results_file"] = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=_plain) + "\n")
        tmp.replace(path)
    if not result["success"]:
        raise GateFailed(result)
    return result


def gate_notes(results_dir: Path) -> dict[str, list[str]]:
    """What the kept gate results (`<work>/gates/*.json`) say besides pass/fail: `adapted` (bounds
    this log's kind of signal cannot meet, left out) and `warnings` (distribution checks that
    failed under gates.distributions: warn)."""
    notes: dict[str, list[str]] = {"adapted": [], "warnings": []}
    for f in sorted(Path(results_dir).glob("*.json")):
        result = json.loads(f.read_text())
        for key, found in notes.items():
            found += result.get(key) or []
    return notes


# --- messages -----------------------------------------------------------------------------

def describe(entry: dict) -> str:
    """One line: the expectation with its kwargs, then what was observed."""
    shown = ", ".join(f"{k}={v!r}" for k, v in entry["kwargs"].items() if k != "column_set")
    batch = f"[{entry['batch']}] " if "." in entry["batch"] else ""  # a sub-table
    text = f"{batch}{entry['type']}({shown})"
    return f"{text}: {_observed(entry)}" + (f" ({entry['why']})" if entry.get("why") else "")


def _observed(entry: dict) -> str:
    if entry.get("exception"):
        return f"error: {entry['exception']}"
    o = entry["observed"]
    mismatch = (o.get("details") or {}).get("mismatched") if isinstance(o.get("details"), dict) else None
    if mismatch:
        return "; ".join(f"{k} columns {v}" for k, v in mismatch.items() if v)
    if "unexpected_count" in o:
        text = (f"{o['unexpected_count']} of {o.get('element_count')} values unexpected "
                f"({(o.get('unexpected_percent') or 0):.1f}%)")
        index = o.get("partial_unexpected_index_list") or []
        column = entry["kwargs"].get("column")
        if index and column:  # the value and the row it came from
            examples = [f"{row.get(column)!r} (" + ", ".join(f"{k} {v}" for k, v in row.items() if k != column) + ")"
                        for row in index[:3]]
        else:
            examples = [repr(v) for v in (o.get("partial_unexpected_list") or [])[:3]]
        return text + (", e.g. " + ", ".join(examples) if examples else "")
    return f"observed {o.get('observed_value')!r}"
