"""Replayable environments: the agent's world, run again from its initial state.

Where the agent's environment can be replayed, a sample is proven instead of judged: its writes,
run from the initial state, must succeed and reach the state the original run reached
(agenther/envs/proof.py), and a hindsight goal with the writes that achieve it is a task with a
verifiable reward (agenther/export/tasks.py).

An environment is a plugin: a subclass of `Environment` named by an entry point in the group
``agenther.envs`` (pyproject.toml ``[project.entry-points."agenther.envs"]``). The built-in one,
tau-bench's airline domain (agenther/envs/tau_airline.py), is registered the same way. A user
with their own simulator adds, in their package's pyproject.toml::

    [project.entry-points."agenther.envs"]
    my-sim = "my_package.sim:MySim"

Which environment replays a record: params ``replay.env`` names one for every record, ``none``
turns replay off, and ``auto`` (the default) picks the environment whose `formats` include the
record's source format and that `accepts` its metadata.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cache
from typing import Any, ClassVar

from pydantic import BaseModel

GROUP = "agenther.envs"
AUTO, NONE = "auto", "none"


class EnvError(ValueError):
    """An environment cannot be loaded or used; the message says what to do."""


class Call(BaseModel):
    """One tool call, in tau-bench's action shape."""

    name: str
    kwargs: dict[str, Any]


class CallResult(BaseModel):
    ok: bool
    output: str  # what the tool returned, or the error


class Replay(BaseModel):
    digest: str  # the state after the calls
    results: list[CallResult]  # one per call, in order


class Environment(ABC):
    """A world the agent's calls can be replayed in, from its initial state.

    Instances hold one replay's state: make one per thread (`open_env`); what all replays share
    (the initial data) belongs at class or module level."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]] = ()  # source formats `auto` picks it for

    @classmethod
    def accepts(cls, metadata: dict) -> bool:
        """Whether a record of one of `formats` ran in this environment (e.g. its domain)."""
        return True

    @abstractmethod
    def reset(self) -> None:
        """Back to the initial state."""

    @abstractmethod
    def result(self, call: Call) -> CallResult:
        """Apply one call to the current state: ok and what it returned, or the error."""

    @abstractmethod
    def digest(self) -> str:
        """A digest of the whole current state: equal states, equal digests."""

    def replay(self, calls: Sequence[Call]) -> Replay:
        """The calls run in order from the initial state: the state reached and each call's result."""
        self.reset()
        results = [self.result(c) for c in calls]
        return Replay(digest=self.digest(), results=results)


@cache
def registered() -> dict[str, importlib.metadata.EntryPoint]:
    """name -> entry point of every installed environment (read once per process: scanning the
    installed distributions takes tens of milliseconds)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


@cache
def env_class(name: str) -> type[Environment]:
    found = registered()
    if name not in found:
        raise EnvError(f"unknown environment {name!r}: installed are {sorted(found) or 'none'} "
                       f"(entry point group {GROUP!r}; after changing pyproject.toml, reinstall the package)")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise EnvError(f"environment {name!r} ({found[name].value}) is not an agenther.envs.Environment subclass")
    return cls


def open_env(name: str) -> Environment:
    """A fresh instance (one replay's state) of the environment `name`."""
    return env_class(name)()


def choose(source_format: str | None, metadata: dict, choice: str) -> str | None:
    """The environment that replays a record (see the module docstring), or None."""
    if choice == NONE:
        return None
    if choice != AUTO:
        return choice
    for name in sorted(registered()):
        cls = env_class(name)
        if source_format in cls.formats and cls.accepts(metadata):
            return name
    return None
