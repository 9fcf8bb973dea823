"""ReAct-style text actions (agenther/adapters/text_actions.py) become structured tool calls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agenther.adapters.common import message
from agenther.adapters.messages import MessagesMapping
from agenther.adapters.text_actions import parse_text_actions
from agenther.stages.ingest import read_logs

FIXTURE = Path(__file__).parent / "fixtures" / "react_webshop.jsonl"
MAPPING = {"id_path": "id", "goal_path": "goal", "success_path": "success", "reward_path": "reward"}


def user(text):
    return message("user", text)


def assistant(text):
    return message("assistant", text)


def calls(messages):
    return [c for m in messages if m["role"] == "assistant" for c in m["tool_calls"]]


def parsed_calls(text):
    """(name, arguments as an object) of every call parsed from one assistant turn."""
    return [(c["name"], json.loads(c["arguments"])) for c in calls(parse_text_actions([assistant(text)]))]


def assert_linked(messages):
    """Every tool message answers exactly one earlier call, and carries that call's name."""
    seen: dict[str, str] = {}
    answered = set()
    for m in messages:
        for c in m["tool_calls"]:
            assert c["id"] not in seen, f"duplicate call id {c['id']}"
            assert isinstance(json.loads(c["arguments"]), dict)
            seen[c["id"]] = c["name"]
        if m["role"] == "tool":
            assert m["tool_call_id"] in seen, m
            assert m["tool_call_id"] not in answered, m
            assert m["name"] == seen[m["tool_call_id"]]
            answered.add(m["tool_call_id"])


# --- each recognized form -----------------------------------------------------------------------


def test_bracket_action_with_observation_in_next_user_turn():
    out = parse_text_actions(
        [
            user("buy blue shoes"),
            assistant("Thought: I need to search X.\nAction: search[blue shoes size 9]"),
            user("Observation: [results...]"),
        ]
    )
    assert [m["role"] for m in out] == ["user", "assistant", "tool"]
    assert out[1]["content"] == "Thought: I need to search X."
    assert out[1]["tool_calls"] == [
        {"id": "text-call-1-0", "name": "search", "arguments": '{"input": "blue shoes size 9"}'}
    ]
    assert out[2]["content"] == "[results...]"
    assert (out[2]["tool_call_id"], out[2]["name"]) == ("text-call-1-0", "search")


@pytest.mark.parametrize(
    "observation, content",
    [
        ("observation: ok", "ok"),
        ("  Observation 3:\nWebShop [SEP] page", "WebShop [SEP] page"),
        ("OBSERVATION 12 :  Added B07XYZ to cart", "Added B07XYZ to cart"),
    ],
)
def test_observation_prefix_variants(observation, content):
    out = parse_text_actions([assistant("Action 3: click[B07XYZ]"), user(observation)])
    assert out[0]["content"] is None
    assert out[1]["role"] == "tool" and out[1]["content"] == content
    assert out[1]["tool_call_id"] == out[0]["tool_calls"][0]["id"]


@pytest.mark.parametrize(
    "action_input, arguments",
    [
        ('{"order_id": "W123"}', {"order_id": "W123"}),
        ('"blue shoes"', {"input": "blue shoes"}),
        ("blue shoes", {"input": "blue shoes"}),
        ("42", {"input": 42}),
        ('```json\n{"order_id": "W123", "items": [1, 2]}\n```', {"order_id": "W123", "items": [1, 2]}),
    ],
)
def test_langchain_action_and_action_input(action_input, arguments):
    text = f"Thought: look it up\nAction: lookup_order\nAction Input: {action_input}"
    assert parsed_calls(text) == [("lookup_order", arguments)]


def test_langchain_observation_in_the_same_text_is_split_out():
    out = parse_text_actions(
        [
            assistant(
                "Thought: look it up\nAction: lookup_order\nAction Input: {\"order_id\": \"W123\"}\n"
                "Observation: {\"status\": \"delivered\"}\nThought: I now know the final answer\n"
                "Final Answer: it was delivered"
            )
        ]
    )
    assert [m["role"] for m in out] == ["assistant", "tool", "assistant"]
    assert out[0]["content"] == "Thought: look it up"
    assert out[0]["tool_calls"][0]["name"] == "lookup_order"
    assert json.loads(out[0]["tool_calls"][0]["arguments"]) == {"order_id": "W123"}
    assert out[1]["content"] == '{"status": "delivered"}'
    assert out[1]["tool_call_id"] == out[0]["tool_calls"][0]["id"]
    assert out[2]["content"] == "Thought: I now know the final answer\nFinal Answer: it was delivered"
    assert out[2]["tool_calls"] == []


