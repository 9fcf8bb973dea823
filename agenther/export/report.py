"""report.html: a run at a glance, for a person. One self-contained file that opens offline: the
charts are Vega-Lite specs made with altair and drawn by the vega-embed bundle inlined from
vl-convert (no network), the tables plain HTML.

What it shows: the stage funnel and every rejection reason, failure types and severity, relabel
confidence of the judged relabels (accepted vs rejected), each judge's verdicts and how often two
judges agree, LLM tokens, cost and time per stage, export sizes (and token lengths when the summary
has them), and links to the Great Expectations results of the gates.
"""

from __future__ import annotations

import html
import json
import os
from itertools import combinations
from pathlib import Path

import polars as pl

from agenther.stages import LLM_STAGES, NAMES, STAGES
from agenther.workdir import STATS, read_stats


def _charts(summary: dict, verified: pl.DataFrame, rejected: pl.DataFrame, classified: pl.DataFrame,
            seconds: dict[str, float]) -> list[tuple[str, dict]]:
    import altair as alt

    stages = summary["stages"]
    charts = []
    funnel = pl.DataFrame([{"stage": s, "records": stages[s]["in"]} for s in NAMES[:-1]]
                          + [{"stage": "accepted", "records": summary["gates"]["exported_hindsight_samples"]}])
    charts.append(("Stage funnel: records in", alt.Chart(funnel).mark_bar().encode(
        x=alt.X("stage:N", sort=None), y="records:Q", tooltip=["stage", "records"])))
    if rejected.height:
        # sorted: group_by's order is arbitrary, and the report's bytes would change from run to run
        reasons = rejected.group_by("stage", "reason").len("records").sort("stage", "reason")
        charts.append(("Rejections by stage and reason", alt.Chart(reasons).mark_bar().encode(
            # the stages that reject, in order; package's (duplicates, unexportable) are in rejected.parquet too
            y=alt.Y("stage:N", sort=[*(s for s in NAMES if STAGES[s].rejects), "package"]), x="records:Q",
            color="reason:N",
            tooltip=["stage", "reason", "records"])))
    failures = classified.filter(pl.col("is_failure"))
    if failures.height:
        charts.append(("Failure types", alt.Chart(failures.group_by("failure_type").len("failures").sort("failure_type")).mark_bar().encode(
            x="failures:Q", y=alt.Y("failure_type:N", sort="-x"), tooltip=["failure_type", "failures"])))
        charts.append(("Severity of the failures", alt.Chart(_binned(failures, "severity", 0.1, "failures")).mark_bar().encode(
            x=alt.X("severity:Q", bin="binned"), x2="severity_end:Q", y="failures:Q")))
    if verified.height:
        judged = verified.select("relabel_confidence", pl.when(pl.col("verified")).then(pl.lit("accepted"))
                                 .otherwise(pl.lit("rejected")).alias("verdict"))
        charts.append(("Relabel confidence: accepted vs rejected by the judges", alt.Chart(
            _binned(judged, "relabel_confidence", 0.05, "relabels", by="verdict")).mark_bar(opacity=0.7).encode(
                x=alt.X("relabel_confidence:Q", bin="binned"), x2="relabel_confidence_end:Q", y="relabels:Q",
                color="verdict:N")))
        verdicts = _verdicts(verified)
        charts.append(("Each judge's verdicts", alt.Chart(verdicts.group_by("judge", "verdict").len("relabels").sort("judge", "verdict"))
                       .mark_bar().encode(x="relabels:Q", y="judge:N", color=alt.Color("verdict:N", scale=alt.Scale(
                           domain=["accept", "reject"], range=["#4a4", "#c44"])))))
        agreement = _agreement(verdicts)
        if agreement.height:
            charts.append(("Agreement between judges (share of relabels both judged)", alt.Chart(agreement).mark_rect()
                           .encode(x="judge_a:N", y="judge_b:N", color=alt.Color("agreement:Q", scale=alt.Scale(
                               domain=[0, 1])), tooltip=["judge_a", "judge_b", "agreement", "both_judged"])))
    llm = pl.DataFrame([{"stage": s, "prompt_tokens": summary["llm"][s]["prompt_tokens"],
                         "completion_tokens": summary["llm"][s]["completion_tokens"],
                         "cost_usd": summary["llm"][s]["cost_usd"], "seconds": seconds.get(s)}
                        for s in LLM_STAGES if s in summary["llm"]])
    tokens = llm.unpivot(["prompt_tokens", "completion_tokens"], index="stage", variable_name="kind", value_name="tokens")
    charts.append(("LLM tokens per stage", alt.Chart(tokens).mark_bar().encode(
        x=alt.X("stage:N", sort=list(LLM_STAGES)), y="tokens:Q", color="kind:N", tooltip=["stage", "kind", "tokens"])))
    timing = pl.DataFrame([{"stage": s, "seconds": t} for s, t in seconds.items()])
    if timing.height:
        charts.append(("Time per stage (s)", alt.Chart(timing).mark_bar().encode(
            x=alt.X("stage:N", sort=None), y="seconds:Q", tooltip=["stage", "seconds"])))
    written = (summary["exports"].get("rows") or {}).items()
    exports = pl.DataFrame([{"file": f, "rows": n} for f, n in written], schema={"file": pl.String, "rows": pl.Int64})
    if exports.height:
        charts.append(("Export rows", alt.Chart(exports).mark_bar().encode(x="rows:Q", y=alt.Y("file:N", sort=None))))
    lengths = (summary["exports"].get("token_lengths") or {}).get("files") or {}
    rows = [{"file": f, "percentile": p, "tokens": v} for f, ps in lengths.items() if isinstance(ps, dict)
            for p, v in ps.items() if p.startswith("p") or p == "max"]
    if rows:
        charts.append(("Token lengths per export (percentiles)", alt.Chart(pl.DataFrame(rows)).mark_point(size=80)
                       .encode(x="tokens:Q", y="file:N", color=alt.Color("percentile:N", sort=None))))
    return [(title, chart.properties(width=560).to_dict()) for title, chart in charts]


