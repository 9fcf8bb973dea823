"""Agents that act by writing text: grammars, achievements, gates and hostile records (issue 19).

The three logs under tests/fixtures/text_agents/ (our own: make_fixtures.py wrote them) are run as
a new user would, with no params: ReAct web shopping, ReAct question answering, an agent that acts
by HTTP request lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from conftest import TAU, ingest, write_params

from agenther import gates
from agenther.adapters.common import message
from agenther.adapters.grammars import choose, grammars
from agenther.adapters.http_actions import parse as parse_http
from agenther.adapters.text_actions import parse_react
from agenther.cli import main
from agenther.evidence import coverage
from agenther.evidence.conversation import hindsight_goal
from agenther.evidence.goal import NoGoal
from agenther.evidence.tools import Tools, is_error
from agenther.params import ParamsError, load_params
from agenther.stages.classify import classify

FIXTURES = Path(__file__).parent / "fixtures" / "text_agents"
SHOP, QA, HTTP = FIXTURES / "react_shop.jsonl", FIXTURES / "react_qa.jsonl", FIXTURES / "http_agent.jsonl"


def user(text):
    return message("user", text)


def assistant(text):
    return message("assistant", text)


def calls_of(messages):
    return [(c["name"], json.loads(c["arguments"])) for m in messages for c in m["tool_calls"]]


def results_of(messages):
    return [(m["name"], m["content"]) for m in messages if m["role"] == "tool"]


@pytest.fixture(scope="module")
def rows():
    """Every fixture through the real ingest (no params), by local id."""
    found = {}
    for path in (SHOP, QA, HTTP):
        for row in ingest(path).trajectories.to_dicts():
            found[row["id"].rsplit("/", 1)[1]] = row
    return found


def goal_of(row, params=None):
    return hindsight_goal(row, params or load_params())


def defects(prompt, goal, row):
    """What the relabel gate finds wrong with `prompt` as the sample's opening (coverage, coherence)."""
    from agenther.stages.relabel import sample_defects

    return sample_defects(row, goal, {goal.start: prompt}, load_params())


# --- 1. grammars: each parses its shape -------------------------------------------------------------

def test_http_grammar_reads_requests_bodies_replies_and_the_final_report():
    msgs = [
        user("Task: find the customer and order a restock."),
        assistant("GET http://api.local/customers?name=Maria%20Lopez&birthdate=1988-02-14"),
        user('Here is the response from the GET request:\n[{"id": "C1042"}]. Please go on.'),
        assistant('I will create it.\n```\nPOST http://api.local/orders\n{"sku": "SKU-1", "quantity": 40}\n```'),
        user("POST request accepted and executed successfully."),
        assistant("POST http://api.local/orders\n{'sku': 'SKU-1'}"),
        user("Invalid POST request"),
        assistant('FINISH(["C1042", 40])'),
        user("Next task: something else."),  # the final report waits for no reply
    ]
    out = parse_http(msgs)
    assert calls_of(out) == [
        ("GET", {"url": "http://api.local/customers", "query": {"name": "Maria Lopez", "birthdate": "1988-02-14"}}),
        ("POST", {"url": "http://api.local/orders", "body": {"sku": "SKU-1", "quantity": 40}}),
        ("POST", {"url": "http://api.local/orders", "body": "{'sku': 'SKU-1'}"}),  # not JSON: kept as written
        ("Finish", {"input": '["C1042", 40]'}),
    ]
    assert [r[1] for r in results_of(out)] == [msgs[2]["content"], msgs[4]["content"], "Invalid POST request"]
    assert out[3]["content"] == "I will create it."  # the prose around the request stays the turn's text
    assert out[-1] == msgs[-1]
    assert [is_error(r[1]) for r in results_of(out)] == [False, False, True]
    kinds = Tools()
    assert (kinds.kind("GET"), kinds.kind("POST"), kinds.kind("DELETE")) == ("read", "write", "write")


