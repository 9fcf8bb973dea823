"""tau-bench's airline domain, replayable: the built-in environment (entry point `tau-bench-airline`).

The six write tools' effects are implemented here as tau-bench 7362a17 defines them, check for
check and change for change, because a recorded hash is reproduced only by the same state:
errors leave the state as it was (every check comes before the first change), a booking gets the
id HATHAT (then HATHAU, HATHAV), its flights the database's price and airports, and its payments
come off gift cards and consume certificates; a flight change charges or refunds the fare
difference on one payment method and does not change the reservation's cabin; no write updates
a flight's seats. A call that raises (a missing argument, a wrong type) is an error, as in
tau-bench, whose environment turns any exception into `Error: ...`. Reads change nothing; their
result is an error where tau-bench's would be (unknown arguments, a user or reservation not found).
The state is a copy-on-write view of the initial data (agenther/envs/state_hash.py) and its
digest is tau-bench's `gt_data_hash`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from typing import Any

from agenther.adapters.tau_bench import domain_tools
from agenther.envs import Call, CallResult, Environment
from agenther.envs.state_hash import Overlay
from agenther.envs.tau_airline_data import initial

NEW_RESERVATION_IDS = ("HATHAT", "HATHAU", "HATHAV")  # tau-bench assumes at most 3 bookings a task
CERTIFICATE_IDS = ("certificate_3221322", "certificate_3221323", "certificate_3221324")
BOOKED_AT = "2024-05-15T15:00:00"  # the domain's "now"
INSURANCE_PER_PASSENGER = 30
BAG_PRICE = 50


class ToolError(Exception):
    """A tool's own refusal: `Error: <message>`, nothing changed."""


def book_reservation(s: Overlay, user_id: str, origin: str, destination: str, flight_type: str, cabin: str,
                     flights: list[dict], passengers: list[dict], payment_methods: list[dict], total_baggages: int,
                     nonfree_baggages: int, insurance: str) -> str:
    if not s.has("users", user_id):
        raise ToolError("user not found")
    user = s.get("users", user_id)
    reservation_id = next((r for r in NEW_RESERVATION_IDS[:-1] if not s.has("reservations", r)),
                          NEW_RESERVATION_IDS[-1])
    booked = copy.deepcopy(flights)
    total = 0
    for flight in booked:
        number = flight["flight_number"]
        on_date = _bookable(s, number, flight["date"])
        if on_date["available_seats"][cabin] < len(passengers):
            raise ToolError(f"not enough seats on flight {number}")
        known = s.get("flights", number)
        flight |= {"price": on_date["prices"][cabin], "origin": known["origin"], "destination": known["destination"]}
        total += flight["price"] * len(passengers)
    if insurance == "yes":
        total += INSURANCE_PER_PASSENGER * len(passengers)
    total += BAG_PRICE * nonfree_baggages
    for payment in payment_methods:
        pid, amount = payment["payment_id"], payment["amount"]
        if pid not in user["payment_methods"]:
            raise ToolError(f"payment method {pid} not found")
        method = user["payment_methods"][pid]
        if method["source"] in ("gift_card", "certificate") and method["amount"] < amount:
            raise ToolError(f"not enough balance in payment method {pid}")
    paid = sum(p["amount"] for p in payment_methods)
    if paid != total:
        raise ToolError(f"payment amount does not add up, total price is {total}, but paid {paid}")
    user = s.edit("users", user_id)
    for payment in payment_methods:  # one by one: a certificate listed twice fails half-way, as in tau-bench
        pid = payment["payment_id"]
        if user["payment_methods"][pid]["source"] == "gift_card":
            user["payment_methods"][pid]["amount"] -= payment["amount"]
        elif user["payment_methods"][pid]["source"] == "certificate":
            del user["payment_methods"][pid]
    reservation = {
        "reservation_id": reservation_id, "user_id": user_id, "origin": origin, "destination": destination,
        "flight_type": flight_type, "cabin": cabin, "flights": booked, "passengers": passengers,
        "payment_history": payment_methods, "created_at": BOOKED_AT, "total_baggages": total_baggages,
        "nonfree_baggages": nonfree_baggages, "insurance": insurance,
    }
    s.put("reservations", reservation_id, reservation)
    user["reservations"].append(reservation_id)
    return json.dumps(reservation)


