"""Presence: sessions, births, wills, shutdowns and heartbeats (no network)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from bus.errors import InvalidNodeId
from bus.messages import Heartbeat, Inventory, JobRef, NodeState, decode, encode
from bus.topics import Topics
from edge_agent.config import load_agent_config
from edge_agent.presence import AGENT_VERSION, Presence, SystemSample, parse_meminfo, sample_system
from edge_agent.service import Agent

MEMINFO = """MemTotal:        8000000 kB
MemFree:          500000 kB
MemAvailable:    2000000 kB
Buffers:          100000 kB
"""


def _presence() -> Presence:
    return Presence(
        "n1", Topics("t/v1"), labels={"site": "lab"}, heartbeat_s=2.0, started_at=1000.0, agent_version="9.9"
    )


def test_topics_of_the_node() -> None:
    presence = _presence()
    assert presence.state_topic == "t/v1/node/n1/state"
    assert presence.heartbeat_topic == "t/v1/node/n1/heartbeat"
    assert presence.cmd_topic == "t/v1/node/n1/cmd"


def test_every_connection_gets_a_fresh_session_shared_by_its_will_and_birth() -> None:
    presence = _presence()
    sessions = set()
    for _ in range(3):
        session = presence.new_session()
        uuid.UUID(session)
        will, birth = presence.will(), presence.birth(Inventory())
        assert will.session == birth.session == session == presence.session
        sessions.add(session)
    assert len(sessions) == 3


def test_will_birth_and_shutdown_carry_state_and_reason() -> None:
    presence = _presence()
    inventory = Inventory(packages={"openssl": "3.0.11"}, os={"id": "debian"})
    birth = presence.birth(inventory)
    assert (birth.state, birth.reason) == ("online", "birth")
    assert birth.labels == {"site": "lab"}
    assert birth.inventory == inventory
    assert birth.heartbeat_s == 2.0
    assert birth.started_at == 1000.0
    assert birth.agent_version == "9.9"
    will = presence.will()
    assert (will.state, will.reason) == ("offline", "lost")
    assert will.inventory == Inventory()  # a will stays small
    shutdown = presence.shutdown()
    assert (shutdown.state, shutdown.reason, shutdown.session) == ("offline", "shutdown", birth.session)
    for message in (birth, will, shutdown):
        assert decode(NodeState, encode(message)) == message


def test_heartbeats_count_up_and_carry_session_and_job() -> None:
    presence = _presence()
    sample = SystemSample(load1=0.5, mem_used_pct=75.0, disk_free_pct=40.0)
    first = presence.heartbeat(now=1234.5678, uptime_s=3.04, sample=sample, job=None)
    job = JobRef(rollout="r1", command="c1", step=2)
    second = presence.heartbeat(now=1235.0, uptime_s=4.0, sample=sample, job=job)
    assert (first.seq, second.seq) == (0, 1)
    assert first.session == second.session == presence.session
    assert first.ts == 1234.568
    assert (first.load1, first.mem_used_pct, first.disk_free_pct) == (0.5, 75.0, 40.0)
    assert second.job == job
    presence.new_session()
    third = presence.heartbeat(now=1236.0, uptime_s=5.0, sample=sample, job=None)
    assert third.session != first.session
    assert third.seq == 2
    assert decode(Heartbeat, encode(second)) == second


def test_presence_refuses_an_invalid_node_id() -> None:
    with pytest.raises(InvalidNodeId):
        Presence("../etc", Topics())


def test_agent_version_is_known() -> None:
    assert AGENT_VERSION
    assert Presence("n1", Topics()).agent_version == AGENT_VERSION


def test_parse_meminfo() -> None:
    assert parse_meminfo(MEMINFO) == pytest.approx(75.0)
    assert parse_meminfo("MemTotal: 1000 kB\nMemFree: 250 kB\n") == pytest.approx(75.0)
    assert parse_meminfo("") == 0.0
    assert parse_meminfo("garbage\nMemTotal: lots\n") == 0.0


def test_sample_system_reads_this_machine(tmp_path: Path) -> None:
    sample = sample_system(tmp_path)
    assert 0.0 <= sample.mem_used_pct <= 100.0
    assert 0.0 < sample.disk_free_pct <= 100.0
    assert sample.load1 >= 0.0
    # A state dir that does not exist yet is measured on its nearest parent.
    assert sample_system(tmp_path / "not" / "yet").disk_free_pct > 0.0


def test_sample_system_with_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert sample_system(tmp_path, proc=tmp_path).mem_used_pct == 75.0
    assert sample_system(tmp_path, proc=tmp_path / "missing").mem_used_pct == 0.0


def test_agent_will_callable_starts_a_new_session_each_connect(tmp_path: Path) -> None:
    config = load_agent_config(
        {"node_id": "n1", "state_dir": str(tmp_path), "prefix": "t/v1", "labels": ["a=b"]}, {}
    )
    agent = Agent(config)
    first, second = agent.next_will(), agent.next_will()
    assert first.topic == second.topic == "t/v1/node/n1/state"
    assert first.retain
    assert first.qos == 1
    old, new = decode(NodeState, first.payload), decode(NodeState, second.payload)
    assert old.session != new.session
    assert new.session == agent.presence.session
    assert (new.state, new.reason, new.labels) == ("offline", "lost", {"a": "b"})
