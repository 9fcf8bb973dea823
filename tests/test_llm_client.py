"""LLMClient's run controls: rate limits, backoff and Retry-After, the budget cap, cost accounting
and the in-flight limit. Clocks and sleeps are injected: nothing here waits for real."""

from __future__ import annotations

import json
import threading
import time

import litellm
import pytest
from conftest import TAU, write_params
from llm_server import Reply

from agenther.cli import main
from agenther.llm import (
    BUDGET_EXHAUSTED,
    Budget,
    BudgetExhausted,
    LLMClient,
    LLMs,
    RateLimiter,
    backoff_delay,
    map_concurrent,
)
from agenther.llm.answers import RelabelAnswer
from agenther.llm.ask import ask
from agenther.params import ParamsError, load_params, params_hash

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _client(server, tmp_path, **kw) -> LLMClient:
    kw.setdefault("model", "openai/local")
    return LLMClient(api_base=server.api_base, api_key="x", cache_dir=tmp_path / "cache", **kw)


def _ask(client: LLMClient, n: int, stage: str = "t") -> None:
    client.complete_json([{"role": "user", "content": f"question {n} " + "x" * 400}], SCHEMA,
                         temperature=0.0, stage=stage)


# -- rate limiter ---------------------------------------------------------------------------------
def test_requests_per_minute_bucket_bursts_then_paces():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)
    assert [limiter.acquire() for _ in range(60)] == [0.0] * 60  # a full bucket: one minute's burst
    assert limiter.acquire() == pytest.approx(1.0)  # then one per second
    assert limiter.acquire() == pytest.approx(1.0)
    clock.now += 10  # idle time refills the bucket
    assert [limiter.acquire() for _ in range(10)] == [0.0] * 10
    assert limiter.acquire() == pytest.approx(1.0)
    assert limiter.waited_s == pytest.approx(3.0)


def test_tokens_per_minute_uses_the_estimate_then_the_real_usage():
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=6000, clock=clock, sleep=clock.sleep)  # 100 tokens/s
    assert limiter.acquire(4000) == 0.0
    assert limiter.acquire(3000) == pytest.approx(10.0)  # 2000 left: 1000 more at 100/s
    # The first call really used 1000 tokens, not 4000: 3000 come back at once.
    limiter.correct(1000 - 4000)
    assert limiter.acquire(3000) == 0.0
    # A call bigger than the whole bucket still runs (after the bucket refills), never hangs.
    clock.now += 120
    assert limiter.acquire(10_000) == 0.0


def test_tokens_per_minute_waits_exactly_for_the_missing_tokens():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=600, clock=clock, sleep=clock.sleep)
    assert limiter.acquire(600) == 0.0
    assert limiter.acquire(150) == pytest.approx(15.0)  # 10 tokens/s
    limiter.correct(+100)  # the second call used 100 more than estimated: the debt delays the next
    assert limiter.acquire(50) == pytest.approx(15.0)


def test_limiter_is_shared_by_threads_without_overdrawing():
    clock = FakeClock()
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            clock.sleep(seconds)

    limiter = RateLimiter(requests_per_minute=30, clock=clock, sleep=sleep)
    map_concurrent(lambda _: limiter.acquire(), range(40), concurrency=4)
    # 30 from the full bucket, then 10 more at 2 s each: the fake clock must have moved >= 20 s.
    assert clock.now >= 20.0 - 1e-6
    with limiter._state.hold() as bucket:
        assert bucket["requests"] > -1e-6  # never more requests than the bucket held


def test_one_limiter_per_provider_shared_by_the_run_clients(tmp_path):
    params = load_params(None, {"llm": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1",
                                        "requests_per_minute": 100, "tokens_per_minute": 10_000}})
    llms = LLMs.from_params(params)
    assert llms.limiter("openai/a", "http://x") is llms.limiter("openai/a", "http://x")
    assert llms.limiter("openai/a", "http://x") is not llms.limiter("openai/b", "http://x")
    assert llms.main().limiter is llms.judge().limiter and llms.main().limiter.rpm == 100
    assert llms.main().budget is llms.budget and llms.main().inflight is llms.inflight
    unlimited = LLMs.from_params(load_params(None, {"llm": {"model": "openai/a", "api_base": "http://x"}}))
    assert unlimited.main().limiter is None


