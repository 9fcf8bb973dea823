"""Preference pairs (DPO) of the package stage (agenther/stages/packaging.py), two kinds, each at the
STEP where the two runs diverge (default, `package.dpo_pairs: "step"`): the runs are aligned
assistant turn by assistant turn from their first user turn; turns that take the same action (the
same tool calls with the same arguments, or both a text reply: paraphrases) are shared history; the
first turn whose action differs (or, while the histories are identical, whose text differs) is the
step. prompt = the chosen run's messages before that turn, chosen = its turn there, rejected = the
other run's turn there: ONE assistant turn each, so no user or tool text is ever a training target.
- natural: a success (chosen) and a failure (rejected) of one task.
- hindsight: prompt opens with [system, hindsight prompt]; chosen = the relabeled sample's turn
  (only a turn it trains on: weight 1), rejected = the turn of a run of the same task that lacks
  some of the chosen's tool calls.
`metadata.prompt_shared` is true when the other run's history up to its turn is the same turn
for turn (tau-bench's simulated user words every trial differently: then false).
`dpo_pairs: "trajectory"` instead pairs whole continuations (everything after the shared
opening, later user turns and tool results included): DPO then also scores that environment
text as if the model wrote it; kept only to reproduce trajectory-level setups.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from agenther.evidence.goal import first_user_index
from agenther.export import formats as exports
from agenther.export.schemas import validate_dpo
from agenther.stages.samples import hindsight_messages, optional_float, sample_meta, trim_trailing


def _canonical_args(arguments: str | None) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return arguments or ""


def tool_evidence(messages: list[dict]) -> frozenset[tuple[str, str]]:
    """What a run did, as (tool name, canonical JSON arguments) of its assistant tool calls."""
    return frozenset(
        (call["name"], _canonical_args(call.get("arguments")))
        for m in messages
        if m["role"] == "assistant"
        for call in m.get("tool_calls") or []
    )


def _turn_key(message: dict) -> tuple:
    """A turn's content without call ids (ids are random per run, so two trials never share them)."""
    calls = tuple((c["name"], _canonical_args(c.get("arguments"))) for c in message.get("tool_calls") or [])
    return (message["role"], message.get("content") or "", calls)


def _remap_call_ids(messages: list[dict], mapping: dict[str, str]) -> list[dict]:
    return [
        {**m, "tool_call_id": mapping.get(m.get("tool_call_id"), m.get("tool_call_id"))}
        if m["role"] == "tool"
        else m
        for m in messages
    ]


def natural_pair(success: list[dict], failure: list[dict]) -> tuple[list, list, list, bool] | None:
    """(prompt, chosen, rejected, prompt_shared) for a success and a failure of one task, or None.

    The prompt is the longest shared opening of the two runs, cut back until it ends on a
    user or tool turn that both runs answer with an assistant turn. It always reaches the first
    user turn: when the runs differ before that (tau-bench's simulated user words its opening
    differently in every trial), the prompt is the success's opening and `prompt_shared` is False.
    """
    fs, ff = first_user_index(success), first_user_index(failure)
    if fs is None or ff is None:
        return None
    common = 0
    while common < min(len(success), len(failure)) and _turn_key(success[common]) == _turn_key(
        failure[common]
    ):
        common += 1
    cut = None
    for k in range(common, fs, -1):  # never shorter than system + first user turn
        if (
            success[k - 1]["role"] in ("user", "tool")
            and k < len(success)
            and k < len(failure)
            and success[k]["role"] == "assistant"
            and failure[k]["role"] == "assistant"
        ):
            cut = k
            break
    if cut is not None:
        # The prompt is the success's copy; the failure's results must answer its call ids.
        mapping = {
            fc["id"]: sc["id"]
            for fm, sm in zip(failure[:cut], success[:cut], strict=True)
            for fc, sc in zip(fm.get("tool_calls") or [], sm.get("tool_calls") or [], strict=False)
        }
        prompt, chosen, rejected = success[:cut], success[cut:], _remap_call_ids(failure[cut:], mapping)
        shared = True
    else:
        prompt, chosen, rejected = success[: fs + 1], success[fs + 1 :], failure[ff + 1 :]
        shared = common >= fs + 1
    chosen, rejected = trim_trailing(chosen), trim_trailing(rejected)
    if not chosen or not rejected or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        return None
    if [_turn_key(m) for m in chosen] == [_turn_key(m) for m in rejected]:
        return None
    return prompt, chosen, rejected, shared


def _action(message: dict) -> tuple:
    """What an assistant turn does: its tool calls (name, canonical arguments); () = a text reply."""
    return tuple((c["name"], _canonical_args(c.get("arguments"))) for c in message.get("tool_calls") or [])


def step_pair(chosen_run: list[dict], other_run: list[dict],
              trained_only: bool = False) -> tuple[list, list, list, bool] | None:
    """(prompt, [chosen turn], [rejected turn], prompt_shared) at the step where two runs diverge.

    Both runs are walked assistant turn by assistant turn from their first user turn; the first
    pair of turns that differ is the step: in what they do (tool calls and arguments, or a text
    reply), or, while the two histories are still the same turn for turn, in any way (None if there is none before either run ends,
    or the chosen turn does not answer a user or tool turn, or with `trained_only` the chosen
    turn has weight 0: a dead end of a hindsight sample is no example to prefer)."""
    fc, fo = first_user_index(chosen_run), first_user_index(other_run)
    if fc is None or fo is None:
        return None
    mine = [i for i in range(fc + 1, len(chosen_run)) if chosen_run[i]["role"] == "assistant"]
    theirs = [j for j in range(fo + 1, len(other_run)) if other_run[j]["role"] == "assistant"]
    for i, j in zip(mine, theirs, strict=False):
        shared = [_turn_key(m) for m in chosen_run[:i]] == [_turn_key(m) for m in other_run[:j]]
        differs = _turn_key(chosen_run[i]) != _turn_key(other_run[j]) if shared else (
            _action(chosen_run[i]) != _action(other_run[j]))
        if not differs:
            continue
        if chosen_run[i - 1]["role"] not in ("user", "tool") or (trained_only and chosen_run[i].get("weight") == 0):
            return None
        return chosen_run[:i], [chosen_run[i]], [other_run[j]], shared
    return None