def test_react_grammar_reads_bare_actions_and_observations_in_the_next_turn():
    plain = [user("Find a kettle."), assistant("search[electric kettle]"), user("[B0C3KETTLE] Kettle $32.00"),
             assistant("Thought: buy it\nAction: click[Buy Now]"), user("Thank you for shopping with us!"),
             assistant("Action: Finish[done]"), user("Next question: ...")]
    out = parse_react(plain)
    assert calls_of(out) == [("search", {"input": "electric kettle"}), ("click", {"input": "Buy Now"}),
                             ("Finish", {"input": "done"})]
    assert results_of(out) == [("search", "[B0C3KETTLE] Kettle $32.00"), ("click", "Thank you for shopping with us!")]
    assert out[-1] == plain[-1]  # after the final report a user turn is a user turn
    # in a run whose observations are prefixed, a plain user turn is no observation
    prefixed = [user("Go."), assistant("Action: search[x]"), user("Observation: found x"),
                assistant("Action: search[y]"), user("Please go on.")]
    assert results_of(parse_react(prefixed)) == [("search", "found x")]


@pytest.mark.parametrize("path, grammar, calls", [
    (SHOP, "react", {"search", "click", "think"}),
    (QA, "react", {"Search", "Lookup", "Finish"}),
    (HTTP, "http", {"GET", "POST", "DELETE", "Finish"}),
])
def test_each_fixture_is_detected_and_parsed_with_its_grammar(path, grammar, calls):
    got = ingest(path)
    assert got.stats["text_actions"]["name"] == grammar and got.stats["text_actions"]["how"] == "detected"
    found = {c["name"] for ms in got.trajectories["messages"].to_list() for m in ms for c in m["tool_calls"]}
    assert found == calls
    for ms in got.trajectories["messages"].to_list():  # every result points at a call of the same name
        names = {c["id"]: c["name"] for m in ms for c in m["tool_calls"]}
        assert all(names[m["tool_call_id"]] == m["name"] for m in ms if m["role"] == "tool")


