"""report.html at scale: the charts carry counts per bin, whatever the number of failures."""

from __future__ import annotations

import json
import re

import polars as pl

from agenther import schema
from agenther.export.report import render_report

STAGES = ("ingest", "classify", "extract", "relabel", "verify")


def test_a_run_with_more_failures_than_altair_embeds_gets_its_report(tmp_path):
    # altair refuses a chart of more than 5,000 rows (MaxRowsError): a 10k-record run used to fail
    # in package, after every other output was written
    n = 12_000
    classified = pl.DataFrame({"is_failure": [True] * n, "failure_type": ["incomplete"] * n,
                               "severity": [round(i / n, 4) for i in range(n)]})
    judgement = {"judge": "evidence", "model": "m", "accept": True, "confidence": 0.9, "reason": "ok"}
    verified = pl.DataFrame({"id": [f"r{i}" for i in range(n)],
                             "relabel_confidence": [0.5 + (i % 50) / 100 for i in range(n)],
                             "verified": [i % 3 == 0 for i in range(n)],
                             "judgements": [[judgement | {"accept": i % 3 == 0}] for i in range(n)]},
                            schema_overrides={"judgements": pl.List(schema.JUDGEMENT)})
    usage = {"calls": 1, "prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.0}
    summary = {"stages": {s: {"in": n} for s in STAGES} | {"classify": {"in": n, "failures": n}},
               "gates": {"exported_hindsight_samples": n // 3, "relabels_proposed": n, "passed_judges": n // 3},
               "llm": {s: usage for s in ("classify", "extract", "relabel", "verify", "total")},
               "reconciliation": {"ok": True}, "exports": {"rows": {"sft.jsonl": n // 3}}}
    page = render_report(summary, verified, schema.empty(schema.REJECTION), classified, tmp_path, tmp_path)

    specs = json.loads(re.search(r"const specs = (.*?);\nspecs.forEach", page, re.S).group(1).replace("<\\/", "</"))
    datasets = [rows for spec in specs for rows in spec.get("datasets", {}).values()]
    assert max(len(rows) for rows in datasets) <= 50  # bins and groups, not records
    severity = next(rows for rows in datasets if rows and "severity_end" in rows[0])
    assert sum(r["failures"] for r in severity) == n and len(severity) == 10
    assert all(abs(r["severity_end"] - r["severity"] - 0.1) < 1e-9 for r in severity)
    confidence = next(rows for rows in datasets if rows and "relabel_confidence_end" in rows[0])
    assert sum(r["relabels"] for r in confidence) == n
    assert {r["verdict"] for r in confidence} == {"accepted", "rejected"}
    verdicts = next(rows for rows in datasets if rows and set(rows[0]) == {"judge", "verdict", "relabels"})
    assert sorted((r["verdict"], r["relabels"]) for r in verdicts) == [("accept", n // 3), ("reject", n - n // 3)]
