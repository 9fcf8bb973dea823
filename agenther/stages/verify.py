"""Stage 4: independent judges decide whether a sample fully satisfies its hindsight prompt.

Every judge sees the sample as the trainer will (its window of the run, the relabeler's rewritten
user turns in place: agenther.evidence.goal.sample_messages), not the whole run. Judges (params
verify.judges), deterministic ones first so a rejection costs no call:
- replay: deterministic, where the log's environment can be replayed (agenther/envs; params
  replay.env); elsewhere it does not apply. The sample's trained writes, replayed from the
  initial state, all succeed and reach the run's state at the sample's cut; else `replay_mismatch`
  with the first call that differs (agenther/envs/proof.py);
- coverage: deterministic; the user side asks for every write the sample trains on, before it, and
  the sample meets every requirement of the user side (agenther.evidence.coverage);
- grounding: deterministic; every number, ID, date and name in a rewritten turn occurs in the sample;
- coherence: deterministic; the conversation read turn by turn: no trained turn asks for what the
  user gave or speaks of a write the goal lacks, no user turn contradicts the request, every ID a
  trained call uses was given before it (agenther.evidence.coherence);
- policy: the sample's writes break no rule the agent was given. Where the log carries ground
  truth, extract has already kept every write the correct run would not make out of the goal;
  elsewhere an LLM reads the agent's rules (its system prompt) and the sample's writes;
- trajectory: an LLM reads the (compacted) sample and the prompt, never the relabeler's
  rationale or confidence, and checks agreement with what the user said;
- evidence: an LLM (judge_model) sees only the user side and the sample's tool calls and tool
  results, no narration, and must point every requirement at the tool result that proves it.
Policy `all`: one rejection is final (no fallback path accepts it; remaining judges are
not even asked). Policy `majority`: strictly more than half must accept.
A judge that cannot be asked because the run's LLM budget is spent ends the record's
judging: it is not verified and is rejected as `budget_exhausted` (left undone). A judge whose
answers break its contract (agenther/llm/answers.py) on every attempt has not accepted; a record
that only such judges turned down is rejected as `invalid_llm_answer`, with the validation error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from agenther import progress, schema
from agenther.envs import open_env
from agenther.envs.proof import REPLAY_MISMATCH, env_for, prove
from agenther.evidence import coherence, coverage
from agenther.evidence.goal import (
    describe_action,
    evidence_messages,
    metadata_of,
    rewrites_of,
    sample_messages,
    sample_steps,
)
from agenther.evidence.grounding import ungrounded
from agenther.evidence.render import defuse, render, tool_calls
from agenther.evidence.tools import is_error
from agenther.llm import BUDGET_EXHAUSTED, LLMClient, LLMs, map_concurrent
from agenther.llm.answers import INVALID_LLM_ANSWER, EvidenceAnswer, PolicyAnswer, TrajectoryAnswer
from agenther.llm.ask import Asked, ask
from agenther.params import Params
from agenther.stages.relabel import goal_of, relabel_one, relabel_output

STAGE = "verify"
RULES_CHARS = 6000  # of the agent's system prompt shown to the policy judge

Judgement = dict  # schema.JUDGEMENT: judge, model, accept, confidence, reason


def sample_of(row: dict) -> tuple[list[dict], set[int]]:
    """The sample as the judges read it: as it will be trained on (goal.sample_messages: its window,
    the rewritten user turns in place), plus the results of its writes where the cut ends on a call;
    and the positions in it of the steps that evidence the goal (a transcript keeps them)."""
    goal = goal_of(row)
    goal = goal.model_copy(update={"sample_end": max([goal.sample_end, *(a.result_step + 1 for a in goal.actions)])})
    position = {step: i for i, step in enumerate(sample_steps(row["messages"], goal))}
    evidence = {position[s] for s in goal.evidence_steps() if s in position}
    return sample_messages(row["messages"], goal, rewrites_of(row)), evidence


def user_side(row: dict) -> list[tuple[int, str]]:
    """(run step, text) of the sample's user turns as the trainer sees them."""
    goal, rewrites = goal_of(row), rewrites_of(row)
    return [(i, rewrites.get(i, row["messages"][i].get("content") or ""))
            for i in sample_steps(row["messages"], goal) if row["messages"][i]["role"] == "user"]


def _transcript_tokens(params: Params) -> int:
    return params.verify.transcript_tokens


