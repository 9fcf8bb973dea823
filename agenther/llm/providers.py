"""Which language models a run uses, built from params: the embedded local model by default,
any litellm model by configuration. The thin seam between the stages and the providers."""

from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass

from agenther.judges import JUDGE_MODELS
from agenther.llm.cache import cache_location
from agenther.llm.client import LLMClient
from agenther.llm.limits import Budget, RateLimiter
from agenther.llm.transport import call_litellm
from agenther.llm.usage import Usage
from agenther.params import LLM as LLMParams
from agenther.params import Params

LOCAL = "local"


class Limits:
    """What every client of a run shares: one Budget (llm.budget_usd / llm.budget_tokens), one
    in-flight limit (llm.concurrency requests open at once) and one RateLimiter per provider
    (model + api_base, llm.requests_per_minute / llm.tokens_per_minute). These hold across the
    threads of this process; tasks/dask.py's ClusterLimits holds them across a Dask cluster's workers."""

    def __init__(self, llm_params: LLMParams, budget: Budget | None = None):
        self.budget = budget if budget is not None else Budget.from_params(llm_params)
        self.inflight = threading.BoundedSemaphore(llm_params.concurrency)
        self.rpm, self.tpm = llm_params.requests_per_minute, llm_params.tokens_per_minute
        self._limiters: dict[tuple[str, str | None], RateLimiter] = {}
        self._lock = threading.Lock()

    def limiter(self, model: str, api_base: str | None) -> RateLimiter | None:
        """The provider's rate limiter (one per model + api_base), or None without limits."""
        if not self.rpm and not self.tpm:
            return None
        with self._lock:
            if (model, api_base) not in self._limiters:
                self._limiters[(model, api_base)] = self.new_limiter(model, api_base)
            return self._limiters[(model, api_base)]

    def new_limiter(self, model: str, api_base: str | None) -> RateLimiter:
        return RateLimiter(self.rpm, self.tpm)


@dataclass(frozen=True)
class Endpoint:
    """Where a client's calls go and what its cache keys call the model, without its API key:
    what another process needs to make the same client (a Dask worker: tasks/dask.py), which
    reads the key from its own environment (AGENTHER_LLM_API_KEY), as this one does."""
    model: str
    api_base: str | None
    identity: str | None

    @classmethod
    def of(cls, client: LLMClient) -> Endpoint:
        return cls(client.model, client.api_base, client.identity)


