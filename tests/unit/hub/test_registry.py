"""The registry's presence rules, with an injected ``now``."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from bus.messages import Heartbeat, Inventory, JobRef, NodeState, TargetLabels
from hub.core.registry import NodeInfo, Registry, Transition, _beaten


def birth(node: str = "n1", session: str = "s1", **extra: Any) -> NodeState:
    return NodeState(node=node, state="online", session=session, reason="birth", **extra)


def will(node: str = "n1", session: str = "s1", reason: str = "lost") -> NodeState:
    return NodeState(node=node, state="offline", session=session, reason=reason)


def beat(node: str = "n1", session: str = "s1", seq: int = 0, **extra: Any) -> Heartbeat:
    return Heartbeat(node=node, session=session, seq=seq, ts=0.0, **extra)


def test_birth_makes_a_node_online_with_its_details() -> None:
    reg = Registry(5.0)
    state = birth(
        labels={"role": "web"},
        inventory=Inventory(services={"app": "1.0"}),
        agent_version="0.1.0",
        started_at=90.0,
        heartbeat_s=2.0,
    )
    assert reg.on_state(state, 100.0) == Transition("n1", True, "birth")
    info = reg.get("n1")
    assert info is not None
    assert info.online
    assert info.session == "s1"
    assert info.last_seen == 100.0
    assert dict(info.labels) == {"role": "web"}
    assert info.inventory.services == {"app": "1.0"}
    assert info.agent_version == "0.1.0"
    assert info.heartbeat_s == 2.0
    assert reg.is_online("n1")
    assert not reg.is_online("n2")


def test_a_second_birth_of_an_online_node_is_no_transition_but_updates_it() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(labels={"v": "1"}), 100.0)
    assert reg.on_state(birth(session="s2", labels={"v": "2"}), 101.0) is None
    info = reg.get("n1")
    assert info is not None
    assert info.session == "s2"
    assert dict(info.labels) == {"v": "2"}


def test_will_of_the_current_session_marks_offline() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 100.0)
    assert reg.on_state(will(), 101.0) == Transition("n1", False, "lost")
    assert not reg.is_online("n1")
    info = reg.get("n1")
    assert info is not None
    assert info.offline_reason == "lost"
    assert info.since == 101.0


def test_shutdown_is_reported_as_shutdown() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 100.0)
    assert reg.on_state(will(reason="shutdown"), 101.0) == Transition("n1", False, "shutdown")


def test_stale_will_of_an_older_session_is_ignored() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(session="old"), 100.0)
    reg.on_state(birth(session="new"), 101.0)  # reconnected before the broker sent the old will
    assert reg.on_state(will(session="old"), 102.0) is None
    assert reg.is_online("n1")
    assert reg.on_state(will(session="new"), 103.0) == Transition("n1", False, "lost")


def test_a_will_from_an_unknown_node_lists_it_offline() -> None:
    reg = Registry(5.0)
    state = NodeState(node="n9", state="offline", session="s", reason="lost", labels={"a": "b"})
    assert reg.on_state(state, 100.0) is None
    assert reg.nodes() == ["n9"]
    assert not reg.is_online("n9")
    assert reg.to_api("n9")["labels"] == {"a": "b"}


def test_replayed_birth_of_an_ended_session_does_not_resurrect() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 100.0)
    reg.on_state(will(), 101.0)
    assert reg.on_state(birth(), 102.0) is None
    assert not reg.is_online("n1")
    # A new connection does come back.
    assert reg.on_state(birth(session="s2"), 103.0) == Transition("n1", True, "birth")


def test_three_missed_heartbeats_expire_a_node() -> None:
    reg = Registry(5.0, grace_s=0.5)
    reg.on_state(birth(heartbeat_s=1.0), 100.0)
    for i in range(5):
        assert reg.on_heartbeat(beat(seq=i), 101.0 + i) is None
        assert reg.expire(101.0 + i) == []
    # last heard at 105.0; 3 x 1.0 + 0.5 grace -> still online at 108.5, offline after
    assert reg.expire(108.5) == []
    assert reg.is_online("n1")
    assert reg.expire(108.6) == [Transition("n1", False, "missed heartbeats")]
    assert not reg.is_online("n1")
    assert reg.expire(200.0) == []  # reported once


def test_expiry_uses_the_hub_default_when_the_node_announces_no_period() -> None:
    reg = Registry(2.0, grace_s=0.0)
    reg.on_state(birth(), 100.0)
    assert reg.expire(106.0) == []
    assert reg.expire(106.1) == [Transition("n1", False, "missed heartbeats")]


def test_heartbeat_after_missed_heartbeats_brings_the_node_back() -> None:
    reg = Registry(1.0, grace_s=0.0)
    reg.on_state(birth(), 100.0)
    reg.expire(110.0)
    assert reg.on_heartbeat(beat(seq=9), 111.0) == Transition("n1", True, "heartbeat")
    assert reg.is_online("n1")


def test_replayed_birth_after_missed_heartbeats_does_not_resurrect() -> None:
    reg = Registry(1.0, grace_s=0.0)
    reg.on_state(birth(), 100.0)
    reg.expire(110.0)
    assert reg.on_state(birth(), 111.0) is None  # the retained birth, re-sent on a hub reconnect
    assert not reg.is_online("n1")


def test_heartbeat_of_a_session_whose_will_was_seen_is_ignored() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 100.0)
    reg.on_state(will(), 101.0)
    assert reg.on_heartbeat(beat(), 102.0) is None
    assert not reg.is_online("n1")


def test_heartbeat_from_an_unknown_node_or_new_session_means_online() -> None:
    reg = Registry(5.0)
    assert reg.on_heartbeat(beat(node="ghost", session="x"), 100.0) == Transition("ghost", True, "heartbeat")
    reg.on_state(birth(), 100.0)
    reg.on_state(will(), 101.0)
    # Its birth was missed, but a live heartbeat of a new connection is proof of life.
    assert reg.on_heartbeat(beat(session="s2"), 102.0) == Transition("n1", True, "heartbeat")
    info = reg.get("n1")
    assert info is not None
    assert info.session == "s2"
    # ...and that new session's will is honoured.
    assert reg.on_state(will(session="s2"), 103.0) == Transition("n1", False, "lost")


def test_heartbeat_of_another_session_while_online_is_ignored() -> None:
    reg = Registry(1.0, grace_s=0.0)
    reg.on_state(birth(session="new"), 100.0)
    assert reg.on_heartbeat(beat(session="old"), 102.9) is None
    info = reg.get("n1")
    assert info is not None
    assert info.last_seen == 100.0
    assert info.session == "new"


def test_heartbeat_refreshes_last_seen_and_figures() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 100.0)
    reg.on_heartbeat(
        beat(seq=3, load1=0.5, mem_used_pct=40.0, disk_free_pct=70.0, job=JobRef(rollout="r1", step=2)),
        104.0,
    )
    api = reg.to_api("n1")
    assert api["last_seen"] == 104.0
    assert api["job"] == {"rollout": "r1", "command": "", "step": 2}
    assert api["heartbeat"]["load1"] == 0.5
    assert api["heartbeat"]["seq"] == 3


def test_refresh_after_a_hub_reconnect_restarts_the_clock() -> None:
    reg = Registry(1.0, grace_s=0.0)
    reg.on_state(birth(), 100.0)
    reg.refresh(150.0)
    assert reg.expire(152.0) == []
    assert reg.expire(153.1) == [Transition("n1", False, "missed heartbeats")]


def test_to_api_has_exactly_the_documented_fields_first() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(labels={"role": "web"}), 100.0)
    api = reg.to_api("n1")
    assert list(api)[:6] == ["node", "online", "last_seen", "labels", "inventory", "job"]
    assert api["node"] == "n1"
    assert api["online"] is True
    assert api["job"] is None
    assert api["inventory"] == {"services": {}, "packages": {}, "drivers": {}, "os": {}}
    with pytest.raises(KeyError):
        reg.to_api("nope")


def test_resolve_lists_labels_and_all() -> None:
    reg = Registry(5.0)
    reg.on_state(birth("b", labels={"role": "web", "site": "1"}), 1.0)
    reg.on_state(birth("a", labels={"role": "web", "site": "2"}), 1.0)
    reg.on_state(birth("c", labels={"role": "db"}), 1.0)
    reg.on_state(will("c"), 2.0)  # offline nodes are still known
    assert reg.resolve(["c", "x", "a", "a", "y"]) == (["c", "a"], ["x", "y"])
    assert reg.resolve(TargetLabels(labels={"role": "web"})) == (["a", "b"], [])
    assert reg.resolve(TargetLabels(labels={"role": "web", "site": "2"})) == (["a"], [])
    assert reg.resolve(TargetLabels(labels={"role": "none"})) == ([], [])
    assert reg.resolve("all") == (["a", "b", "c"], [])


def test_record_and_restore_round_trip() -> None:
    reg = Registry(5.0)
    reg.on_state(birth("up", labels={"k": "v"}, heartbeat_s=2.0), 100.0)
    reg.on_state(birth("down"), 100.0)
    reg.on_state(will("down"), 101.0)
    records = [reg.record(n) for n in reg.nodes()]

    fresh = Registry(5.0)
    assert fresh.restore([*records, {"bogus": 1}, {"node": "../bad"}], 200.0) == 2
    assert fresh.nodes() == ["down", "up"]
    assert not fresh.is_online("up")
    assert not fresh.is_online("down")
    up = fresh.get("up")
    assert up is not None
    assert dict(up.labels) == {"k": "v"}
    assert up.heartbeat_s == 2.0
    # The node that was online keeps its session open: its retained birth brings it back...
    assert fresh.on_state(birth("up"), 201.0) == Transition("up", True, "birth")
    # ...while the one whose will was seen stays down on a replay of its old birth.
    assert fresh.on_state(birth("down"), 201.0) is None


def test_forget_drops_a_node() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(), 1.0)
    assert reg.forget("n1")
    assert not reg.forget("n1")
    assert reg.nodes() == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Registry(0)


def test_a_republished_birth_replaces_the_inventory_at_once() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(inventory=Inventory(services={"app": "1.0"})), 100.0)
    assert reg.on_state(birth(inventory=Inventory(services={"app": "2.0"})), 101.0, retained=False) is None
    assert reg.to_api("n1")["inventory"]["services"] == {"app": "2.0"}


def test_a_silent_nodes_birth_still_updates_its_versions_and_a_live_one_brings_it_back() -> None:
    reg = Registry(1.0, grace_s=0.0)
    reg.on_state(birth(inventory=Inventory(services={"app": "1.0"})), 100.0)
    reg.expire(110.0)  # busy in a job: heartbeats late
    # The retained birth replayed to a reconnecting hub: the latest versions, but no sign of life.
    assert reg.on_state(birth(inventory=Inventory(services={"app": "2.0"})), 111.0) is None
    assert not reg.is_online("n1")
    assert reg.to_api("n1")["inventory"]["services"] == {"app": "2.0"}
    # The same session's birth published just now is proof of life.
    fresh = birth(inventory=Inventory(services={"app": "2.1"}))
    assert reg.on_state(fresh, 112.0, retained=False) == Transition("n1", True, "birth")
    assert reg.to_api("n1")["inventory"]["services"] == {"app": "2.1"}


def test_a_replayed_birth_of_an_ended_session_keeps_the_latest_versions() -> None:
    reg = Registry(5.0)
    reg.on_state(birth(inventory=Inventory(services={"app": "1.0"})), 100.0)
    reg.on_state(will(), 101.0)
    assert reg.on_state(birth(inventory=Inventory(services={"app": "2.0"})), 102.0, retained=False) is None
    assert not reg.is_online("n1")
    assert reg.to_api("n1")["inventory"]["services"] == {"app": "2.0"}


def test_a_heartbeat_keeps_every_other_field_of_the_node() -> None:
    """The hot path's copy (``_beaten``) names every field of NodeInfo, in order."""
    values: dict[str, object] = {
        "node": "n1",
        "online": True,
        "session": "s1",
        "session_ended": True,
        "offline_reason": "lost",
        "labels": {"a": "b"},
        "agent_version": "9.9",
        "started_at": 3.0,
        "heartbeat_s": 7.0,
        "last_seen": 4.0,
        "since": 5.0,
    }
    info = NodeInfo(**values)  # type: ignore[arg-type]
    beat = Heartbeat(node="n1", session="s1", seq=1, ts=6.0)
    assert [f.name for f in fields(NodeInfo)][-3:] == ["last_seen", "since", "heartbeat"]
    assert _beaten(info, 6.5, beat) == replace(info, last_seen=6.5, heartbeat=beat)