def _bookable(s: Overlay, number: str, date: str) -> dict:
    """The flight's record on `date`, if it can be booked."""
    if not s.has("flights", number):
        raise ToolError(f"flight {number} not found")
    dates = s.get("flights", number)["dates"]
    if date not in dates:
        raise ToolError(f"flight {number} not found on date {date}")
    if dates[date]["status"] != "available":
        raise ToolError(f"flight {number} not available on date {date}")
    return dates[date]


def cancel_reservation(s: Overlay, reservation_id: str) -> str:
    reservation = _reservation(s, reservation_id)
    refunds = [{"payment_id": p["payment_id"], "amount": -p["amount"]} for p in reservation["payment_history"]]
    reservation = s.edit("reservations", reservation_id)
    reservation["payment_history"].extend(refunds)
    reservation["status"] = "cancelled"
    return json.dumps(reservation)


def _reservation(s: Overlay, reservation_id: str) -> dict:
    if not s.has("reservations", reservation_id):
        raise ToolError("reservation not found")
    return s.get("reservations", reservation_id)


def send_certificate(s: Overlay, user_id: str, amount: int) -> str:
    if not s.has("users", user_id):
        raise ToolError("user not found")
    free = [c for c in CERTIFICATE_IDS if c not in s.get("users", user_id)["payment_methods"]]
    if not free:  # tau-bench returns nothing and changes nothing
        raise ToolError("no certificate id left for this user")
    s.edit("users", user_id)["payment_methods"][free[0]] = {"source": "certificate", "amount": amount, "id": free[0]}
    return f"Certificate {free[0]} added to user {user_id} with amount {amount}."


def _payment_method(s: Overlay, reservation: dict, payment_id: str, price: int | float) -> dict:
    """The reservation owner's payment method that pays `price` for a change."""
    methods = s.get("users", reservation["user_id"])["payment_methods"]
    if payment_id not in methods:
        raise ToolError("payment method not found")
    method = methods[payment_id]
    if method["source"] == "certificate":
        raise ToolError("certificate cannot be used to update reservation")
    if method["source"] == "gift_card" and method["amount"] < price:
        raise ToolError("gift card balance is not enough")
    return method


def _charge(s: Overlay, reservation: dict, payment_id: str, price: int | float) -> None:
    """Take `price` off a gift card (other methods are charged outside the database)."""
    if s.get("users", reservation["user_id"])["payment_methods"][payment_id]["source"] == "gift_card":
        s.edit("users", reservation["user_id"])["payment_methods"][payment_id]["amount"] -= price


def update_reservation_baggages(s: Overlay, reservation_id: str, total_baggages: int, nonfree_baggages: int,
                                payment_id: str) -> str:
    reservation = _reservation(s, reservation_id)
    price = BAG_PRICE * max(0, nonfree_baggages - reservation["nonfree_baggages"])
    _payment_method(s, reservation, payment_id, price)
    reservation = s.edit("reservations", reservation_id)
    reservation["total_baggages"] = total_baggages
    reservation["nonfree_baggages"] = nonfree_baggages
    _charge(s, reservation, payment_id, price)
    if price != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": price})
    return json.dumps(reservation)