def hindsight_candidates(chosen_row: dict, same_task: list[dict]) -> Iterator[dict]:
    """The trajectories (by id) of the same task that lack one of the chosen's tool calls.

    Lacking a call, not merely differing: a run that made every call the relabeled run made
    (and more) may well satisfy the hindsight prompt too, so it is no safe negative.
    """
    evidence = tool_evidence(chosen_row["messages"])
    for other in same_task:
        if other["id"] != chosen_row["id"] and evidence - tool_evidence(other["messages"]):
            yield other


def hindsight_rejected(chosen_row: dict, same_task: list[dict]) -> tuple[dict, list[dict]] | None:
    """Trajectory level: the first candidate's whole continuation after its first user turn."""
    for other in hindsight_candidates(chosen_row, same_task):
        fu = first_user_index(other["messages"])
        rejected = trim_trailing(other["messages"][fu + 1 :]) if fu is not None else []
        if rejected and rejected[0]["role"] == "assistant":
            return other, rejected
    return None


def natural_pairs(by_task: dict[str, list[dict]], cap: int, base: dict, counts: dict,
                   level: str = "step") -> list[dict]:
    """Each failure (by id) with the first success (by id) that makes a valid pair; `cap` per task."""
    out = []
    for task in sorted(by_task):
        successes = [r for r in by_task[task] if r.get("success") is True]
        failures = [r for r in by_task[task] if r.get("is_failure") is True and r.get("success") is not True]
        made = 0
        for f in failures:
            if made >= cap:
                break
            for s in successes:
                pair = (step_pair(s["messages"], f["messages"]) if level == "step"
                        else natural_pair(s["messages"], f["messages"]))
                if pair is None:
                    continue
                prompt, chosen, rejected, shared = pair
                meta = sample_meta(s, "natural", base) | {
                    "sample_id": f"natural:{s['id']}|{f['id']}",
                    "chosen_id": s["id"],
                    "rejected_id": f["id"],
                    "prompt_shared": shared,
                    # the losing side's diagnosis: what went wrong in the rejected run
                    "failure_type": f.get("failure_type"),
                    "severity": optional_float(f.get("severity")),
                }
                if _append_valid(out, prompt, chosen, rejected, s, 1.0, meta, counts):
                    counts["dpo_natural"] += 1
                    made += 1
                break
            else:
                if successes:
                    counts["dpo_natural_skipped"] += 1
    return out


def hindsight_pairs(
    kept: list[tuple[dict, float]], by_task: dict[str, list[dict]], base: dict, counts: dict, level: str = "step"
) -> list[dict]:
    out = []
    for r, weight in kept:
        sample = hindsight_messages(r)
        fu = first_user_index(sample)
        found = None
        if level == "step":
            for other in hindsight_candidates(r | {"messages": sample}, by_task.get(r.get("task_key"), [])):
                pair = step_pair(sample, other["messages"], trained_only=True)
                # The step must be one the relabel rests on: the chosen turn makes a call the other
                # run never made. Diverging earlier (asking vs acting, another lookup first) says
                # nothing about the hindsight prompt, and the other run's turn there may be as good.
                if pair is not None and tool_evidence(pair[1]) - tool_evidence(other["messages"]):
                    found = other, pair
                    break
        else:
            rejected_run = hindsight_rejected(r | {"messages": sample}, by_task.get(r.get("task_key"), []))
            chosen = sample[fu + 1 :]
            if rejected_run is not None and chosen and chosen[0]["role"] == "assistant":
                system = [m for m in sample[:fu] if m["role"] == "system"]
                prompt = [*system, {"role": "user", "content": r["hindsight_prompt"]}]
                found = rejected_run[0], (prompt, chosen, rejected_run[1], False)
        if found is None:
            counts["dpo_hindsight_unpaired"] += 1
            continue
        other, (prompt, chosen, rejected, _) = found
        meta = sample_meta(r, "hindsight", base) | {
            "sample_id": f"hindsight:{r['id']}|{other['id']}",
            "chosen_id": r["id"],
            "rejected_id": other["id"],
            "prompt_shared": False,  # neither run saw the hindsight prompt
        }
        if _append_valid(out, prompt, chosen, rejected, r, weight, meta, counts):
            counts["dpo_hindsight"] += 1
    return out


def _append_valid(
    out: list,
    prompt: list,
    chosen: list,
    rejected: list,
    source: dict,
    weight: float,
    meta: dict,
    counts: dict,
) -> bool:
    try:
        row = exports.dpo_row(
            prompt, chosen, rejected, exports.parse_tools(source.get("tools")), weight, meta
        )
        validate_dpo(row)
    except ValueError:
        counts["dpo_invalid"] += 1  # e.g. a tool result without its call: never write a broken pair
        return False
    out.append(row)
    return True