@pytest.mark.parametrize(
    "action, name, arguments",
    [
        ('get_weather(city="Paris")', "get_weather", {"city": "Paris"}),
        ('get_weather(city="Paris", days=3, metric=True)', "get_weather", {"city": "Paris", "days": 3, "metric": True}),
        ('search("blue shoes")', "search", {"input": "blue shoes"}),
        ("search('a', 'b')", "search", {"input": ["a", "b"]}),
        ("get_weather(city=Paris)", "get_weather", {"city": "Paris"}),
        ("search(query=blue shoes, page=2)", "search", {"query": "blue shoes", "page": "2"}),
        ("search(blue shoes)", "search", {"input": "blue shoes"}),
        ("list_orders()", "list_orders", {}),
        ("web.search[x]", "web.search", {"input": "x"}),
        ("click[Size 9 [US]]", "click", {"input": "Size 9 [US]"}),
        ("add_to_cart[]", "add_to_cart", {"input": ""}),
    ],
)
def test_call_forms(action, name, arguments):
    assert parsed_calls(f"Action: {action}") == [(name, arguments)]


@pytest.mark.parametrize(
    "text, name, arguments",
    [
        ('{"name": "book_hotel", "arguments": {"city": "Paris", "nights": 2}}', "book_hotel", {"city": "Paris", "nights": 2}),
        ('{"name": "book_hotel", "arguments": "{\\"city\\": \\"Paris\\"}"}', "book_hotel", {"city": "Paris"}),
        ('{"action": "search", "action_input": "blue shoes"}', "search", {"input": "blue shoes"}),
        ('{"action": "search", "action_input": "42"}', "search", {"input": "42"}),
        ('```json\n{"action": "lookup", "action_input": {"id": 7}}\n```', "lookup", {"id": 7}),
        ('Thought: x\nAction:\n```json\n{"action": "Final Answer", "action_input": "Paris"}\n```', "Finish", {"input": "Paris"}),
        ('Action: {"tool": "lookup", "tool_input": [1, 2]}', "lookup", {"input": [1, 2]}),
    ],
)
def test_json_calls_written_as_text(text, name, arguments):
    assert parsed_calls(text) == [(name, arguments)]


def test_json_list_of_calls_and_its_observation():
    text = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    out = parse_text_actions([assistant(text), user("Observation: from a"), user("Observation: from b")])
    assert out[0]["content"] is None
    assert [(c["id"], c["name"]) for c in out[0]["tool_calls"]] == [("text-call-0-0", "a"), ("text-call-0-1", "b")]
    assert [(m["role"], m["tool_call_id"], m["name"]) for m in out[1:]] == [
        ("tool", "text-call-0-0", "a"),
        ("tool", "text-call-0-1", "b"),
    ]


def test_whole_react_trajectory_in_one_turn_is_split_into_cycles():
    text = (
        "Thought 1: I need to search Arthur's Magazine.\n"
        "Action 1: Search[Arthur's Magazine]\n"
        "Observation 1: Arthur's Magazine (1844-1846) was a periodical.\n"
        "Thought 2: Now First for Women.\n"
        "Action 2: Search[First for Women]\n"
        "Observation 2: First for Women was started in 1989.\n"
        "Thought 3: 1844 < 1989.\n"
        "Action 3: Finish[Arthur's Magazine]"
    )
    out = parse_text_actions([user("q"), assistant(text)])
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [m["content"] for m in out[1::2]] == [
        "Thought 1: I need to search Arthur's Magazine.",
        "Thought 2: Now First for Women.",
        "Thought 3: 1844 < 1989.",
    ]
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls(out)] == [
        ("text-call-1-0", "Search", {"input": "Arthur's Magazine"}),
        ("text-call-1-1", "Search", {"input": "First for Women"}),
        ("text-call-1-2", "Finish", {"input": "Arthur's Magazine"}),
    ]
    assert [m["content"] for m in out if m["role"] == "tool"] == [
        "Arthur's Magazine (1844-1846) was a periodical.",
        "First for Women was started in 1989.",
    ]
    assert_linked(out)


@pytest.mark.parametrize("finish", ["Finish[Paris]", "finish[Paris]", "FINISH[Paris]"])
def test_finish_is_a_call_named_finish(finish):
    assert parsed_calls(f"Thought: done\nAction: {finish}") == [("Finish", {"input": "Paris"})]


