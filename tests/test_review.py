"""What a person looks at, in a real headless browser (Debian's chromium through playwright): the run
report (every chart drawn, nothing fetched from the network), and the review loop: a stratified sample of a real run's judged relabels, the review page driven in
a real headless browser (Debian's chromium through playwright: label, note, reload, download), and
`agenther review score` on the downloaded labels; Wilson and kappa against hand-computed values.
The screenshots in docs/ are taken here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TAU, write_params
from test_fused import mixed_brain

from agenther.cli import main
from agenther.review.sample import allocate
from agenther.review.score import cohen_kappa, consensus, wilson


def test_wilson_interval_against_hand_computed_values():
    low, high = wilson(8, 10)  # p = .8, z = 1.96: centre .71674, half-width .22658
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson(0, 5)[0] == 0.0 and round(wilson(0, 5)[1], 4) == 0.4345
    assert wilson(0, 0) is None


def test_cohen_kappa_against_hand_computed_values():
    a = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    b = [1, 0, 0, 0, 1, 1, 1, 1, 0, 1]  # agree 8/10; chance .6*.6 + .4*.4 = .52
    assert round(cohen_kappa(a, b), 5) == round((0.8 - 0.52) / 0.48, 5) == 0.58333
    assert cohen_kappa(a, [1 - x for x in a]) < 0 and cohen_kappa([], []) is None


def test_allocation_is_proportional_with_one_item_per_stratum_at_least():
    assert allocate({"a": 90, "b": 9, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    assert allocate({"a": 3, "b": 2}, 10) == {"a": 3, "b": 2}
    assert consensus([{"x": "correct", "y": "incorrect"}, {"x": "correct", "y": "correct"}]) == {
        "x": "correct", "y": "unsure"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run over 60 tau-bench records: some relabels accepted, some rejected by a judge."""
    from llm_server import FakeLLMServer

    tmp = tmp_path_factory.mktemp("review")
    with FakeLLMServer(mixed_brain) as server:
        params = write_params(tmp / "params.yaml", server, llm={"concurrency": 4})
        out = tmp / "run"
        assert main(["run", "--input", str(TAU), "--out", str(out), "--limit", "60", "--params", str(params)]) == 0
    return out


@pytest.mark.slow
def test_sample_is_stratified_and_the_page_hides_the_judges(run_dir):
    assert main(["review", "sample", str(run_dir), "--size", "8", "--seed", "3"]) == 0
    items = json.loads((run_dir / "review" / "items.json").read_text())["items"]
    statuses = {it["status"] for it in items}
    assert statuses == {"accepted", "rejected"} and len(items) <= 8
    assert any(it["stratum"].startswith("rejected / trajectory") for it in items)
    assert all(it["achievements"] and it["achievements"][0]["evidence"] for it in items)
    page = (run_dir / "review" / "review.html").read_text()
    assert "satisfied=" not in page  # no judge's verdict to lean on
    assert "<script src" not in page and "<link" not in page and "@import" not in page  # opens offline
    tasks = json.loads((run_dir / "review" / "label_studio.json").read_text())
    assert [t["data"]["id"] for t in tasks] == [it["id"] for it in items]
    again = run_dir / "again"
    shutil.copytree(run_dir / "review", again)
    assert main(["review", "sample", str(run_dir), "--size", "8", "--seed", "3"]) == 0
    assert (run_dir / "review" / "items.json").read_bytes() == (again / "items.json").read_bytes()