def _binned(df: pl.DataFrame, column: str, step: float, count: str, by: str | None = None) -> pl.DataFrame:
    """Rows (`count`) per bin of `column` (`step` wide; `column` and `<column>_end` are its bounds), counted
    here: a chart embeds one row per bin, not per record (altair refuses data over 5,000 rows, and
    a report of a million failures would carry them all)."""
    per = round(1 / step)  # bins as integers: 0.3 / 0.1 is 2.999..., its floor the wrong bin
    index = (pl.col(column) * per + 1e-9).floor()
    keys = [by] if by else []
    counted = (df.filter(pl.col(column).is_not_null()).group_by(index.alias("bin"), *keys)
               .len(count).sort("bin", *keys))
    return counted.with_columns((pl.col("bin") / per).alias(column),
                                ((pl.col("bin") + 1) / per).alias(f"{column}_end")).drop("bin")


def _verdicts(verified: pl.DataFrame) -> pl.DataFrame:
    rows = [{"id": r["id"], "judge": j["judge"], "verdict": "accept" if j["accept"] else "reject"}
            for r in verified.select("id", "judgements").to_dicts() for j in r["judgements"] or []]
    return pl.DataFrame(rows, schema={"id": pl.String, "judge": pl.String, "verdict": pl.String})


def _agreement(verdicts: pl.DataFrame) -> pl.DataFrame:
    by_judge: dict[str, dict[str, str]] = {}
    for row in verdicts.to_dicts():
        by_judge.setdefault(row["judge"], {})[row["id"]] = row["verdict"]
    rows = []
    for a, b in combinations(sorted(by_judge), 2):
        both = by_judge[a].keys() & by_judge[b].keys()
        if both:
            agree = sum(by_judge[a][i] == by_judge[b][i] for i in both) / len(both)
            rows.append({"judge_a": a, "judge_b": b, "agreement": round(agree, 3), "both_judged": len(both)})
    return pl.DataFrame(rows, schema={"judge_a": pl.String, "judge_b": pl.String, "agreement": pl.Float64,
                                      "both_judged": pl.Int64})


