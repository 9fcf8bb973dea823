"""The flow on a Dask cluster (prefect-dask's DaskTaskRunner): its task runner, and what a Dask
worker needs to make the run's LLM calls under the run's limits.

- The task runner: `address` connects to a running cluster (its workers must reach the Prefect
  API, the logs, the work folder and the result storage, and have AGENTHER_LLM_API_KEY in their
  environment); without one, a LocalCluster of `workers` processes (one thread each: a batch is
  CPU-bound or already spreads its LLM calls over threads) that is closed with the run.
- LLM clients: providers.LLMs holds locks, an ExitStack and maybe the embedded model server, so it
  does not travel. The flow starts the model server once; each batch task gets a `WorkerLLMs`
  (model, api_base and identity of each model: no API key) and every worker process rebuilds its
  clients once per run from it, with the same cache keys as the flow process's.
- Run-wide limits on the cluster's own primitives (ClusterLimits): the in-flight limit is a
  distributed.Semaphore (the leases of a worker that dies expire after
  distributed.scheduler.locks.lease-timeout, 30 s by default, so a killed worker cannot hold
  slots for ever); the budget's and each provider's rate-limiter counters are a small dict in the
  scheduler's metadata store (Client.get_metadata/set_metadata: unlike a distributed.Variable, a
  first read has a default instead of an error) guarded by a distributed.Lock (a lease-based
  Semaphore of one). The arithmetic is agenther.llm.limits' Budget and RateLimiter; only where
  their counters live differs.
  Prefect's global concurrency limits would do the in-flight limit too, but each slot is an
  HTTP round trip to the Prefect API (and a slot of a killed worker is held until its lease
  ends as well); the scheduler is already there and a round trip to it costs about a millisecond.
- llm.processes (a pool of call processes per process) is refused: on Dask the workers are the
  processes; add workers (--dask-workers) instead.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import distributed
from prefect_dask import DaskTaskRunner

from agenther.llm import LLMs, RateLimiter
from agenther.llm.limits import Budget
from agenther.llm.providers import Endpoint, Limits
from agenther.params import LLM as LLMParams
from agenther.params import Params

TASK_RUNNERS = ("local", "dask")


def task_runner(address: str | None, workers: int) -> DaskTaskRunner:
    """prefect-dask's runner: on the cluster at `address`, or on a LocalCluster of `workers`
    worker processes."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": ":0"})


def check_llm_params(llm_params: LLMParams) -> None:
    """What cannot run on Dask, said before the run starts."""
    if llm_params.processes > 0:
        raise ValueError(
            f"llm.processes={llm_params.processes} does not apply on Dask: the Dask workers are the processes "
            "that spread the calls (their batches run side by side); set llm.processes: 0 and add workers "
            "(--dask-workers, or more workers on the cluster) instead")


def check_reachable(llms: WorkerLLMs, scheduler_address: str | None) -> None:
    """A model server on this machine's loopback (the embedded model, or an api_base on 127.0.0.1)
    is out of reach of workers on other machines: say so before any batch fails on it."""
    if scheduler_address is None or _loopback(urlparse(scheduler_address).hostname):
        return  # a LocalCluster, or a cluster on this machine: its workers share the loopback
    for endpoint in (llms.main, llms.judge):
        if endpoint is not None and endpoint.api_base and _loopback(urlparse(endpoint.api_base).hostname):
            raise ValueError(
                f"the model at {endpoint.api_base} listens on this machine's loopback, which the Dask workers of "
                f"{scheduler_address} cannot reach: set llm.api_base to a model server they can reach "
                "(the embedded local model serves this machine only)")


def _loopback(host: str | None) -> bool:
    return host in (None, "localhost") or (host or "").startswith("127.") or host == "::1"


class ClusterState:
    """agenther.llm.limits.SharedState on the cluster: the values in the scheduler's metadata
    store, one read-modify-write at a time under a distributed.Lock. Made in a worker's task
    thread (where distributed finds the worker's client); usable from any thread after."""

    def __init__(self, name: str):
        self.key = ["agenther", name]
        self._lock = distributed.Lock(f"{name}-lock")
        self._client = distributed.get_client()

    @contextmanager
    def hold(self) -> Iterator[dict]:
        with self._lock:
            values = dict(self._client.get_metadata(self.key, default={}))  # {} the first time: counters at zero
            try:
                yield values
            finally:  # also when the holder raises (a refused call still counts as refused)
                self._client.set_metadata(self.key, values)


class ClusterLimits(Limits):
    """The run's budget, in-flight limit and rate limiters, shared by every worker of the cluster
    (named after the flow run, so two runs on one cluster do not share them)."""

    def __init__(self, llm_params: LLMParams, run: str):
        self.run = run
        budgeted = llm_params.budget_usd is not None or llm_params.budget_tokens is not None
        # An unlimited budget stays in the process: its counters are never read, so no round trips for them
        super().__init__(llm_params, Budget(llm_params.budget_usd, llm_params.budget_tokens,
                                            state=ClusterState(f"agenther-{run}-budget")) if budgeted else None)
        self.inflight = distributed.Semaphore(max_leases=llm_params.concurrency, name=f"agenther-{run}-inflight")

    def new_limiter(self, model: str, api_base: str | None) -> RateLimiter:
        provider = hashlib.sha256(f"{model}\n{api_base}".encode()).hexdigest()[:12]
        # time.time: the buckets' clock must be one every worker shares (monotonic clocks are per machine)
        return RateLimiter(self.rpm, self.tpm, clock=time.time, state=ClusterState(f"agenther-{self.run}-rate-{provider}"))


@dataclass(frozen=True)
class WorkerLLMs:
    """What a batch task on a Dask worker gets instead of the run's LLMs: picklable, no API key."""
    llm_params: str  # params' llm section, as JSON (hashable: it keys the worker's clients)
    main: Endpoint | None  # None: the stage makes no LLM call, and no model server is started for it
    judge: Endpoint | None  # None: the judge is the main model
    run: str  # the flow run: names the cluster-wide limits

    @classmethod
    def of(cls, llms: LLMs, run: str, uses_llm: bool) -> WorkerLLMs:
        """The flow process's `llms`, described; with `uses_llm`, its model server started first."""
        main, judge = llms.endpoints() if uses_llm else (None, None)
        return cls(llms.params.model_dump_json(), main, judge, run)

    def llms(self) -> LLMs:
        """This worker process's LLMs for the run: made by its first batch of the run, then reused."""
        with _MADE_LOCK:
            made = _MADE.get(self)
            if made is None:
                _MADE.clear()  # a new run (or stage's endpoints): the previous clients are done with
                params = Params(llm=LLMParams.model_validate_json(self.llm_params))
                check_llm_params(params.llm)
                limits = ClusterLimits(params.llm, self.run)
                made = (LLMs.connect(params, self.main, self.judge, limits) if self.main is not None
                        else LLMs(params, limits=limits))
                _MADE[self] = made
            return made


_MADE: dict[WorkerLLMs, LLMs] = {}
_MADE_LOCK = threading.Lock()