# -- backoff and Retry-After ----------------------------------------------------------------------
def test_backoff_is_exponential_with_jitter_and_capped():
    assert backoff_delay(0, 0.5, 30, rand=lambda: 0.0) == 0.5
    assert backoff_delay(3, 0.5, 30, rand=lambda: 0.0) == 4.0
    assert backoff_delay(3, 0.5, 30, rand=lambda: 0.99) == pytest.approx(7.96)
    assert backoff_delay(10, 0.5, 30, rand=lambda: 0.5) == 45.0  # capped at 30, then jittered
    assert backoff_delay(2, 0.5, 30, retry_after=7.0) == 7.0  # the server's word wins
    assert backoff_delay(2, 0.5, 30, retry_after=600.0) == 30.0


def test_retry_after_and_backoff_are_honoured_on_429_and_5xx(llm_server, tmp_path):
    faults = iter([Reply("slow down", status=429, headers={"Retry-After": "7"}),
                   Reply("busy", status=503),
                   Reply("slow down", status=429, headers={"retry-after-ms": "250"})])
    llm_server.brain = lambda r: next(faults, None) or json.dumps({"ok": True})
    slept: list[float] = []
    client = _client(llm_server, tmp_path, max_retries=3, backoff_s=0.5, sleep=slept.append)
    _ask(client, 0)
    assert len(slept) == 3
    assert slept[0] == 7.0                  # Retry-After in seconds
    assert 1.0 <= slept[1] < 2.0            # no header: 0.5 * 2**1 with jitter in [1, 2)
    assert slept[2] == pytest.approx(0.25)  # retry-after-ms
    assert client.usage["t"].retries == 3 and client.usage["t"].calls == 1


# -- budget -------------------------------------------------------------------------------------
def test_budget_stops_new_calls_but_serves_the_cache(llm_server, tmp_path):
    llm_server.brain = lambda r: json.dumps({"ok": True})
    budget = Budget(tokens=1)  # the first call spends it
    client = _client(llm_server, tmp_path, budget=budget)
    _ask(client, 0)
    assert budget.exhausted() and budget.spent_tokens > 1
    with pytest.raises(BudgetExhausted):
        _ask(client, 1)
    _ask(client, 0)  # answered before: from the cache, free
    assert len(llm_server.requests) == 1
    usage = client.usage["t"]
    assert (usage.calls, usage.cache_hits, usage.budget_refused) == (1, 1, 1)
    # ask() turns the refusal into an answer-less result the stages reject as left undone.
    asked = ask(client, "relabel", RelabelAnswer, stage="t", temperatures=[0.0], attempts=3,
                record="- x", turns="y", feedback="")
    assert asked.budget_exhausted and asked.data is None and asked.error.startswith(BUDGET_EXHAUSTED)
    assert len(llm_server.requests) == 1


def test_budget_params_are_checked_and_change_the_lineage_hash():
    with pytest.raises(ParamsError, match="budget_tokens"):
        load_params(None, {"llm": {"budget_tokens": -1}})
    with pytest.raises(ParamsError, match="concurrency"):
        load_params(None, {"llm": {"concurrency": 0}})
    base = load_params(None)
    assert params_hash(base) != params_hash(load_params(None, {"llm": {"budget_tokens": 1000}}))
    # Rate limits only pace calls: the same outputs, the same hash.
    assert params_hash(base) == params_hash(load_params(None, {"llm": {"requests_per_minute": 10}}))


# -- cost ---------------------------------------------------------------------------------------
def test_offline_price_map_prices_a_known_model_and_not_a_local_one(llm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    prompt_usd, completion_usd = litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=1000,
                                                        completion_tokens=100)
    assert prompt_usd > 0 and completion_usd > 0
    llm_server.brain = lambda r: json.dumps({"ok": True})
    # The declared model is priced from the real usage even though a fake server answered.
    priced = _client(llm_server, tmp_path, model="gpt-4o-mini", budget=Budget(usd=1.0))
    _ask(priced, 0)
    usage = priced.usage["t"]
    expected = sum(litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=usage.prompt_tokens,
                                          completion_tokens=usage.completion_tokens))
    assert usage.cost_usd == pytest.approx(expected) and usage.cost_usd > 0
    assert priced.budget.spent_usd == pytest.approx(expected)
    local = _client(llm_server, tmp_path / "l", model="openai/local")
    _ask(local, 0)
    assert local.usage["t"].cost_usd == 0.0 and local.usage["t"].prompt_tokens > 0


