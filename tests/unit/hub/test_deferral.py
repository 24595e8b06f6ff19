"""The engine and deferred nodes: waiting is not failing, giving up is "not started", abort reaches them."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.messages import Command, encode
from bus.signing import public_key_of, sign_command, verify_fields
from hub.core.engine import DEFER_GRACE_S, AbortRequested, Tick
from tests.unit.hub.test_engine import T0, Fleet, cleared, published


def defer(fleet: Fleet, node: str, reason: str = "update lock held: locks/app.lock") -> None:
    fleet.step(node, -1, "deferred", reason, type_="command")
    fleet.snap(node, "deferred", detail=reason)


def test_the_command_carries_defer_until_only_when_the_rollout_allows_waiting() -> None:
    fleet = Fleet()
    fleet.create(["n1"], max_defer_s=600)
    command = fleet.last("n1")
    assert command.defer_until == command.issued_at + 600
    other = Fleet()
    other.create(["n1"])
    plain = other.last("n1")
    assert plain.defer_until is None
    assert "defer_until" not in json.loads(encode(plain))  # older agents read it as before
    key = Ed25519PrivateKey.generate()
    for cmd in (command, plain):
        fields = json.loads(encode(sign_command(cmd, key)))
        verify_fields(fields, [public_key_of(key)])
        assert Command.model_validate(fields) == sign_command(cmd, key)


def test_a_deferred_node_holds_its_wave_without_failing_then_applies() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"], strategy={"waves": [2, "100%"]}, max_defer_s=3600)
    fleet.succeed("n1")
    defer(fleet, "n2")
    summary = fleet.summary()
    assert summary.nodes["n2"].phase == "deferred"
    assert summary.nodes["n2"].detail == "update lock held: locks/app.lock"
    assert (summary.counts.deferred, summary.counts.failed) == (1, 0)
    assert "n3" not in fleet.sent  # the wave waits for it
    # The node timeout does not apply while deferring: its deadline is defer_until + grace.
    fleet.do(Tick(), at=T0 + 1800 + 1)
    assert fleet.phases()["n2"] == "deferred"
    fleet.step("n2", 0, "running")  # the lock went: it applies
    assert fleet.phases()["n2"] == "applying"
    fleet.snap("n2", "succeeded")
    fleet.succeed("n3")
    assert fleet.state() == "succeeded"
    assert fleet.summary().detail == "succeeded on 3 nodes"


def test_a_node_that_gives_up_is_not_started_not_failed() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], max_defer_s=60)
    fleet.succeed("n1")
    defer(fleet, "n2")
    gave_up = "not started: update lock held (the rollout allows waiting 60 s)"
    actions = fleet.step("n2", -1, "skipped", gave_up, type_="command")
    assert cleared(actions) == ["n2"]
    summary = fleet.summary()
    assert summary.nodes["n2"].phase == "not_started"
    assert (summary.counts.not_started, summary.counts.failed) == (1, 0)
    assert fleet.state() == "succeeded"
    assert fleet.summary().detail == "succeeded on 2 nodes; 1 not started (deferred or offline: not failures)"
    # Its retained "not_started" snapshot arriving after changes nothing (no late-start abort).
    assert published(fleet.snap("n2", "not_started", detail="gave up")) == {}


def test_a_silent_deferred_node_is_not_started_after_its_deadline() -> None:
    fleet = Fleet()
    fleet.create(["n1"], max_defer_s=60)
    defer(fleet, "n1")
    assert fleet.engine.next_deadline() == T0 + 60 + DEFER_GRACE_S
    fleet.do(Tick(), at=T0 + 60 + DEFER_GRACE_S + 1)
    assert fleet.phases()["n1"] == "not_started"
    assert fleet.summary().nodes["n1"].detail.startswith("not started: still deferred after 60 s")
    assert fleet.state() == "succeeded"
    # Should it start after all, it is told to undo (it was withdrawn).
    actions = fleet.step("n1", 0, "running")
    assert published(actions) == {"n1": "abort"}


def test_abort_reaches_a_deferred_node() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], max_defer_s=600)
    fleet.succeed("n1")
    defer(fleet, "n2")
    fleet.do(AbortRequested("r1"))
    assert fleet.last("n1").action == "rollback"
    assert fleet.last("n2").action == "abort"  # it holds the apply in memory: tell it to drop it
    fleet.snap("n1", "rolled_back")
    fleet.snap("n2", "rolled_back", detail="nothing to undo: the apply never started (it was deferred)")
    assert fleet.state() == "rolled_back"