def _table(rows: list[tuple]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{body}</table>"


def render_report(summary: dict, verified: pl.DataFrame, rejected: pl.DataFrame, classified: pl.DataFrame,
                  work: Path, out: Path) -> str:
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    seconds = {}
    for stage in STATS:
        try:
            if "seconds" in (stats := read_stats(work, stage)):
                seconds[stage] = stats["seconds"]
        except (OSError, ValueError):
            continue
    charts = _charts(summary, verified, rejected, classified, seconds)
    gates = sorted((Path(work) / "gates").glob("*.json"))
    links = "".join(f'<li><a href="{html.escape(Path(os.path.relpath(g, out)).as_posix())}">{html.escape(g.stem)}</a></li>'
                    for g in gates)
    g = summary["gates"]
    headline = _table([("records in", summary["stages"]["ingest"]["in"]),
                       ("failures", summary["stages"]["classify"]["failures"]),
                       ("relabels proposed", g["relabels_proposed"]), ("passed every judge", g["passed_judges"]),
                       ("hindsight samples exported", g["exported_hindsight_samples"]),
                       ("LLM calls", summary["llm"]["total"]["calls"]),
                       ("LLM tokens", summary["llm"]["total"]["prompt_tokens"] + summary["llm"]["total"]["completion_tokens"]),
                       ("LLM cost (USD; local models cost 0)", summary["llm"]["total"]["cost_usd"]),
                       ("counts reconcile", "yes" if summary["reconciliation"]["ok"] else "NO")])
    review = summary.get("review")
    if review:  # `agenther review score`: what people said of the accepted relabels
        precision = review["accepted_precision"]
        interval = precision["wilson95"] or ["-", "-"]
        headline += "<h2>Human review</h2>" + _table(
            [("accepted relabels labeled", precision["n"]), ("precision", precision["precision"]),
             ("95% Wilson interval", f"{interval[0]} .. {interval[1]}")]
            + [(f"judge {j}: precision / recall / kappa", f"{v['precision']} / {v['recall']} / {v['kappa']}")
               for j, v in review["judges"].items()])
    divs = "".join(f'<h2>{html.escape(title)}</h2><div class="chart" id="chart{i}"></div>'
                   for i, (title, _) in enumerate(charts))
    specs = json.dumps([spec for _, spec in charts]).replace("</", "<\\/")
    # the Vega-Lite version altair writes its specs for, as vl-convert names it
    script = vl_convert.javascript_bundle(vl_version=vl_version_for_vl_convert()).replace("</script", "<\\/script")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agenther run report</title>
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:64rem;margin:1.5rem auto;padding:0 1rem}}
td{{padding:.15rem .8rem;border-bottom:1px solid #ddd}}h2{{font-size:1.05rem;margin-top:1.6rem}}</style>
<script>{script}</script></head><body>
<h1>agenther run report</h1>{headline}{divs}
<h2>Great Expectations results of the gates</h2><ul>{links or "<li>no gate ran</li>"}</ul>
<script>const specs = {specs};
specs.forEach((spec, i) => vegaEmbed("#chart" + i, spec, {{actions: false, renderer: "svg"}})
  .then(() => document.getElementById("chart" + i).dataset.drawn = "yes").catch(e => console.error(e)));</script>
</body></html>
"""


def refresh_report(run_dir: Path) -> None:
    """Draw RUN_DIR/report.html again from the files the run left (after `agenther review score`)."""
    from agenther.workdir import TABLES

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    classified = pl.read_parquet(run_dir / TABLES["classified"], columns=["is_failure", "failure_type", "severity"])
    html_text = render_report(summary, pl.read_parquet(run_dir / TABLES["verified"]),
                              pl.read_parquet(run_dir / "rejected.parquet"), classified, run_dir, run_dir)
    (run_dir / "report.html").write_text(html_text)