def test_text_after_the_action_stays_content():
    out = parse_text_actions([assistant("Thought: buy it\nAction: click[Buy Now]\nI hope this works.")])
    assert out[0]["tool_calls"][0]["name"] == "click"
    assert out[0]["content"] == "Thought: buy it\nI hope this works."


# --- what is not parsed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The answer is Paris.",
        "Action: I think I should search for shoes",
        "Action: search[unterminated\n>>> parse error <<<",
        "Action: lookup_order.",
        "Action:",
        "Action Input: {\"a\": 1}",
        "Action: click[x]\nAction Input: {\"a\": 1}",  # an input for an action that already has arguments
        "Observation: before any action\nAction: search[x]",
        "Action: search[x]\nObservation: a\nObservation: b",  # two observations for one action
        '{"query": "laptop bag", "max_price": 30}',  # JSON, but not a call
        '{"name": "Alice"}',  # a name but no arguments key
        "[1, 2, 3]",
        "Action: {not json",
        "Action: {\"query\": 1}",
        "lol [click] (maybe) Action Input: ??? }{ ][",
        "",
    ],
)
def test_unparseable_text_is_left_exactly_as_it_was(text):
    msgs = [user("goal"), assistant(text), user("Observation: something")]
    out = parse_text_actions(msgs)
    assert out == msgs
    assert out[1] is msgs[1]


def test_structured_calls_are_left_alone_and_user_text_is_never_parsed():
    structured = message(
        "assistant", "Action: search[x]", [{"id": "c1", "name": "search", "arguments": '{"q": "x"}'}]
    )
    msgs = [
        user("Action: search[from the user]"),
        structured,
        message("tool", "result", tool_call_id="c1", name="search"),
        assistant("Just text."),
        user("Observation: not an answer to any parsed action"),
        message("assistant", None),
    ]
    assert parse_text_actions(msgs) == msgs


def test_only_the_next_user_turn_can_be_the_observation():
    msgs = [assistant("Action: search[x]"), user("Please go on."), user("Observation: late")]
    out = parse_text_actions(msgs)
    assert [m["role"] for m in out] == ["assistant", "user", "user"]
    assert out[2] is msgs[2]


PIECES = [
    "Thought:", "Action:", "Action 2:", "Action Input:", "Observation:", "Final Answer:", "\n", " ",
    "search[", "]", "(", ")", "{", "}", "[", '"', "'", "=", ",", "name", "arguments", "action_input",
    '{"name": "f", "arguments": {}}', "```json\n", "```", "x=1", "Finish[", "click[B07]", "**", "\\",
    "\x00", "é", "((((((((((", "[[[[[[[[[[",
]
TEMPLATES = [
    "Thought: {0}\nAction: search[{1}]",
    "Action: {0}[{1}]\nObservation: {2}",
    "Action: lookup\nAction Input: {0}\nObservation: {1}\nThought: {2}",
    "Action: f({0}={1})",
    'Action: f("{0}", k={1})',
    '{{"name": "f{0}", "arguments": {{"a": "{1}"}}}}',
    "Observation: {0}",
    "{0}{1}{2}",
]


def test_random_text_never_raises_and_output_stays_canonical():
    rng = random.Random(1234)

    def noise():
        return "".join(rng.choice(PIECES) if rng.random() < 0.7 else chr(rng.randint(1, 0x2FF))
                       for _ in range(rng.randint(0, 12)))

    parsed = 0
    for _ in range(3000):
        turns = []
        for _ in range(rng.randint(1, 5)):
            text = rng.choice(TEMPLATES).format(noise(), noise(), noise())
            turns.append(message(rng.choice(["assistant", "user"]), text))
        out = parse_text_actions(turns)
        assert_linked(out)
        for m in out:
            assert set(m) == {"role", "content", "tool_calls", "tool_call_id", "name"}
            assert m["role"] in ("user", "assistant", "tool")
        if calls(out):
            parsed += 1
        else:
            assert out == turns
    assert parsed > 1000  # the random turns do exercise the parser, not only its refusals
    deep = "Action: f(" + "[" * 100_000 + ")"
    assert parse_text_actions([assistant(deep)])[0]["tool_calls"][0]["name"] == "f"
    long_word = "Action: search(" + "a" * 50_000 + " b)"
    assert parsed_calls(long_word) == [("search", {"input": "a" * 50_000 + " b"})]