def update_reservation_flights(s: Overlay, reservation_id: str, cabin: str, flights: list[dict],
                               payment_id: str) -> str:
    reservation = _reservation(s, reservation_id)
    travellers = len(reservation["passengers"])
    new = copy.deepcopy(flights)
    total = 0
    for flight in new:
        # a flight already booked keeps its price, unless the cabin changes
        kept = [f for f in reservation["flights"] if f["flight_number"] == flight["flight_number"]
                and f["date"] == flight["date"] and cabin == reservation["cabin"]]
        if kept:
            flight |= {"price": kept[0]["price"], "origin": kept[0]["origin"], "destination": kept[0]["destination"]}
        else:
            number = flight["flight_number"]
            on_date = _bookable(s, number, flight["date"])
            if on_date["available_seats"][cabin] < travellers:
                raise ToolError(f"not enough seats on flight {number}")
            known = s.get("flights", number)
            flight |= {"price": on_date["prices"][cabin], "origin": known["origin"],
                       "destination": known["destination"]}
        total += flight["price"] * travellers
    total -= sum(f["price"] for f in reservation["flights"]) * travellers
    _payment_method(s, reservation, payment_id, total)
    _charge(s, reservation, payment_id, total)
    reservation = s.edit("reservations", reservation_id)
    reservation["flights"] = new  # the cabin stays as it was, as in tau-bench
    if total != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": total})
    return json.dumps(reservation)


def update_reservation_passengers(s: Overlay, reservation_id: str, passengers: list[dict]) -> str:
    reservation = _reservation(s, reservation_id)
    if len(passengers) != len(reservation["passengers"]):
        raise ToolError("number of passengers does not match")
    reservation = s.edit("reservations", reservation_id)
    reservation["passengers"] = passengers
    return json.dumps(reservation)


WRITES: dict[str, Callable[..., str]] = {f.__name__: f for f in (
    book_reservation, cancel_reservation, send_certificate, update_reservation_baggages,
    update_reservation_flights, update_reservation_passengers)}
LOOKUPS = {"get_user_details": ("user_id", "users", "user not found"),
           "get_reservation_details": ("reservation_id", "reservations", "reservation not found")}


@cache
def read_parameters() -> dict[str, tuple[set[str], set[str]]]:
    """Read tool -> (its parameters, the required ones), from the schemas the agent was given."""
    out = {}
    for tool in json.loads(domain_tools("airline") or "[]"):
        fn = tool["function"]
        if fn["name"] not in WRITES:
            props = fn.get("parameters") or {}
            out[fn["name"]] = (set(props.get("properties") or {}), set(props.get("required") or []))
    return out


class TauAirline(Environment):
    name = "tau-bench-airline"
    formats = ("tau-bench",)

    def __init__(self) -> None:
        self.state: Overlay | None = None

    @classmethod
    def accepts(cls, metadata: dict) -> bool:
        return metadata.get("domain") == "airline"

    def reset(self) -> None:
        self.state = Overlay(initial())

    def result(self, call: Call) -> CallResult:
        if self.state is None:
            self.reset()
        kwargs = copy.deepcopy(call.kwargs)  # the state keeps what it is given (tau-bench stores the lists)
        if call.name in WRITES:
            try:
                return CallResult(ok=True, output=WRITES[call.name](self.state, **kwargs))
            except ToolError as exc:
                return CallResult(ok=False, output=f"Error: {exc}")
            except Exception as exc:  # tau-bench's environment reports any exception the same way
                return CallResult(ok=False, output=f"Error: {exc}")
        return self._read(call.name, kwargs)

    def _read(self, name: str, kwargs: dict[str, Any]) -> CallResult:
        if name not in read_parameters():
            return CallResult(ok=False, output=f"Unknown action {name}")
        allowed, required = read_parameters()[name]
        if kwargs.keys() - allowed or required - kwargs.keys():
            return CallResult(ok=False, output=f"Error: {name} takes {sorted(allowed)}, got {sorted(kwargs)}")
        if name in LOOKUPS:
            key, section, missing = LOOKUPS[name]
            if not isinstance(kwargs[key], str) or not self.state.has(section, kwargs[key]):
                return CallResult(ok=False, output=f"Error: {missing}")
        return CallResult(ok=True, output="")

    def digest(self) -> str:
        if self.state is None:
            self.reset()
        return self.state.digest()