def judge_replay(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement | None:
    """None (does not apply) where no environment replays the record's log."""
    env = env_for(row, params)
    if env is None:
        return None
    proof = prove(row["messages"], goal_of(row), open_env(env))
    return {"judge": "replay", "model": f"env:{env}", "accept": proof.ok, "confidence": 1.0, "reason": proof.reason}


def judge_coverage(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    missed = coverage.misses(user_side(row), goal_of(row), row, params, rewritten=rewrites_of(row))
    reason = ("the user side asks for every write of the sample, and the sample meets every requirement"
              if not missed else "; ".join(f"{code}: {detail}" for code, detail in missed))
    return {"judge": "coverage", "model": "rules", "accept": not missed, "confidence": 1.0, "reason": reason}


def judge_grounding(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    rewrites = rewrites_of(row)
    written = "\n".join(rewrites.values())
    missing = ungrounded(written, evidence_messages(row["messages"], goal_of(row))) if written else []
    reason = ("no rewritten turn" if not rewrites else
              "every detail occurs in the sample" if not missing else "not in the sample: " + ", ".join(missing))
    return {"judge": "grounding", "model": "rules", "accept": not missing, "confidence": 1.0, "reason": reason}


def judge_coherence(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    goal = goal_of(row)
    turns = coherence.sample_turns(row["messages"], sample_steps(row["messages"], goal), goal, rewrites_of(row))
    found = coherence.defects(turns, goal, row, params)
    reason = ("every turn follows from the request and what the user said before it" if not found else
              "; ".join(f"{d.code}: step {d.step}: {d.detail}" for d in found))
    return {"judge": "coherence", "model": "rules", "accept": not found, "confidence": 1.0, "reason": reason}


def judge_policy(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    goal = goal_of(row)
    if not goal.actions:
        return _ruled("policy", "the sample changes no state")
    if isinstance(metadata_of(row).get("gt_actions"), list):
        return _ruled("policy", "ground truth: writes the correct run does not make were kept out of the goal")
    rules = next((m.get("content") or "" for m in row["messages"] if m["role"] == "system"), "").strip()
    if not rules:
        return _ruled("policy", "the agent was given no rules (no system prompt)")
    actions = "\n".join(f"- step {a.call_step}: {describe_action(a)}" for a in goal.actions)
    asked = ask(judge_llm, "judge_policy", PolicyAnswer, stage=STAGE, temperatures=[0.0], attempts=2,
                rules=defuse(rules[:RULES_CHARS]), actions=defuse(actions))
    if asked.answer is None:
        return _invalid("policy", judge_llm, asked)
    d = asked.answer
    confidence = _confidence(d.confidence)
    violations = [v for v in d.violations if v.strip()]
    accept = d.allowed and not violations and confidence >= _threshold(params)
    reason = ("no rule broken" if accept else
              "policy_violation: " + ("; ".join(violations) or f"allowed={d.allowed}, confidence {confidence}"))
    return {"judge": "policy", "model": judge_llm.name, "accept": accept, "confidence": confidence, "reason": reason}


def proving_steps(messages: list[dict]) -> set[int]:
    """Steps a requirement may cite as its proof: a tool result that is no error, or the call it
    answers (small models cite the CALLS line of the result they mean)."""
    proven = [c for c in tool_calls(messages) if c["result_step"] is not None and not is_error(c["result"])]
    return {c["result_step"] for c in proven} | {c["step"] for c in proven}


def _ruled(judge: str, reason: str) -> Judgement:
    return {"judge": judge, "model": "rules", "accept": True, "confidence": 1.0, "reason": reason}


def judge_trajectory(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    messages, evidence = sample_of(row)
    transcript = render(messages, keep=evidence, budget_tokens=_transcript_tokens(params))
    asked = ask(llm, "judge_trajectory", TrajectoryAnswer, stage=STAGE, temperatures=[0.0], attempts=2,
                request=defuse(row["hindsight_prompt"]), transcript=transcript)
    if asked.answer is None:
        return _invalid("trajectory", llm, asked)
    d = asked.answer
    confidence = _confidence(d.confidence)
    accept = d.satisfied and d.consistent_with_user and confidence >= _threshold(params)
    reason = f"satisfied={d.satisfied}, consistent_with_user={d.consistent_with_user}: {d.reason}"
    return {"judge": "trajectory", "model": llm.name, "accept": accept, "confidence": confidence, "reason": reason}


def judge_evidence(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> Judgement:
    messages, evidence = sample_of(row)
    transcript = render(messages, keep=evidence, roles=("tool",),
                        budget_tokens=_transcript_tokens(params))
    request = "\n".join(text for _, text in user_side(row))
    asked = ask(judge_llm, "judge_evidence", EvidenceAnswer, stage=STAGE, temperatures=[0.0], attempts=2,
                request=defuse(request), transcript=transcript)
    if asked.answer is None:
        return _invalid("evidence", judge_llm, asked)
    d = asked.answer
    requirements = d.requirements
    proof = proving_steps(messages)
    unproven = [r.requirement for r in requirements if not (r.met and r.step is not None and r.step in proof)]
    confidence = _confidence(d.confidence)
    accept = d.all_met and bool(requirements) and not unproven and confidence >= _threshold(params)
    reason = (f"{len(requirements) - len(unproven)}/{len(requirements)} requirements proven by a tool result"
              + (f"; unproven: {unproven}" if unproven else ""))
    return {"judge": "evidence", "model": judge_llm.name, "accept": accept, "confidence": confidence, "reason": reason}


JUDGES: dict[str, Callable[..., Judgement | None]] = {
    "replay": judge_replay,
    "coverage": judge_coverage,
    "grounding": judge_grounding,
    "coherence": judge_coherence,
    "policy": judge_policy,
    "trajectory": judge_trajectory,
    "evidence": judge_evidence,
}


def _undone(judgement: Judgement) -> bool:
    return judgement["reason"].startswith(BUDGET_EXHAUSTED)


def _invalid(judge: str, llm: LLMClient, asked: Asked) -> Judgement:
    """A judge that gave no valid verdict has not accepted: its answer broke the contract
    (reason `invalid_llm_answer: ...`), or the budget was spent first (`budget_exhausted: ...`)."""
    error = asked.error or "no answer"
    reason = error if asked.budget_exhausted else f"{INVALID_LLM_ANSWER}: {error}"
    return {"judge": judge, "model": llm.name, "accept": False, "confidence": 0.0, "reason": reason}


def _invalid_answer(judgement: Judgement) -> bool:
    return not judgement["accept"] and judgement["reason"].startswith(INVALID_LLM_ANSWER)


def _confidence(value: float) -> float:
    return min(1.0, max(0.0, value))


def _threshold(params: Params) -> float:
    return params.verify.judge_confidence_threshold


def decide(judgements: list[Judgement], policy: str, n_judges: int) -> bool:
    accepts = sum(j["accept"] for j in judgements)
    if policy == "all":
        return 0 < n_judges == len(judgements) == accepts  # no judge that applies: not verified
    return accepts * 2 > n_judges


@dataclass
class _Judging:
    """One record's judgements as they come in, judge after judge."""
    row: dict
    judgements: list[Judgement] = field(default_factory=list)
    applied: int = 0  # judges that applied to the record (replay applies only where an environment does)
    undone: bool = False  # a judge could not be asked: the run's budget is spent
    over: bool = False  # no later judge is asked

    def add(self, judgement: Judgement | None, policy: str) -> None:
        if judgement is None:
            return  # the judge does not apply to this record (replay: no environment)
        self.applied += 1
        self.judgements.append(judgement)
        if _undone(judgement):
            self.undone = self.over = True  # budget spent: left undone
        elif policy == "all" and not judgement["accept"]:
            self.over = True  # final: no later judge can overturn it

    def result(self, policy: str) -> dict:
        verified = not self.undone and decide(self.judgements, policy, self.applied)
        return self.row | {"judgements": self.judgements, "verified": verified}


def verify_one(row: dict, params: Params, llm: LLMClient, judge_llm: LLMClient) -> dict:
    policy = params.verify.policy
    judging = _Judging(row)
    for name in params.verify.judges:
        if judging.over:
            break
        judging.add(JUDGES[name](row, params, llm, judge_llm), policy)
    return judging.result(policy)


def _rejection_reason(judgements: list[Judgement]) -> str:
    """budget_exhausted (left undone); invalid_llm_answer when every judge that did not accept gave
    no valid verdict; replay_mismatch when replay did not accept; else rejected_by_<the judges that
    did not accept>."""
    if any(_undone(j) for j in judgements):
        return BUDGET_EXHAUSTED
    refused = [j for j in judgements if not j["accept"]]
    if refused and all(_invalid_answer(j) for j in refused):
        return INVALID_LLM_ANSWER
    if refused and all(j["reason"].startswith(REPLAY_MISMATCH) for j in refused):
        return REPLAY_MISMATCH
    return "rejected_by_" + "+".join(j["judge"] for j in refused)


def check_judges(params: Params) -> None:
    unknown = [n for n in params.verify.judges if n not in JUDGES]
    if unknown:
        raise ValueError(f"unknown judge(s) {unknown}; known: {list(JUDGES)}")


def verify_output(rows: list[dict]) -> schema.StageOutput:
    """Kept: every judged row (verify_one's results, in input order) with its judgements and
    `verified`; rejected: the unverified."""
    rejected = [
        schema.rejection(r["id"], STAGE, _rejection_reason(r["judgements"]),
                         " | ".join(f"{j['judge']}: {j['reason']}" for j in r["judgements"] if not j["accept"]))
        for r in rows if not r["verified"]
    ]
    return schema.StageOutput(schema.frame(rows, schema.VERIFIED), schema.frame(rejected, schema.REJECTION))


def verify(relabeled: pl.DataFrame, params: Params, llm: LLMClient, judge_llm: LLMClient | None = None) -> schema.StageOutput:
    """Kept: every judged row with its judgements and `verified`; rejected: the unverified."""
    check_judges(params)
    judge_llm = judge_llm or llm
    policy = params.verify.policy
    judgings = [_Judging(r) for r in relabeled.to_dicts()]
    # Judge by judge over the records (the same judgements as verify_one's record by record): calls
    # in a row share their template's fixed instructions, which llama.cpp's and providers' prompt
    # caches then reuse.
    judges = params.verify.judges
    for k, name in enumerate(judges):
        todo = [j for j in judgings if not j.over]
        verdicts = map_concurrent(lambda j: JUDGES[name](j.row, params, llm, judge_llm), todo,  # noqa: B023
                                  params.llm.concurrency, records=False)
        for judging, verdict in zip(todo, verdicts, strict=True):
            judging.add(verdict, policy)
            if judging.over or k == len(judges) - 1:
                progress.record_done()  # the record is judged: no later judge is asked
    return verify_output([j.result(policy) for j in judgings])


def step(batch: pl.DataFrame, params: Params, llms: LLMs) -> schema.StageOutput:
    """The stage (agenther/stages/__init__.py)."""
    return verify(batch, params, llms.main(), llms.judge())


# -- relabel and verify fused: no barrier between the stages ----------------------------------
def relabel_verify_one(row: dict, params: Params, llm: LLMClient,
                       judge_llm: Callable[[], LLMClient]) -> tuple[dict | None, dict | None, dict | None]:
    """relabel_one, then at once verify_one on the relabeled row: (kept, rejection, judged)."""
    kept, rejected = relabel_one(row, params, llm)
    return kept, rejected, None if kept is None else verify_one(kept, params, llm, judge_llm())


def relabel_verify(extracted: pl.DataFrame, params: Params, llm: LLMClient, judge_llm: Callable[[], LLMClient],
                   workers: int | None = None) -> tuple[schema.StageOutput, schema.StageOutput]:
    """relabel() then verify() as one concurrent map over the records: each record is judged as
    soon as its relabel passes, so no judge waits for the slowest relabel of the whole table
    (the stage barrier). Same per-record functions, same prompts, same order: the two outputs
    are the tables relabel() and then verify() on its kept rows give.

    `judge_llm`: gives the evidence judge's client when a record reaches the judges (LLMs.judge:
    made once, thread-safe), so no judge model is started for a run whose relabels all fail.
    `workers`: records in progress at once (default llm.concurrency). More workers than
    llm.concurrency only help when the clients share an in-flight limit of llm.concurrency
    requests (LLMClient.inflight, as providers.LLMs gives them): then a record waiting for a
    free request slot holds a thread, not a request, and a slot freed by a record that ended
    early (rejected after one call) goes to the next record's call at once.
    Only the order of the calls differs, so with an LLM budget that runs out the records left
    undone can differ: the pipeline fuses only runs without a budget."""
    check_judges(params)
    results = map_concurrent(lambda r: relabel_verify_one(r, params, llm, judge_llm), extracted.to_dicts(),
                             workers or params.llm.concurrency)
    return (relabel_output([(kept, rejected) for kept, rejected, _ in results]),
            verify_output([judged for _, _, judged in results if judged is not None]))