# --- through the real adapter ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_rows():
    items = list(read_logs(FIXTURE, fmt="messages", mapping=MessagesMapping.from_params(MAPPING)))
    assert all(isinstance(i, dict) for i in items), items
    return {row["id"].rsplit("/", 1)[1]: row for row in items}


def test_fixture_reads_into_trajectories_with_tool_calls(fixture_rows):
    raw = {r["id"]: r for r in map(json.loads, FIXTURE.read_text().splitlines())}
    assert set(fixture_rows) == set(raw)
    for rid, row in fixture_rows.items():
        assert_linked(row["messages"])
        assert row["success"] is raw[rid]["success"] and row["reward"] == raw[rid]["reward"]
        assert row["goal"] == raw[rid]["goal"]
    names = {rid: [c["name"] for c in calls(row["messages"])] for rid, row in fixture_rows.items()}
    assert names == {
        "webshop-navy-sneakers": ["search", "think", "click", "click", "add_to_cart", "buy_now"],
        "webshop-missing-item": ["search", "click", "add_to_cart"],
        "hotpotqa-colorado-orogeny": ["Search", "Lookup", "Finish"],
        "hotpotqa-one-turn-log": ["Search", "Search", "Finish"],
        "langchain-order-exchange": ["lookup_order", "update_address", "cancel_order"],
        "unparseable-mess": [],
    }


def results(row):
    """(call name, arguments, result text) for each call of a trajectory."""
    by_id = {m["tool_call_id"]: m["content"] for m in row["messages"] if m["role"] == "tool"}
    return [(c["name"], json.loads(c["arguments"]), by_id.get(c["id"])) for c in calls(row["messages"])]


def test_fixture_failures_keep_their_successful_actions_and_errors(fixture_rows):
    shop = results(fixture_rows["webshop-navy-sneakers"])
    assert ("add_to_cart", {"input": "B07XYZ"}, "Added B07XYZ to cart (color: blue, size: 9).") in shop
    assert shop[-1][0] == "buy_now" and shop[-1][2].startswith("Order placed for B07XYZ")
    missing = results(fixture_rows["webshop-missing-item"])
    assert [r[2] for r in missing[1:]] == ["Error: item not found", "Error: item not found"]
    exchange = results(fixture_rows["langchain-order-exchange"])
    assert exchange == [
        ("lookup_order", {"order_id": "W123"}, exchange[0][2]),
        ("update_address", {"order_id": "W123", "city": "Paris", "zip": "75001"}, "Address of W123 updated to Paris 75001."),
        ("cancel_order", {"order_id": "W123", "reason": "no longer needed"}, "Order W123 cancelled. Refund of $45.99 issued."),
    ]
    assert json.loads(exchange[0][2])["status"] == "delivered"


def test_fixture_final_answers(fixture_rows):
    assert fixture_rows["hotpotqa-colorado-orogeny"]["final_answer"] == "1,000 to 5,000 ft"
    assert fixture_rows["hotpotqa-one-turn-log"]["final_answer"] == "Arthur's Magazine"
    assert fixture_rows["langchain-order-exchange"]["final_answer"].endswith("has been cancelled and refunded.")
    one_turn = fixture_rows["hotpotqa-one-turn-log"]["messages"]
    assert [m["role"] for m in one_turn] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


def test_fixture_mess_is_kept_as_text(fixture_rows):
    raw = next(r for r in map(json.loads, FIXTURE.read_text().splitlines()) if r["id"] == "unparseable-mess")
    row = fixture_rows["unparseable-mess"]
    assert [(m["role"], m["content"]) for m in row["messages"]] == [(t["role"], t["content"]) for t in raw["messages"]]
    assert all(m["tool_calls"] == [] and m["tool_call_id"] is None for m in row["messages"])


def test_sharegpt_text_actions_through_auto_detection(tmp_path):
    path = tmp_path / "react.jsonl"
    record = {
        "conversations": [
            {"from": "human", "value": "Find the population of Paris."},
            {"from": "gpt", "value": "Thought: search it\nAction: Search[Paris population]"},
            {"from": "human", "value": "Observation: 2.1 million"},
            {"from": "gpt", "value": "Action: Finish[2.1 million]"},
        ]
    }
    path.write_text(json.dumps(record) + "\n")
    (row,) = list(read_logs(path))
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert results(row) == [
        ("Search", {"input": "Paris population"}, "2.1 million"),
        ("Finish", {"input": "2.1 million"}, None),
    ]
    assert row["final_answer"] == "2.1 million"