# -- in-flight limit ----------------------------------------------------------------------------
def test_shared_inflight_limit_caps_open_requests(llm_server, tmp_path):
    state = {"open": 0, "max": 0}
    lock = threading.Lock()

    def brain(request):
        with lock:
            state["open"] += 1
            state["max"] = max(state["max"], state["open"])
        time.sleep(0.05)  # hold the request open so that overlaps can happen
        with lock:
            state["open"] -= 1
        return json.dumps({"ok": True})

    llm_server.brain = brain
    client = _client(llm_server, tmp_path, inflight=threading.BoundedSemaphore(2))
    map_concurrent(lambda n: _ask(client, n), range(8), concurrency=6)
    assert len(llm_server.requests) == 8
    assert 1 <= state["max"] <= 2


# -- the budget in a whole run --------------------------------------------------------------------
def _run(tmp_path, server, out: str, cache: str, **llm) -> dict:
    path = write_params(tmp_path / f"params-{out}.yaml", server, cache=tmp_path / cache,
                        llm={"max_retries": 1, "concurrency": 1, **llm})
    code = main(["run", "--input", str(TAU), "--out", str(tmp_path / out), "--limit", "16", "--params", str(path)])
    assert code == 0
    return json.loads((tmp_path / out / "summary.json").read_text())


def _bodies(requests: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in requests}