class LLMs:
    """The relabeling model and the judge model, created on first use.

    With llm.model == "local" and no api_base, the project's own llama.cpp server is
    started at the first call that needs it and stopped when the run ends.

    The clients share one Budget (llm.budget_usd / llm.budget_tokens), one in-flight
    semaphore (llm.concurrency) and, per provider (model + api_base), one RateLimiter
    (llm.requests_per_minute / llm.tokens_per_minute), and send their calls from this process
    or, with llm.processes > 0, through the process's pool of worker processes."""

    def __init__(self, params: Params, clients: tuple[LLMClient, LLMClient | None] | None = None,
                 limits: Limits | None = None):
        self.params = params.llm
        self._stack = ExitStack()
        self._main, self._judge = clients if clients else (None, None)
        given = self._main.budget if self._main is not None else None
        self.limits = limits if limits is not None else Limits(self.params, given)
        self.budget, self.inflight = self.limits.budget, self.limits.inflight
        self._made = threading.RLock()  # guards the lazy creation of the clients
        self._views: list[LLMs] = []
        self.transport = call_litellm
        if self.params.processes > 0:
            from agenther.llm.call_pool import pooled_transport

            self.transport = pooled_transport(self.params.processes)

    @classmethod
    def from_params(cls, params: Params) -> LLMs:
        return cls(params)

    @classmethod
    def of(cls, params: Params, main: LLMClient, judge: LLMClient | None = None) -> LLMs:
        return cls(params, (main, judge))

    @classmethod
    def connect(cls, params: Params, main: Endpoint, judge: Endpoint | None, limits: Limits) -> LLMs:
        """Clients for endpoints another process resolved (`endpoints()`): the same models and
        cache keys, this process's API key, the given run-wide limits. Starts no model server."""
        llms = cls(params, limits=limits)
        llms._main = llms._client_for(main)
        llms._judge = llms._client_for(judge) if judge is not None else None
        return llms

    def endpoints(self) -> tuple[Endpoint, Endpoint | None]:
        """The main model's and (when another) the judge model's endpoints, starting the embedded
        model server if the run uses it: that server lives as long as this LLMs."""
        main, judge = self.main(), self.judge()
        return Endpoint.of(main), (None if judge is main else Endpoint.of(judge))

    def __enter__(self) -> LLMs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def main(self) -> LLMClient:
        with self._made:  # callers may be pool threads: one client (one model server) per run
            if self._main is None:
                self._main = self._client(self.params.model)
            return self._main

    def judge(self) -> LLMClient:
        with self._made:
            if self._judge is None:
                judge_model = self.params.judge_model
                self._judge = self._client(judge_model) if judge_model else self.main()
            return self._judge

    def main_name(self) -> str:
        return self._main.name if self._main else self._declared(self.params.model)

    def judge_names(self, params: Params) -> list[str]:
        judge = self._judge.name if self._judge else self._declared(self.params.judge_model or
                                                                     self.params.model)
        names = {"rules": "rules", "environment": "environment", "main": self.main_name(), "judge": judge}
        return [names[JUDGE_MODELS[j]] for j in params.verify.judges]

    def view(self) -> LLMs:
        """The same clients (model server, response cache, budget, limits) with usage counters of
        their own, made on first use: one batch's accounting (agenther/runner.py). The run's
        `usage()` still counts every call a view makes."""
        return _View(self)

    def usage(self) -> dict[str, Usage]:
        merged: dict[str, Usage] = {}
        clients = [c for owner in (self, *self._views) for c in (owner._main, owner._judge) if c is not None]
        for client in {id(c): c for c in clients}.values():
            for stage, u in client.usage.items():
                merged.setdefault(stage, Usage()).add(u)
        return merged

    def notes(self) -> list[str]:
        notes = []
        if self.main_name().startswith("local/"):
            notes.append(
                f"Relabeling ran on the small embedded model {self.main_name()}. Small models often restate the "
                "failed goal or invent details; the confidence gate, the goal-similarity check and the judges "
                "reject those, so expect a low acceptance rate. Use a stronger model (llm.model) for volume."
            )
        if not self.params.judge_model:
            notes.append("Judges share the relabeling model (different prompts and evidence, plus the "
                         "deterministic coverage and grounding judges); set llm.judge_model for a different "
                         "judge model.")
        return notes

    # -- internals --------------------------------------------------------------------------
    def _declared(self, model: str) -> str:
        return f"local/{self.params.local_model}" if model == LOCAL and not self.params.api_base else model

    def limiter(self, model: str, api_base: str | None) -> RateLimiter | None:
        """The provider's rate limiter (one per model + api_base), or None without limits."""
        return self.limits.limiter(model, api_base)

    def _common(self) -> dict:
        """The client settings every model of the run shares."""
        p = self.params
        return {
            "cache_dir": cache_location(p.cache_dir),
            "max_tokens": p.max_tokens,
            "timeout_s": p.timeout_s,
            "max_retries": p.max_retries,
            "budget": self.budget,
            "inflight": self.inflight,
            "transport": self.transport,
        }

    def _client_for(self, endpoint: Endpoint) -> LLMClient:
        return LLMClient(model=endpoint.model, api_base=endpoint.api_base, identity=endpoint.identity,
                         api_key=_api_key(endpoint.model, endpoint.api_base),
                         limiter=self.limiter(endpoint.model, endpoint.api_base), **self._common())

    def _client(self, model: str) -> LLMClient:
        p, common = self.params, self._common()
        if model == LOCAL and not p.api_base:
            from agenther.llm.server import LocalLLMServer

            server = self._stack.enter_context(LocalLLMServer(p.local_model, n_ctx=max(4096, p.context_tokens + 1024)))
            return LLMClient(model=server.model, api_base=server.api_base, api_key="local",
                             identity=f"local/{p.local_model}",
                             limiter=self.limiter(server.model, server.api_base), **common)
        if model == LOCAL:  # a llama.cpp (or other OpenAI-compatible) server the user runs
            model = "openai/local"
        return LLMClient(model=model, api_base=p.api_base, api_key=_api_key(model, p.api_base),
                         limiter=self.limiter(model, p.api_base), **common)


def _api_key(model: str, api_base: str | None) -> str | None:
    """The key from this process's environment (never from params, never passed between processes)."""
    api_key = os.environ.get("AGENTHER_LLM_API_KEY")
    if api_key is None and api_base and model.startswith("openai/") and "OPENAI_API_KEY" not in os.environ:
        api_key = "none"  # OpenAI-compatible local servers want some key and ignore it
    return api_key


class _View(LLMs):
    """LLMs.view(): copies of the parent's clients, made when first asked for, with their own usage."""

    def __init__(self, parent: LLMs):
        self.__dict__.update(parent.__dict__)
        self._parent, self._main, self._judge, self._views = parent, None, None, []
        self._made = threading.RLock()
        with parent._made:
            parent._views.append(self)

    def __exit__(self, *exc: object) -> None:
        pass  # the parent owns the model servers

    def main(self) -> LLMClient:
        with self._made:
            if self._main is None:
                self._main = dataclasses.replace(self._parent.main(), usage={}, _lock=threading.Lock())
            return self._main

    def judge(self) -> LLMClient:
        with self._made:
            if self._judge is None:
                judge = self._parent.judge()
                self._judge = self.main() if judge is self._parent.main() else dataclasses.replace(
                    judge, usage={}, _lock=threading.Lock())
            return self._judge
