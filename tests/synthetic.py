"""A short synthetic airline run, coherent as it stands, that tests change one turn of to break one
rule at a time (tests/test_coherence.py, tests/test_goal.py)."""

from __future__ import annotations

import json
from pathlib import Path

from agenther.evidence.goal import AchievedGoal, Action

TOOLS = (Path(__file__).resolve().parents[1] / "agenther/adapters/tau_bench_airline_tools.json").read_text()


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "name": name, "arguments": json.dumps(arguments)}


def downgrade(**changes: str) -> dict:
    """A short, coherent run: the user asks to downgrade ABC123 to economy, the agent looks it up,
    asks, and downgrades it. `changes`: step -> new content (a message's text)."""
    flights = [{"flight_number": "HAT001", "date": "2024-05-20"}]
    update = {"reservation_id": "ABC123", "cabin": "economy", "flights": flights, "payment_id": "credit_card_1"}
    messages = [
        {"role": "system", "content": "You are an airline agent. Follow the policy."},
        {"role": "user", "content": "Hi, I'd like to downgrade my reservation ABC123 from business to economy. "
                                    "My user id is sara_lee_1."},
        {"role": "assistant", "content": "Sure, let me look it up.",
         "tool_calls": [_call("c1", "get_reservation_details", {"reservation_id": "ABC123"})]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_reservation_details", "content": json.dumps(
            {"reservation_id": "ABC123", "user_id": "sara_lee_1", "cabin": "business", "flights": flights,
             "payment_history": [{"payment_id": "credit_card_1", "amount": 900}]})},
        {"role": "assistant", "content": "ABC123 is in business class on flight HAT001. Shall I downgrade it to "
                                         "economy and refund the difference to credit_card_1?"},
        {"role": "user", "content": "Yes, please."},
        {"role": "assistant", "content": None, "tool_calls": [_call("c2", "update_reservation_flights", update)]},
        {"role": "tool", "tool_call_id": "c2", "name": "update_reservation_flights",
         "content": json.dumps({**update, "user_id": "sara_lee_1"})},
        {"role": "assistant", "content": "Done: ABC123 is now in economy."},
    ]
    for step, content in changes.items():
        messages[int(step.removeprefix("step"))]["content"] = content
    return {"id": "synthetic/downgrade", "messages": messages, "tools": TOOLS, "metadata": "{}"}


GOAL = AchievedGoal(start=1, sample_end=9, train_steps=[2, 4, 6, 8], actions=[Action(
    tool="update_reservation_flights", call_step=6, result_step=7, arguments={
        "reservation_id": "ABC123", "cabin": "economy", "flights": [{"flight_number": "HAT001", "date": "2024-05-20"}],
        "payment_id": "credit_card_1"})])