def full_scan(reg: Registry, now: float) -> set[str]:
    """Who ``expire`` must mark offline: every online node silent for too long (the rule itself)."""
    return {
        name
        for name in reg.nodes()
        if (info := reg.get(name)) is not None and info.online and now - info.last_seen > reg.deadline_s(info)
    }


@pytest.mark.parametrize("seed", range(8))
def test_expire_finds_exactly_the_silent_nodes_whatever_happened_before(seed: int) -> None:
    """``expire`` looks only at the longest-silent nodes of each heartbeat period; against the
    rule applied to every node, after random births (periods 1, 2, 5 s and the default),
    heartbeats, wills, sessions, refreshes, forgotten nodes and time that sometimes goes back."""
    import random

    rng = random.Random(seed)  # noqa: S311 - a reproducible sequence, not a secret
    reg = Registry(5.0)
    sessions: dict[str, str] = {}
    now = 1000.0
    for _ in range(3000):
        node = f"n{rng.randrange(40)}"
        step = rng.random()
        if step < 0.1:
            sessions[node] = f"s{rng.randrange(1000)}"
            reg.on_state(birth(node, sessions[node], heartbeat_s=rng.choice([1.0, 2.0, 5.0, None])), now)
        elif step < 0.7:
            reg.on_heartbeat(beat(node, sessions.get(node, "s0")), now)
        elif step < 0.75:
            reg.on_state(will(node, sessions.get(node, "s0")), now)
        elif step < 0.77:
            reg.refresh(now)
        elif step < 0.78:
            reg.forget(node)
        else:
            expected = full_scan(reg, now)
            assert {t.node for t in reg.expire(now)} == expected
            assert full_scan(reg, now) == set()
        now += rng.choice([0.0, 0.3, 1.0, 2.5, -0.5 if rng.random() < 0.05 else 0.7])
