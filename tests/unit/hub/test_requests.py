"""Rollout requests decoded once at the edge (hub.requests); the manager's fenced publisher."""

from __future__ import annotations

from typing import Any, cast

import pytest

from bus.errors import BusError, InvalidInput
from bus.messages import RolloutSpec
from bus.mqtt import MqttClient
from bus.plan_view import DEFAULT_PREFLIGHT_TIMEOUT_S
from hub.requests import (
    CreateRollout,
    ListRollouts,
    PlanRollout,
    RolloutOperation,
    plan_request,
    rollout_request,
)
from hub.service import ActivePublisher

SPEC: dict[str, Any] = {"name": "x", "targets": ["n1"], "plan": [{"type": "script", "name": "a.sh"}]}


def test_each_op_becomes_its_typed_request() -> None:
    spec = RolloutSpec.model_validate(SPEC)
    assert rollout_request("create_rollout", SPEC) == CreateRollout(spec)
    assert rollout_request("plan", SPEC) == PlanRollout(spec, DEFAULT_PREFLIGHT_TIMEOUT_S, True)
    assert rollout_request("list", {}) == ListRollouts()
    for op in ("abort", "rollback", "pause", "resume", "show"):
        assert rollout_request(op, {"rollout": "r1"}) == RolloutOperation(op, "r1")
    options = {"spec": SPEC, "preflight_timeout_s": 3, "preflight": False}
    assert plan_request(options) == PlanRollout(spec, 3.0, False)


def test_the_spec_is_filled_in_once_with_its_defaults() -> None:
    request = rollout_request("create_rollout", SPEC)
    assert isinstance(request, CreateRollout)
    assert request.spec.require_online is True
    assert request.spec.idempotency_key is None


@pytest.mark.parametrize(
    ("op", "body", "message"),
    [
        ("create_rollout", {**SPEC, "plan": []}, "invalid rollout spec: plan"),
        ("create_rollout", [], "invalid rollout spec"),
        ("plan", "spec", "a plan request takes a RolloutSpec"),
        ("abort", {}, "rollout: a rollout id is required"),
        ("show", {"rollout": ""}, "rollout: a rollout id is required"),
        ("show", {"rollout": 7}, "rollout: a rollout id is required"),
        ("nodes", {}, "unknown rollout op 'nodes'"),
        ("drop_tables", {}, "unknown rollout op 'drop_tables'"),
    ],
)
def test_a_bad_request_is_refused_naming_the_problem(op: str, body: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        rollout_request(op, body)


class _Client:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | str, int, bool]] = []

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, wait: bool = False
    ) -> None:
        self.sent.append((topic, payload, qos, retain))


async def test_the_active_publisher_refuses_once_the_hub_stands_by() -> None:
    client = _Client()
    active = ActivePublisher(cast(MqttClient, client), "hub-a")
    await active.publish("t/1", b"x", qos=1, retain=True)
    assert client.sent == [("t/1", b"x", 1, True)]
    active.close()
    # A stopping manager's last summaries never reach the broker under a term no longer ours.
    with pytest.raises(BusError, match="hub hub-a is standing by"):
        await active.publish("t/2", b"y")
    assert client.sent == [("t/1", b"x", 1, True)]
