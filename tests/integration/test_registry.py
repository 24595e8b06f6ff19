"""Presence through a real broker: a HubService in-process, raw MQTT clients playing agents."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bus.messages import Heartbeat, HubState, Inventory, NodeState, decode, encode, new_id
from bus.mqtt import MqttClient, Will
from bus.topics import Topics
from hub.config import HubConfig
from hub.service import HubService
from tests.conftest import RunningBroker

pytestmark = pytest.mark.broker


def hub_config(broker: RunningBroker, topics: Topics, tmp_path: Path, **extra: Any) -> HubConfig:
    """A hub config of this test's own: prefix, database, client id."""
    return HubConfig(
        broker=broker.url,
        prefix=topics.prefix,
        db=tmp_path / "hub.json",
        client_id=f"hub-{uuid.uuid4().hex[:8]}",
        **extra,
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Poll ``condition`` until true; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class FakeAgent:
    """A raw MQTT client publishing what an agent would: birth, heartbeats, wills."""

    def __init__(
        self,
        broker: RunningBroker,
        topics: Topics,
        node: str,
        *,
        heartbeat_s: float | None = None,
        labels: dict[str, str] | None = None,
        session: str | None = None,
        inventory: Inventory | None = None,
    ) -> None:
        self.topics = topics
        self.node = node
        self.session = session or new_id()
        self.heartbeat_s = heartbeat_s
        self.labels = labels or {}
        self.inventory = inventory or Inventory()
        self.seq = 0
        client_id = f"agent-{node}-{uuid.uuid4().hex[:6]}"
        self.client = MqttClient(broker.url, client_id=client_id, will=self._will)

    def state(self, state: str, reason: str, session: str | None = None, *, slim: bool = False) -> bytes:
        return encode(
            NodeState(
                node=self.node,
                state=state,
                session=session or self.session,
                reason=reason,
                labels=self.labels,
                inventory=Inventory() if slim else self.inventory,
                agent_version="test",
                heartbeat_s=self.heartbeat_s,
            )
        )

    def _will(self) -> Will:
        # MQTT 3.1.1 caps a will at 65,535 bytes: it never carries the inventory.
        return Will(self.topics.node(self.node, "state"), self.state("offline", "lost", slim=True))

    async def __aenter__(self) -> FakeAgent:
        await self.client.start()
        await self.birth()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.client.close()

    async def birth(self, session: str | None = None) -> None:
        if session is not None:
            self.session = session
        await self.publish_state("online", "birth")

    async def publish_state(self, state: str, reason: str, session: str | None = None) -> None:
        await self.client.publish(
            self.topics.node(self.node, "state"), self.state(state, reason, session), retain=True, wait=True
        )

    async def heartbeat(self, session: str | None = None) -> None:
        beat = Heartbeat(
            node=self.node,
            session=session or self.session,
            seq=self.seq,
            ts=time.time(),
            load1=0.25,
            mem_used_pct=42.0,
            disk_free_pct=77.0,
        )
        self.seq += 1
        await self.client.publish(self.topics.node(self.node, "heartbeat"), encode(beat), qos=0)


@pytest.fixture
async def hub(broker: RunningBroker, topics: Topics, tmp_path: Path) -> AsyncIterator[HubService]:
    service = HubService(hub_config(broker, topics, tmp_path), expire_interval_s=0.1)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def test_node_online_from_birth_and_offline_from_will(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    async with FakeAgent(broker, topics, "n1", labels={"role": "web"}) as agent:
        await until(lambda: hub.registry.is_online("n1"), "n1 online")
        api = hub.registry.to_api("n1")
        assert api["labels"] == {"role": "web"}
        assert api["session"] == agent.session
        await agent.publish_state("offline", "shutdown")
        await until(lambda: not hub.registry.is_online("n1"), "n1 offline")
        info = hub.registry.get("n1")
        assert info is not None
        assert info.offline_reason == "shutdown"


async def test_broker_sends_the_will_of_a_killed_agent(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    script = (
        "import asyncio, sys\n"
        "from bus.messages import NodeState, encode\n"
        "from bus.mqtt import MqttClient, Will\n"
        "from bus.topics import Topics\n"
        "url, prefix, node, session = sys.argv[1:]\n"
        "t = Topics(prefix)\n"
        "def state(s, r): return encode(NodeState(node=node, state=s, session=session, reason=r))\n"
        "async def main():\n"
        "    will = Will(t.node(node, 'state'), state('offline', 'lost'))\n"
        "    async with MqttClient(url, will=lambda: will, keepalive=30) as c:\n"
        "        await c.publish(t.node(node, 'state'), state('online', 'birth'), retain=True, wait=True)\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        broker.url,
        topics.prefix,
        "n-killed",
        "s-1",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
        await until(lambda: hub.registry.is_online("n-killed"), "n-killed online")
        proc.kill()
        await proc.wait()
        await until(lambda: not hub.registry.is_online("n-killed"), "the will of n-killed")
        info = hub.registry.get("n-killed")
        assert info is not None
        assert info.offline_reason == "lost"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_three_missed_heartbeats_mark_a_node_offline(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    async with FakeAgent(broker, topics, "n-beat", heartbeat_s=0.5) as agent:
        await until(lambda: hub.registry.is_online("n-beat"), "n-beat online")
        # While it beats, it stays online well past 3 x heartbeat_s.
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            await agent.heartbeat()
            assert hub.registry.is_online("n-beat")
            await asyncio.sleep(0.25)
        last_beat = time.monotonic()
        took = await until(lambda: not hub.registry.is_online("n-beat"), "expiry of n-beat", timeout=20)
        # The connection is still open (no will): only missed heartbeats can do this,
        # and not before 3 periods have passed.
        assert time.monotonic() - last_beat >= 1.5, took
        info = hub.registry.get("n-beat")
        assert info is not None
        assert info.offline_reason == "missed heartbeats"
        # A heartbeat brings it back.
        await agent.heartbeat()
        await until(lambda: hub.registry.is_online("n-beat"), "n-beat back online")


async def test_a_republished_birth_shows_in_nodes_within_a_second(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    # Issue 14.2: the versions the hub shows are the node's latest birth, also when the node
    # had gone quiet (a busy job) and was marked offline by missed heartbeats meanwhile.
    inventory = Inventory(services={"demo-app": "1.0"})
    async with FakeAgent(broker, topics, "n-ver", heartbeat_s=0.3, inventory=inventory) as agent:
        await until(lambda: hub.registry.is_online("n-ver"), "n-ver online")
        await until(lambda: not hub.registry.is_online("n-ver"), "n-ver silent", timeout=20)
        for version in ("2.0", "2.1"):
            agent.inventory = Inventory(services={"demo-app": version})
            published = time.monotonic()
            await agent.birth()

            def shown(version: str = version) -> bool:
                rows = [r for r in hub._nodes_reply({}) if r["node"] == "n-ver"]
                return bool(rows) and rows[0]["inventory"]["services"] == {"demo-app": version}

            took = await until(shown, f"nodes to show demo-app {version}", timeout=5)
            assert time.monotonic() - published < 1.0, took
            assert hub.registry.is_online("n-ver")  # a live birth is a sign of life
        # The stored record (what a restarted hub starts from) has it too.
        assert hub.registry.record("n-ver")["inventory"]["services"] == {"demo-app": "2.1"}


async def test_stale_will_of_an_older_session_is_ignored(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    async with FakeAgent(broker, topics, "n-stale", session="old-session") as agent:
        await until(lambda: hub.registry.is_online("n-stale"), "n-stale online")
        await agent.birth(session="new-session")  # it reconnected
        await until(
            lambda: getattr(hub.registry.get("n-stale"), "session", "") == "new-session", "the new session"
        )
        # The broker finally delivers the old connection's will.
        await agent.publish_state("offline", "lost", session="old-session")
        # Prove the hub processed it: a heartbeat of the new session after it arrives.
        await agent.heartbeat()
        await until(
            lambda: getattr(hub.registry.get("n-stale"), "heartbeat", None) is not None,
            "the heartbeat after the stale will",
        )
        assert hub.registry.is_online("n-stale")
        # The new session's own will does count.
        await agent.publish_state("offline", "lost", session="new-session")
        await until(lambda: not hub.registry.is_online("n-stale"), "n-stale offline")


async def test_hub_publishes_its_birth_and_shutdown(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with MqttClient(broker.url) as spy:
        await spy.subscribe(topics.hub_state)
        service = HubService(hub_config(broker, topics, tmp_path))
        await service.start()
        try:
            birth = decode(HubState, (await asyncio.wait_for(spy.messages().__anext__(), 10)).payload)
            assert birth.state == "active"  # the only hub is the active one (DESIGN 3.9)
            assert birth.reason == "birth"
            assert birth.hub == service.hub_id
            assert birth.term == service.term >= 1
            assert service.is_connected
        finally:
            await service.stop()
        message = await asyncio.wait_for(spy.messages().__anext__(), 10)
        down = decode(HubState, message.payload)
        assert down.state == "offline"
        assert down.reason == "shutdown"
        assert down.session == birth.session


async def test_a_restarted_hub_remembers_nodes_and_takes_retained_births(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    config = hub_config(broker, topics, tmp_path)
    async with FakeAgent(broker, topics, "n-live", labels={"k": "v"}):
        first = HubService(config)
        await first.start()
        try:
            async with FakeAgent(broker, topics, "n-gone") as gone:
                await until(
                    lambda: first.registry.is_online("n-gone") and first.registry.is_online("n-live"),
                    "both online",
                )
                await gone.publish_state("offline", "shutdown")
                await until(lambda: not first.registry.is_online("n-gone"), "n-gone offline")
        finally:
            await first.stop()
        stored = {doc["node"] for doc in first.store.all("nodes")}
        assert stored == {"n-live", "n-gone"}

        second = HubService(config)
        await second.start()
        try:
            await until(lambda: second.registry.is_online("n-live"), "n-live online from its retained birth")
            assert second.registry.nodes() == ["n-gone", "n-live"]
            assert not second.registry.is_online("n-gone")
            assert second.registry.to_api("n-live")["labels"] == {"k": "v"}
        finally:
            await second.stop()
