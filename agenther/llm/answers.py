"""The contracts of LLM answers: one pydantic model per prompt template, nested fields included.

`ask()` validates every answer against its model before a stage reads it, so a malformed answer
(wrong nested types, missing fields, extra nesting, numbers that do not parse, null) is an
`invalid_llm_answer` with the validation error, never a traceback. The JSON schema sent to the
provider is the model's own (`schema_of`): llama.cpp turns it into a grammar, hosted providers
get it as a strict json_schema. Each model's schema title is its prompt template's name, so
whoever reads a request (a log, the tests' scripted server) can tell which prompt it carries.

Validation is pydantic's lax mode: "0.9" is a number and "false" a boolean, as a reader would
take them; "high", true-as-a-number, NaN and null are not. Keys an answer adds beyond its model
are ignored (small models add a rationale); the schema sent still forbids them.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.json_schema import SkipJsonSchema

from agenther.schema import ACHIEVEMENT_KINDS, FAILURE_TYPES, NOT_A_FAILURE

INVALID_LLM_ANSWER = "invalid_llm_answer"  # the rejection reason of a record whose answer is unusable


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # bool is an int in Python; true is no confidence or step number
        raise ValueError("a boolean is not a number")
    return value


Number = Annotated[float, BeforeValidator(_not_a_boolean), AllowInfNan(False)]
Integer = Annotated[int, BeforeValidator(_not_a_boolean)]


class Answer(BaseModel):
    # additionalProperties false in the schema sent (OpenAI's strict json_schema requires it; for
    # llama.cpp's grammar it is the same as leaving it out); extra keys in an answer are ignored.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})


class ClassifyAnswer(Answer):
    model_config = ConfigDict(title="classify")
    failure_type: Literal[(*FAILURE_TYPES, NOT_A_FAILURE)]  # type: ignore[valid-type]
    severity: Number
    recoverable: bool
    reason: str


class Achievement(Answer):
    text: str
    steps: list[Integer]
    kind: Literal[ACHIEVEMENT_KINDS]  # type: ignore[valid-type]


class ExtractAnswer(Answer):
    model_config = ConfigDict(title="extract")
    achievements: list[Achievement]


class TurnText(Answer):
    turn: Integer  # the TURN's number in the prompt
    text: str


class RelabelAnswer(Answer):
    model_config = ConfigDict(title="relabel")
    turns: list[TurnText]  # the rewritten user turns, one per TURN asked for
    confidence: Number
    # Not asked for (not in the schema sent); kept as the record's relabel_rationale when given.
    rationale: SkipJsonSchema[Any] = None


class PolicyAnswer(Answer):
    model_config = ConfigDict(title="judge_policy")
    violations: list[str]
    allowed: bool
    confidence: Number


class TrajectoryAnswer(Answer):
    model_config = ConfigDict(title="judge_trajectory")
    satisfied: bool
    consistent_with_user: bool
    confidence: Number
    reason: str


class Requirement(Answer):
    requirement: str
    step: Integer | None
    met: bool


class EvidenceAnswer(Answer):
    model_config = ConfigDict(title="judge_evidence")
    requirements: list[Requirement]
    all_met: bool
    confidence: Number


A = TypeVar("A", bound=Answer)


@functools.cache
def schema_of(model: type[Answer]) -> dict:
    """The JSON schema sent to the provider (computed once per model; do not mutate it)."""
    return model.model_json_schema()


def validate(model: type[A], data: object) -> tuple[A | None, str | None]:
    """(the answer, None) when `data` fits `model`, else (None, what is wrong with it)."""
    try:
        return model.model_validate(data), None
    except ValidationError as exc:
        return None, describe(model, exc)


def describe(model: type[Answer], exc: ValidationError, most: int = 3) -> str:
    """One line: which fields are wrong and how, e.g.
    `not a valid judge_evidence answer: requirements.0: Input should be a valid dictionary (got 'x')`."""
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(map(str, e['loc'])) or '(answer)'}: {e['msg']} (got {_short(e.get('input'))})"
             for e in errors[:most]]
    more = f"; and {len(errors) - most} more" if len(errors) > most else ""
    return f"not a valid {model.model_config.get('title') or model.__name__} answer: " + "; ".join(parts) + more


def _short(value: object, chars: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."