@pytest.mark.slow
def test_label_in_a_real_browser_download_and_score(run_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    assert main(["review", "sample", str(run_dir), "--size", "8", "--seed", "3"]) == 0
    items = json.loads((run_dir / "review" / "items.json").read_text())["items"]
    # the labels a person gives: every accepted item correct but the first; rejected ones incorrect
    accepted = [it["id"] for it in items if it["status"] == "accepted"]
    wanted = {it["id"]: ("correct" if it["status"] == "accepted" else "incorrect") for it in items}
    wanted[accepted[0]] = "incorrect"
    url = (run_dir / "review" / "review.html").resolve().as_uri()
    with sync_playwright() as pw:
        browser, page = open_page(pw, url)
        page.fill("#annotator", "ada")
        for item_id, label in wanted.items():
            box = page.locator(f'.item[data-id="{item_id}"]')
            box.locator("textarea").fill(f"seen {label}")
            box.locator(f'button[data-label="{label}"]').click()
        assert page.text_content("#progress") == f"{len(items)} of {len(items)} labeled"
        # every turn of each sample is shown as the trainer sees it: role and weight, and for a
        # rewritten user turn what the user originally said
        for it in items:
            box = page.locator(f'.item[data-id="{it["id"]}"]')
            assert box.locator(".turn").count() == len(it["turns"]) > 1
            assert box.locator(".turn .was").count() == sum(t["before"] is not None for t in it["turns"])
        shown = page.locator(".turn").all_text_contents()
        assert any("ASSISTANT (weight 1)" in t for t in shown) and any(t.startswith("[") for t in shown)
        page.reload()  # labels persist in the browser
        assert page.locator(".item.done").count() == len(items)
        assert page.locator("button.on").count() == len(items)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ROOT / "docs" / "review.png"))  # the page as a reviewer sees it
        with page.expect_download() as download:
            page.click("#download")
        labels_file = tmp_path / "labels-ada.json"
        download.value.save_as(labels_file)
        browser.close()
    assert page.errors == [] and not [u for u in page.fetched if not u.startswith("blob:")]
    body = json.loads(labels_file.read_text())
    assert body["annotator"] == "ada" and {k: v["label"] for k, v in body["labels"].items()} == wanted
    assert body["labels"][accepted[0]]["note"] == "seen incorrect"

    assert main(["review", "score", str(run_dir), str(labels_file)]) == 0
    score = json.loads((run_dir / "summary.json").read_text())["review"]
    n = len(accepted)
    assert score["accepted_precision"]["n"] == n and score["accepted_precision"]["correct"] == n - 1
    low, high = wilson(n - 1, n)
    assert score["accepted_precision"]["wilson95"] == [round(low, 4), round(high, 4)]
    # every judge accepted the accepted items and the people rejected all the rejected ones
    trajectory = score["judges"]["trajectory"]
    assert trajectory["recall"] == 1.0 and trajectory["n"] == len(items)
    assert score == json.loads((run_dir / "review" / "score.json").read_text())
    report = (run_dir / "report.html").read_text()
    assert "Human review" in report and f"<td>{score['accepted_precision']['precision']}</td>" in report


@pytest.mark.slow
def test_score_refuses_a_file_that_is_not_labels(run_dir, tmp_path, capsys):
    assert main(["review", "sample", str(run_dir), "--size", "4"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"labels": {"x": {"label": "maybe"}}}')
    assert main(["review", "score", str(run_dir), str(bad)]) == 2
    assert "unknown labels ['maybe']" in capsys.readouterr().err


def open_page(pw, url: str, height: int = 900):
    """A page of Debian's chromium with every request that is not the file itself counted."""
    browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": height})
    page = context.new_page()
    page.fetched, page.errors = [], []
    page.on("request", lambda r: page.fetched.append(r.url) if r.url != url else None)
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    return browser, page


@pytest.mark.slow
def test_the_run_report_draws_every_chart_offline(run_dir):
    from playwright.sync_api import sync_playwright

    summary = json.loads((run_dir / "summary.json").read_text())
    url = (run_dir / "report.html").resolve().as_uri()
    with sync_playwright() as pw:
        browser, page = open_page(pw, url, height=1300)
        charts = page.locator(".chart")
        assert charts.count() >= 9  # funnel, rejections, failure types, severity, confidence, judges, ...
        page.wait_for_function("[...document.querySelectorAll('.chart')].every(c => c.dataset.drawn === 'yes')")
        assert page.locator(".chart svg").count() == charts.count()
        cells = page.locator("table").first.locator("td").all_text_contents()
        page.screenshot(path=str(ROOT / "docs" / "report.png"))  # the report as its reader sees it
        browser.close()
    assert page.errors == [] and page.fetched == []  # self-contained: nothing from the network
    headline = dict(zip(cells[::2], cells[1::2], strict=True))
    assert headline["records in"] == str(summary["stages"]["ingest"]["in"]) == "60"
    assert headline["hindsight samples exported"] == str(summary["gates"]["exported_hindsight_samples"])
    assert headline["LLM calls"] == str(summary["llm"]["total"]["calls"])