def test_token_budget_ends_the_run_cleanly_and_a_rerun_reuses_the_answers(tmp_path, llm_server):
    full = _run(tmp_path, llm_server, "full", "cache-full")
    n_full = len(llm_server.requests)
    tokens_full = full["llm"]["budget"]["spent"]["tokens"]
    assert full["llm"]["budget"]["exhausted"] is False and full["llm"]["budget"]["records_left_undone"] == {}
    assert full["llm"]["tokens_per_accepted_sample"] == pytest.approx(tokens_full / full["stages"]["verify"]["out"],
                                                                      abs=0.1)
    assert full["llm"]["cost_per_accepted_sample_usd"] == 0.0  # a local model: no price

    # A budget of a third of the tokens: some records are left undone, counts still reconcile.
    capped = _run(tmp_path, llm_server, "capped", "cache-b", budget_tokens=tokens_full // 3)
    capped_requests = llm_server.requests[n_full:]
    assert 0 < len(capped_requests) < n_full
    budget = capped["llm"]["budget"]
    assert budget["exhausted"] is True and budget["limit"] == {"usd": None, "tokens": tokens_full // 3}
    assert budget["spent"]["tokens"] >= tokens_full // 3
    undone = budget["records_left_undone"]
    assert sum(undone.values()) > 0 and set(undone) <= {"relabel", "verify"}
    for stage, n in undone.items():
        assert capped["stages"][stage]["rejected"][BUDGET_EXHAUSTED] == n
    assert capped["reconciliation"]["ok"], capped["reconciliation"]
    assert capped["llm"]["total"]["budget_refused"] > 0

    # The same cache with a larger budget: the answered calls are not asked again.
    rerun = _run(tmp_path, llm_server, "rerun", "cache-b", budget_tokens=10 * tokens_full)
    rerun_requests = llm_server.requests[n_full + len(capped_requests):]
    assert not _bodies(rerun_requests) & _bodies(capped_requests)
    assert rerun["llm"]["total"]["cache_hits"] >= len(capped_requests)
    assert rerun["llm"]["budget"]["exhausted"] is False and rerun["reconciliation"]["ok"]
    assert rerun["stages"]["verify"]["out"] == full["stages"]["verify"]["out"]


def test_verify_budget_refusal_is_a_budget_rejection(tmp_path, llm_server):
    import polars as pl
    from conftest import ingest, make_params

    from agenther.stages.classify import classify
    from agenther.stages.extract import extract
    from agenther.stages.relabel import relabel
    from agenther.stages.verify import verify

    params = make_params(tmp_path, llm_server)
    extracted = extract(classify(ingest(TAU, limit=12).trajectories, params), params).kept
    client = _client(llm_server, tmp_path)
    relabeled = relabel(extracted, params, client).kept
    # The records the deterministic judges pass (no call): only an LLM judge can decide these.
    rules_only = params.model_copy(deep=True)
    rules_only.verify.judges = ["coverage", "grounding", "policy"]
    passed = verify(relabeled, rules_only, client).kept.filter(pl.col("verified"))["id"]
    undecided = relabeled.filter(pl.col("id").is_in(passed.to_list()))
    assert undecided.height >= 1
    calls = len(llm_server.requests)
    budget = client.budget = Budget(tokens=0)  # spent before judging starts
    out = verify(undecided, params, client)
    assert len(llm_server.requests) == calls  # no judge call started
    assert not any(out.kept["verified"])
    assert out.rejected["reason"].to_list() == [BUDGET_EXHAUSTED] * undecided.height
    assert budget.refused == undecided.height  # each record's first LLM judge was refused, and ended its judging
    assert all(d.startswith(f"trajectory: {BUDGET_EXHAUSTED}") for d in out.rejected["detail"])  # the first LLM judge


# -- per-call work done once ----------------------------------------------------------------------
def test_the_cache_survives_its_folder_being_removed_mid_run(llm_server, tmp_path):
    """Shard folders are made once per process: a cache folder removed under a running client
    (a user cleaning it) must be made again, not turn every write into an error."""
    import shutil

    llm_server.brain = lambda r: json.dumps({"ok": True})
    client = _client(llm_server, tmp_path)
    _ask(client, 1)
    shutil.rmtree(tmp_path / "cache")
    _ask(client, 1)  # a miss: the same shard folder, gone since the first write
    _ask(client, 1)  # a hit again
    assert (client.usage["t"].calls, client.usage["t"].cache_hits) == (2, 1)
    assert len(llm_server.requests) == 2


def test_response_format_follows_the_clients_settings(llm_server, tmp_path):
    """The format kind is resolved once per client, but a changed setting is seen at once."""
    llm_server.brain = lambda r: json.dumps({"ok": True})
    client = _client(llm_server, tmp_path)
    _ask(client, 1)
    client.response_format = "json_schema"
    _ask(client, 2)
    client.response_format = "auto"
    _ask(client, 3)
    formats = [r["response_format"] for r in llm_server.requests]
    assert formats[0] == {"type": "json_object", "schema": SCHEMA} == formats[2]
    assert formats[1]["type"] == "json_schema" and formats[1]["json_schema"]["schema"] == SCHEMA


def test_an_unpriced_model_costs_nothing_on_every_call_and_a_priced_one_keeps_its_price(llm_server, tmp_path):
    llm_server.brain = lambda r: json.dumps({"ok": True})
    local = _client(llm_server, tmp_path / "l", model="openai/local")
    priced = _client(llm_server, tmp_path / "p", model="gpt-4o-mini")
    for n in range(3):  # the unpriced lookup is remembered; prices are not
        _ask(local, n)
        _ask(priced, n)
    assert local.usage["t"].cost_usd == 0.0
    usage = priced.usage["t"]
    expected = sum(litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=usage.prompt_tokens,
                                          completion_tokens=usage.completion_tokens))
    assert usage.calls == 3 and usage.cost_usd == pytest.approx(expected) and expected > 0


def test_another_server_with_the_same_model_name_is_not_answered_from_the_cache(llm_server, tmp_path):
    """The cache key has the api_base of a server named by its model name (`openai/local` on two
    ports may be two different models); the embedded model, named by its file, keeps its key."""
    from llm_server import FakeLLMServer

    llm_server.brain = lambda r: json.dumps({"ok": True})
    first = _client(llm_server, tmp_path)
    _ask(first, 1)
    _ask(first, 1)
    assert (first.usage["t"].calls, first.usage["t"].cache_hits) == (1, 1)
    with FakeLLMServer(lambda r: json.dumps({"ok": False})) as other:
        second = _client(other, tmp_path)  # the same cache folder, the same model name
        _ask(second, 1)
        assert (second.usage["t"].calls, second.usage["t"].cache_hits) == (1, 0) and len(other.requests) == 1
        embedded = _client(other, tmp_path, identity="local/qwen2.5-coder-1.5b")
        moved = _client(llm_server, tmp_path, identity="local/qwen2.5-coder-1.5b")  # the same model, another port
        _ask(embedded, 2)
        _ask(moved, 2)
        assert (moved.usage["t"].calls, moved.usage["t"].cache_hits) == (0, 1)
