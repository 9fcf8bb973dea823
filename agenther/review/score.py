"""`agenther review score RUN_DIR LABELS...`: what people's labels say about a run's judges.

- precision of the accepted relabels (labeled correct / labeled correct or incorrect; unsure is
  left out), with a 95% Wilson interval, overall and per failure type;
- each judge against the people: precision and recall of its "accept" for "correct", and Cohen's kappa;
- with several label files, agreement between annotators (pairwise Cohen's kappa over the items
  both labeled), and the items' label is the majority of the non-unsure labels (a tie is unsure).
The result goes to RUN_DIR/review/score.json, into RUN_DIR/summary.json (`review`), which the
package stage carries over when it runs again, and into RUN_DIR/report.html.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

from agenther.workdir import write_text_atomic

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (None for n = 0)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None with no items; 1.0 when both
    used one and the same category throughout, where chance agreement is already 1)."""
    if not a or len(a) != len(b):
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def _proportion(successes: int, n: int) -> dict:
    interval = wilson(successes, n)
    return {"n": n, "correct": successes, "precision": round(successes / n, 4) if n else None,
            "wilson95": [round(x, 4) for x in interval] if interval else None}


def consensus(annotations: list[dict[str, str]]) -> dict[str, str]:
    """Per item, the majority of the annotators' correct/incorrect labels; unsure on a tie or none."""
    votes: dict[str, Counter] = {}
    for labels in annotations:
        for item_id, label in labels.items():
            votes.setdefault(item_id, Counter())
            if label in ("correct", "incorrect"):
                votes[item_id][label] += 1
    out = {}
    for item_id, count in votes.items():
        top = count.most_common()
        out[item_id] = "unsure" if not top or (len(top) > 1 and top[0][1] == top[1][1]) else top[0][0]
    return out


def score(items: list[dict], annotations: list[dict[str, str]]) -> dict:
    """`annotations`: per annotator, item id -> correct | incorrect | unsure."""
    label = consensus(annotations)
    decided = [it for it in items if label.get(it["id"]) in ("correct", "incorrect")]
    accepted = [it for it in decided if it["status"] == "accepted"]
    by_type: dict[str, list[dict]] = {}
    for it in accepted:
        by_type.setdefault(it["failure_type"], []).append(it)

    def correct(group: list[dict]) -> int:
        return sum(label[it["id"]] == "correct" for it in group)

    judges = {}
    for judge in sorted({j for it in items for j in it["judges"]}):
        pairs = [(it["judges"][judge], label[it["id"]] == "correct") for it in decided
                 if it["judges"].get(judge) is not None]
        judged_accept = [a for a, _ in pairs]
        human_correct = [h for _, h in pairs]
        both = sum(a and h for a, h in pairs)
        judges[judge] = {"n": len(pairs),
                         "precision": round(both / sum(judged_accept), 4) if any(judged_accept) else None,
                         "recall": round(both / sum(human_correct), 4) if any(human_correct) else None,
                         "kappa": _round(cohen_kappa(judged_accept, human_correct))}
    annotators = []
    for (i, a), (j, b) in combinations(enumerate(annotations), 2):
        both = sorted(a.keys() & b.keys())
        annotators.append({"annotators": [i, j], "n": len(both),
                           "kappa": _round(cohen_kappa([a[k] for k in both], [b[k] for k in both]))})
    return {
        "items": len(items), "labeled": sum(it["id"] in label for it in items), "decided": len(decided),
        "accepted_precision": _proportion(correct(accepted), len(accepted)),
        "accepted_precision_by_failure_type": {t: _proportion(correct(g), len(g)) for t, g in sorted(by_type.items())},
        "judges": judges,
        "annotator_agreement": annotators,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def read_labels(path: Path) -> dict[str, str]:
    """A label file the review page downloaded: item id -> label."""
    try:
        body = json.loads(Path(path).read_text())
        labels = {item_id: entry["label"] for item_id, entry in body["labels"].items() if entry.get("label")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a label file from the review page ({exc})") from exc
    unknown = sorted(set(labels.values()) - {"correct", "incorrect", "unsure"})
    if unknown:
        raise ValueError(f"{path}: unknown labels {unknown}")
    return labels


def score_run(run_dir: Path, label_files: list[Path]) -> dict:
    run_dir = Path(run_dir)
    items = json.loads((run_dir / "review" / "items.json").read_text())["items"]
    result = score(items, [read_labels(p) for p in label_files]) | {"label_files": [str(p) for p in label_files]}
    write_text_atomic(run_dir / "review" / "score.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text()) | {"review": result}
        write_text_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if (run_dir / "report.html").exists():
            from agenther.export.report import refresh_report

            refresh_report(run_dir)
    return result