def test_a_grammar_of_your_own_from_params(tmp_path):
    log = tmp_path / "shell.jsonl"
    runs = [{"id": f"r{i}", "success": False, "messages": [
        {"role": "user", "content": "Tidy the build folder."},
        {"role": "assistant", "content": f"I look first.\n$ ls build/{i}"},
        {"role": "user", "content": "OUT: a.o b.o"},
        {"role": "assistant", "content": "$ rm build/a.o"},
        {"role": "user", "content": "OUT: removed"},
        {"role": "assistant", "content": "$ answer removed a.o"}]} for i in range(3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    spec = {"action": r"^\$ (?P<tool>\w+) (?P<args>.*)$", "observation": "^OUT: ", "final": ["answer"]}
    params = load_params(None, {"ingest": {"input": str(log), "grammars": {"shell": spec}},
                                "tools": {"rules": [{"tool": "rm", "kind": "write"}]}})
    from agenther.stages.ingest import write_tables

    stats = write_tables(params, tmp_path)
    assert stats["text_actions"]["name"] == "shell" and stats["text_actions"]["how"] == "detected"
    row = pl.read_parquet(tmp_path / "00_trajectories.parquet").row(0, named=True)
    assert calls_of(row["messages"]) == [("ls", {"input": "build/0"}), ("rm", {"input": "build/a.o"}),
                                         ("Finish", {"input": "removed a.o"})]
    assert results_of(row["messages"]) == [("ls", "a.o b.o"), ("rm", "removed")]
    assert row["messages"][1]["content"] == "I look first."
    goal = hindsight_goal(row, params)
    assert [(a.tool, a.arguments) for a in goal.actions] == [("rm", {"input": "build/a.o"})]
    # named explicitly; and a name no grammar has, or a grammar without a tool, is a clear error
    assert choose("shell", {"shell": spec}, []).grammar.name == "shell"
    with pytest.raises(ValueError, match="no grammar 'nope' .*react, http"):
        choose("nope", None, [])
    with pytest.raises(ParamsError, match="ingest.grammars.x: .*no \\(\\?P<tool>"):
        load_params(None, {"ingest": {"grammars": {"x": {"action": "^do (.*)$"}}}})
    assert set(grammars()) >= {"react", "http"}


def test_inspect_prints_the_grammar_and_actions_per_run(capsys):
    assert main(["inspect", str(HTTP)]) == 0
    out = capsys.readouterr().out
    assert "text actions: grammar 'http' (detected); actions + results per grammar in the first records: react 0, http" in out
    assert "actions per run: median 2, min 1, max 3; 0 of 15 runs with none" in out
    assert "[1] ASSISTANT CALLS GET(" in out


# --- 2. achievements from text ---------------------------------------------------------------------

def test_a_purchase_by_button_is_a_write_with_the_options_and_the_page_it_was_made_on(rows):
    goal = goal_of(rows["shop-004"])
    (action,) = goal.actions
    assert action.tool == "click[Buy Now]" and action.arguments == {"options": {"color": "charcoal", "size": "9"}}
    assert action.seen == {"item": "B0A1TRAIL2", "title": "Fellwalker Men's Trail Running Shoe, Breathable Mesh, "
                                                          "Rock Plate", "price": "$54.99"}
    messages = rows["shop-004"]["messages"]
    assert messages[action.call_step]["tool_calls"][0]["arguments"] == '{"input": "Buy Now"}'  # the log's call as it was
    # the option clicks and the page train; the acknowledgement of a thought does not
    trained = {json.loads(messages[i]["tool_calls"][0]["arguments"])["input"] for i in goal.train_steps}
    assert {"B0A1TRAIL2", "charcoal", "9", "Buy Now"} <= trained
    # a request must name the options (and ask to buy); the title and price it may name
    row = rows["shop-004"]
    ok = "Please buy the Fellwalker trail running shoe for men in charcoal, size 9, for $54.99."
    assert defects(ok, goal, row) == []
    assert [r for r, _ in defects("Please buy the Fellwalker trail running shoe in size 9.", goal, row)] \
        == ["unrequested_action"]
    assert [r for r, _ in defects("Show me the Fellwalker shoe in charcoal, size 9.", goal, row)] \
        == ["unrequested_action"]


def test_a_click_on_a_product_reads_and_params_rules_decide_by_name_and_arguments():
    tools = Tools.of(None, load_params())
    assert tools.action_name("click", {"input": "B0A1TRAIL2"}) == "click"
    assert tools.kind(tools.action_name("click", {"input": "Buy Now"})) == "write"
    assert tools.kind(tools.action_name("press", {"input": "Place your order"})) == "write"
    assert tools.kind(tools.action_name("click", {"input": "Add to Cart"})) == "read"
    mine = Tools.of(None, load_params(None, {"tools": {"rules": [
        {"tool": "click", "arguments": "(?i)^add to cart$", "kind": "write", "requests": ["add", "cart"]}]}}))
    name = mine.action_name("click", {"input": "Add to Cart"})
    assert name == "click[Add to Cart]" and mine.kind(name) == "write"
    assert mine.requested(name, "Please add the blue one to my cart.", [name])


def test_a_write_whose_observation_reports_an_error_is_not_an_achievement(rows):
    refused = goal_of(rows["shop-016"])  # click[Buy Now] -> "Invalid action!", twice
    assert isinstance(refused, NoGoal) and refused.reason == "no_evidenced_achievement"
    post = goal_of(rows["api-09"])  # "Invalid POST request", then HTTP 400
    assert isinstance(post, NoGoal)
    accepted = goal_of(rows["api-06"])  # "Response 201: created order ORD-7731"
    assert [(a.tool, a.arguments["body"]["quantity"]) for a in accepted.actions] == [("POST", 4)]
    # the same run with the server refusing the write: no achievement
    refusing = json.loads(json.dumps(rows["api-06"]))
    for m in refusing["messages"]:
        if m["role"] == "tool" and m["name"] == "POST":
            m["content"] = "Response 409: conflict: an open restock order exists"
    assert isinstance(goal_of(refusing), NoGoal)  # nor is the order ID its report names (the refusal never gave one)


def test_a_last_button_write_with_no_reply_counts_only_when_the_log_scores_the_run(rows):
    bought = goal_of(rows["shop-018"])  # ends on click[Buy Now], reward 0.5
    (action,) = bought.actions
    assert action.result_step == action.call_step == len(rows["shop-018"]["messages"]) - 1
    assert action.arguments == {"options": ["sea salt", "8 oz"]} and bought.sample_end == action.call_step + 1
    assert isinstance(goal_of(rows["shop-019"]), NoGoal)  # the same, scored 0: nothing shows it took effect


def test_a_final_answer_found_in_the_observations_is_a_reported_fact(rows):
    fact = goal_of(rows["qa-03"]).facts[-1]  # Finish[1874]: the bridge's passage says "opened in 1874"
    assert fact.values[0] == "1874" and fact.text.startswith("Answer: 1874.")
    assert [r.tool for r in fact.reads] == ["Search"] and fact.reads[0].arguments == {"input": "Hollowmere Bridge"}
    api = goal_of(rows["api-03"]).facts[-1]  # FINISH([112]): a value of the JSON reply
    assert api.values == ["112"]
    yes_no = goal_of(rows["qa-10"]).facts[-1]  # Finish[yes], with the years its reasoning read
    assert {"1868", "1821", "Saltmoor Viaduct"} <= set(yes_no.values)


def test_a_question_about_an_answer_names_its_subject_not_the_answer(rows):
    goal = goal_of(rows["qa-03"])  # Finish[1874] after Search[Hollowmere Bridge]
    # the failed run's question (who designed it, when did she die) is not what "1874" answers: rewritten
    assert [(e.step, e.question) for e in goal.edits] == [(goal.start, True)]
    assert defects("When did the Hollowmere Bridge open?", goal, rows["qa-03"]) == []
    gives = defects("What was the name of the bridge that opened in 1874?", goal, rows["qa-03"])
    assert any(r == "unmet_requirement" and "'1874', the answer the sample gives" in why for r, why in gives)
    assert "1874" not in coverage.required_details(goal, rows["qa-03"])  # what the relabeler is told to name


@pytest.mark.parametrize("rid", ["qa-14", "qa-13", "qa-15", "qa-12", "api-11", "api-15", "api-05"])
def test_a_final_answer_not_found_in_the_observations_is_not_a_fact(rows, rid):
    # 300 metres (the passage says 214), 1962 (a failed search), Harland & Sons, a yes with no
    # reasons, a date and a count the replies do not hold, "Oslo, Norway" (Norway is nowhere)
    goal = goal_of(rows[rid])
    assert isinstance(goal, NoGoal) and goal.reason == "no_evidenced_achievement"


def test_an_answer_becomes_a_fact_only_through_what_it_follows():
    msgs = [user("Q?"), assistant("Action: Search[Tarn]"), user("Observation: The Tarn is 96 kilometres long."),
            assistant("Thought: so\nAction: Finish[96 kilometres]")]
    row = {"messages": parse_react(msgs), "tools": None}
    assert goal_of(row).facts[-1].values[0] == "96 kilometres"
    before = {"messages": parse_react([msgs[0], msgs[3], msgs[1], msgs[2]]), "tools": None}  # answered first
    assert isinstance(goal_of(before), NoGoal)


# --- 3. gates that fit the classifier ---------------------------------------------------------------

@pytest.fixture(scope="module")
def shop_classified():
    return classify(ingest(SHOP).trajectories, load_params(), None)


def test_the_share_gate_is_off_for_one_signal_logs(shop_classified):
    failures = shop_classified.filter(pl.col("is_failure"))
    assert failures.height >= 10 and failures["failure_type"].value_counts()["count"].max() / failures.height > 0.8
    # not all failures have the success flag as their only reason (two are tool errors): still one signal
    assert set(failures["classify_reason"]) != {"log marks failure"}
    tight = load_params(None, {"gates": {"max_failure_type_share": 0.5}})
    result = gates.check(shop_classified, "classified", tight, None)
    assert result["success"] and "max_failure_type_share (0.5) not applied" in result["adapted"][0]


def test_the_share_gate_is_on_for_others(shop_classified):
    tight = load_params(None, {"gates": {"max_failure_type_share": 0.5}})
    by_llm = shop_classified.with_columns(classify_mode=pl.lit("llm"))  # a classifier that could collapse
    with pytest.raises(gates.GateFailed, match="failure_type_shares"):
        gates.check(by_llm, "classified", tight, None)
    tau = classify(ingest(TAU).trajectories, load_params(), None)  # ground truth: the rules read more than a flag
    with pytest.raises(gates.GateFailed, match="failure_type_shares"):
        gates.check(tau, "classified", load_params(None, {"gates": {"max_failure_type_share": 0.3}}), None)
    warned = gates.check(tau, "classified", load_params(None, {"gates": {"max_failure_type_share": 0.3,
                                                                         "distributions": "warn"}}), None)
    assert warned["success"] and "failure_type_shares" in warned["warnings"][0]


def test_inspect_exits_0_when_a_distribution_gate_fails(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", gates={"max_failure_type_share": 0.3})
    assert main(["inspect", str(TAU), "--limit", "60", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "warning: gate 'classified': [classified.failure_type_shares]" in out
    assert "would reach relabeling:" in out
    # the same gate stops a run's classify -> extract hand-over
    code = main(["run", "--input", str(TAU), "--limit", "60", "--params", str(params), "--out", str(tmp_path / "o")])
    assert code == 2 and "gate 'classified' failed" in capsys.readouterr().err


# --- 4. seams ---------------------------------------------------------------------------------------

def test_a_tools_column_of_openai_schemas_is_detected(tmp_path):
    records = json.loads(TAU.read_text())[:4]
    log = tmp_path / "reshaped.jsonl"
    schemas = json.loads((Path(__file__).parents[1] / "agenther/adapters/tau_bench_airline_tools.json").read_text())
    log.write_text("".join(json.dumps({"run_id": f"{r['task_id']}-{r['trial']}", "messages": r["traj"],
                                       "tools": json.dumps(schemas) if i % 2 else schemas,  # text or a list
                                       "success": r["reward"] == 1}) + "\n" for i, r in enumerate(records)))
    got = ingest(log)
    assert got.stats["detected"] == {"id_path": "run_id", "success_path": "success", "tools_path": "tools"}
    names = [{t["function"]["name"] for t in json.loads(tools)} for tools in got.trajectories["tools"]]
    assert all("cancel_reservation" in n for n in names) and len(names) == 4


def test_a_log_format_plugin_is_one_module_registered_by_entry_point(tmp_path):
    """A package that ships one module and one entry point: detection, reading and the
    trajectories gate take its format, in a fresh process (as an installed plugin runs)."""
    site = tmp_path / "site"
    (site / "csvish_plugin").mkdir(parents=True)
    (site / "csvish_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from agenther.adapters.common import convert_records, message
        from agenther.adapters.adapter import Adapter

        def convert(record, path, pointer):
            ask, said = record["q"], record["a"]
            return {"id": f"csvish/{record['n']}", "source_format": "csvish", "source_file": str(path),
                    "record_pointer": pointer, "task_key": f"csvish/{record['n']}", "goal": ask,
                    "messages": [message("user", ask), message("assistant", said)], "tools": None,
                    "final_answer": said, "success": record["ok"], "reward": None, "metadata": "{}"}

        ADAPTER = Adapter(name="csvish", looks_like=lambda record, ctx: isinstance(record, dict) and "q" in record,
                          read=lambda path, ctx: convert_records(path, convert, repairs=ctx.repairs), expects="q, a")
    '''))
    dist = site / "csvish_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: csvish-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[agenther.adapters]\ncsvish = csvish_plugin:ADAPTER\n")
    log = tmp_path / "qa.jsonl"
    log.write_text("".join(json.dumps({"n": i, "q": f"What is {i}+{i}?", "a": str(2 * i), "ok": i % 2 == 0}) + "\n"
                           for i in range(4)))
    env = os.environ | {"PYTHONPATH": f"{site}:{Path(__file__).parents[1]}"}
    done = subprocess.run([sys.executable, "-m", "agenther.cli", "inspect", str(log), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["format"] == "csvish" and (found["successes"], found["failures"]) == (2, 2)


# --- 5. no record kills a run -----------------------------------------------------------------------

def hostile_lines() -> list[str]:
    good = [json.loads(line) for line in HTTP.read_text().splitlines()[:4]]
    deep = '{"id": "deep", "messages": ' + "[" * 20_000 + "]" * 20_000 + "}"
    surrogate = json.dumps({**good[1], "id": "surrogate", "task": good[1]["task"] + " \ud83d"}, ensure_ascii=True)
    assert "\\ud83d" in surrogate
    return [json.dumps(good[0]), deep, surrogate, json.dumps(good[2]), '{"id": 7, "messages": [' + "1" * 5000 + "]}",
            json.dumps(good[3])]


@pytest.mark.parametrize("as_array", [False, True])
def test_a_record_too_deep_or_with_a_lone_surrogate_costs_that_record_only(tmp_path, as_array):
    lines = hostile_lines()
    log = tmp_path / ("hostile.json" if as_array else "hostile.jsonl")
    log.write_text("[\n" + ",\n".join(lines) + "\n]\n" if as_array else "\n".join(lines) + "\n")
    got = ingest(log)
    ids = [i.rsplit("/", 1)[1] for i in got.trajectories["id"]]
    assert ids == ["api-01", "surrogate", "api-03", "api-04"]  # the good ones, and the repaired one
    assert got.stats["repaired"] == 1
    repaired = got.trajectories.filter(pl.col("id").str.ends_with("surrogate"))["goal"][0]
    assert repaired.endswith(" \\ud83d")  # kept as the log's own escape text: six characters
    reasons = got.quarantine["reason"].to_list()
    assert len(reasons) == 2 and "nested too deeply" in reasons[0] and "4300 digits" in reasons[1]
    assert got.records_in == got.trajectories.height + got.quarantine.height == 6


def test_inspect_and_run_go_on_past_hostile_records(tmp_path, llm_server, capsys):
    log = tmp_path / "hostile.jsonl"
    log.write_text("\n".join(hostile_lines()) + "\n")
    assert main(["inspect", str(log)]) == 0
    out = capsys.readouterr().out
    assert "records: 6 in" in out and "2 quarantined" in out and "repaired 1" in out
    params = write_params(tmp_path / "params.yaml", llm_server, gates={"acceptance_rate": [0.0, 1.0]})
    assert main(["run", "--input", str(log), "--out", str(tmp_path / "out"), "--params", str(params)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["ingest"]["quarantined"] == 2 and summary["reconciliation"]["ok"]
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert any("nested too deeply" in r for r in quarantine["reason"])



def test_a_row_the_table_writer_refuses_is_quarantined_and_its_batch_goes_on(tmp_path, rows):
    from agenther import schema
    from agenther.stages.ingest import _write_or_quarantine
    from agenther.tables import TableWriter

    good = {k: rows["api-01"][k] for k in schema.TRAJECTORY}
    bad = good | {"id": "messages/http_agent/odd", "record_pointer": "line 9", "reward": "high"}  # not a number
    with TableWriter(tmp_path / "t.parquet", schema.TRAJECTORY) as writer:
        refused = _write_or_quarantine(writer, [good, bad, good | {"id": "messages/http_agent/again"}])
    assert pl.read_parquet(tmp_path / "t.parquet")["id"].to_list() == [good["id"], "messages/http_agent/again"]
    assert [r["record_pointer"] for r in refused] == ["line 9"]
    assert refused[0]["reason"].startswith("line 9: cannot be written to the trajectories table (")
