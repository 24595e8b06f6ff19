"""Rollout requests, decoded and validated once, at the edge that received them.

The MQTT ``hub/request`` path turns a request's ``op`` and ``body`` into one
of these with ``rollout_request``; the HTTP bridge builds them from the body it
read and validated itself (its errors name every field). The hub and its
rollout manager take only these types: nothing behind the edge validates a
spec again.

    CreateRollout(spec)                     create_rollout: a RolloutSpec
    PlanRollout(spec, timeout_s, ask)       plan: a spec, or {"spec", "preflight_timeout_s", "preflight"}
    RolloutOperation(op, rollout)           abort, rollback, pause, resume, show: {"rollout": id}
    ListRollouts()                          list
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import ValidationError

from bus.errors import InvalidInput
from bus.messages import RolloutSpec, describe
from bus.plan_view import DEFAULT_PREFLIGHT_TIMEOUT_S, MAX_PREFLIGHT_TIMEOUT_S

__all__ = [
    "CreateRollout",
    "ListRollouts",
    "OperationName",
    "PlanRollout",
    "RolloutOperation",
    "RolloutRequest",
    "plan_request",
    "rollout_request",
    "rollout_spec",
]

OperationName = Literal["abort", "rollback", "pause", "resume", "show"]
_OPERATIONS: dict[str, OperationName] = {name: name for name in get_args(OperationName)}
_PLAN_OPTIONS = frozenset({"spec", "preflight_timeout_s", "preflight"})


@dataclass(frozen=True)
class CreateRollout:
    """Start a rollout of ``spec`` (its ``idempotency_key`` may name an earlier one)."""

    spec: RolloutSpec


@dataclass(frozen=True)
class PlanRollout:
    """The plan of ``spec`` without starting it; ``ask``: run each online target's pre-flight."""

    spec: RolloutSpec
    timeout_s: float = DEFAULT_PREFLIGHT_TIMEOUT_S
    ask: bool = True


@dataclass(frozen=True)
class RolloutOperation:
    """``op`` on the rollout named by ``rollout`` (an id or a unique prefix of one).

    ``show`` may ask for one page of the rollout's nodes (sorted by id): ``offset``
    and ``limit`` (a big rollout's whole reply exceeds the payload limit over MQTT).
    """

    op: OperationName
    rollout: str
    offset: int = 0
    limit: int | None = None


@dataclass(frozen=True)
class ListRollouts:
    """Every rollout's summary, newest first."""


RolloutRequest = CreateRollout | PlanRollout | RolloutOperation | ListRollouts


def rollout_spec(data: Any) -> RolloutSpec:
    """``data`` as a RolloutSpec; InvalidInput naming the first offending field otherwise."""
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid rollout spec: {describe(exc, data)}") from exc


def rollout_request(op: str, body: Any) -> RolloutRequest:
    """The typed request of a rollout ``op`` and its JSON ``body``.

    Raises:
        InvalidInput: an op that is not a rollout op, or a body it does not take
            (the message names the field).
    """
    if op == "create_rollout":
        return CreateRollout(rollout_spec(body))
    if op == "plan":
        return plan_request(body)
    if op == "list":
        return ListRollouts()
    name = _OPERATIONS.get(op)
    if name is None:
        raise InvalidInput(f"unknown rollout op {op[:40]!r}")
    rollout = body.get("rollout") if isinstance(body, Mapping) else None
    if not isinstance(rollout, str) or not rollout:
        raise InvalidInput("rollout: a rollout id is required")
    if name != "show" or not ({"offset", "limit"} & set(body)):
        return RolloutOperation(name, rollout)
    offset, limit = body.get("offset", 0), body.get("limit")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidInput("offset must be a non-negative integer")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidInput("limit must be a positive integer")
    return RolloutOperation(name, rollout, offset, limit)


def plan_request(body: Any) -> PlanRollout:
    """A ``plan`` body: a RolloutSpec, or the spec with pre-flight options."""
    if not isinstance(body, Mapping):
        raise InvalidInput("a plan request takes a RolloutSpec")
    if "spec" not in body:
        return PlanRollout(rollout_spec(body))
    extra = set(body) - _PLAN_OPTIONS
    if extra:
        raise InvalidInput(f"unknown plan option(s): {', '.join(sorted(extra))[:120]}")
    timeout = body.get("preflight_timeout_s", DEFAULT_PREFLIGHT_TIMEOUT_S)
    ask = body.get("preflight", True)
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not is_number or not 0 < timeout <= MAX_PREFLIGHT_TIMEOUT_S:
        raise InvalidInput(f"preflight_timeout_s must be above 0 and at most {MAX_PREFLIGHT_TIMEOUT_S:g}")
    if not isinstance(ask, bool):
        raise InvalidInput("preflight must be true or false")
    return PlanRollout(rollout_spec(body["spec"]), float(timeout), ask)
