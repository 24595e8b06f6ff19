"""A real 3-server NATS cluster on loopback (MQTT gateway on JetStream, stream_replicas 3).

What DESIGN 3.8 promises on a cluster: every process takes the list of the
servers' URLs, moves on when its server dies, renews its subscriptions (retried
while the cluster refuses them) and announces itself only once they are
granted. Shown here with real ``nats-server`` processes (started and killed by
pid), real ``fleet hub`` and ``fleet agent`` processes and the generated users
and permissions of ``fleet broker-config --kind nats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus.errors import BusError
from bus.mqtt import Message, MqttClient
from bus.topics import Topics
from tests.fault.conftest import Fleet, Observer, check_outcome, parts_spec
from tests.nats_cluster import NatsCluster, nats_binary

pytestmark = pytest.mark.broker

_LOGGER = logging.getLogger(__name__)

NODES = ["c1", "c2", "c3"]


def _need_nats() -> None:
    if nats_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed (.ci/run installs it)")
        pytest.skip("nats-server not installed: apt-get install -y nats-server")


@contextlib.asynccontextmanager
async def running_cluster(directory: Path, prefix: str, *, anonymous: bool) -> AsyncIterator[NatsCluster]:
    _need_nats()
    cluster = NatsCluster(directory, NODES, prefix=prefix, anonymous=anonymous)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def _first(client: MqttClient, topic: str, timeout: float = 15.0) -> Message:
    async def read() -> Message:
        async for message in client.messages():
            if message.topic == topic and message.payload:
                return message
        raise AssertionError("client closed")

    return await asyncio.wait_for(read(), timeout)


# ------------------------------------------------------------------ users and permissions


async def test_generated_users_and_permissions_hold_on_the_cluster(tmp_path: Path, topics: Topics) -> None:
    async with running_cluster(tmp_path / "nats", topics.prefix, anonymous=False) as cluster:
        cmd = topics.node("c1", "cmd")
        # The hub writes a retained command through server 1; c1 reads it through server 3.
        async with MqttClient(cluster.server_url("hub", 1)) as hub:
            await hub.publish(cmd, b"command", qos=1, retain=True, wait=True)
        async with MqttClient(cluster.server_url("c1", 3)) as node:
            await node.subscribe(cmd, qos=1)
            assert (await _first(node, cmd)).payload == b"command"
            # Not another node's commands: refused (and retried, never granted).
            with pytest.raises(BusError, match="refused subscription"):
                await node.subscribe(topics.node("c2", "cmd"), qos=1)
            await node.unsubscribe(topics.node("c2", "cmd"))
        # A node publishes only its own channels: c1 writing c2's state never reaches the hub,
        # while its own state (sent after it, on the same connection) does.
        async with MqttClient(cluster.url("hub")) as hub, MqttClient(cluster.server_url("c1", 2)) as node:
            await hub.subscribe(topics.node_filter("state"), qos=1)
            await node.publish(topics.node("c2", "state"), b"forged", qos=1)
            await node.publish(topics.node("c1", "state"), b"mine", qos=1, wait=True)
            seen: list[Message] = []

            async def until_own() -> None:
                async for message in hub.messages():
                    seen.append(message)
                    if message.topic == topics.node("c1", "state"):
                        return

            await asyncio.wait_for(until_own(), 15)
            assert [m.payload for m in seen] == [b"mine"]
        # Wrong passwords are refused at every server, at once.
        wrong = ",".join(f"mqtt://c1:wrong@127.0.0.1:{cluster.mqtt_port(i)}?kind=nats" for i in (1, 2, 3))
        with pytest.raises(BusError, match="refused the connection"):
            await MqttClient(wrong, connect_timeout=20).start()


async def test_a_refused_subscription_heals_when_the_cluster_grants_it(
    tmp_path: Path, topics: Topics
) -> None:
    """Refused (SUBACK 0x80) while c1 may not read it; after a reload a retry gets it, then the birth."""
    async with running_cluster(tmp_path / "nats", topics.prefix, anonymous=False) as cluster:
        wanted = topics.node("c2", "cmd")
        births: list[int] = []
        client = MqttClient(cluster.url("c1"), spread=True)

        async def birth() -> None:
            births.append(client.url.port)

        client.on_connect(birth)
        await client.subscribe(topics.node("c1", "cmd"), qos=1)
        await client.subscribe(wanted, qos=1)
        await client.start(wait=False)
        try:
            deadline = time.monotonic() + 30
            while client._refusals.get(wanted, 0) < 1:
                assert time.monotonic() < deadline, "never refused"
                await asyncio.sleep(0.05)
            assert births == []  # not announced while deaf to part of what it asked for
            assert client.missing_subscriptions == (wanted,)
            users = cluster.directory / "users.conf"
            subject = wanted.replace("/", ".")
            own = topics.node("c1", "cmd").replace("/", ".")
            users.write_text(users.read_text().replace(f'"{own}"', f'"{own}", "{subject}"'))
            for index in range(1, cluster.servers + 1):
                os.kill(cluster.pid(index), signal.SIGHUP)  # nats-server reloads its config
            deadline = time.monotonic() + 60
            while not births:
                assert time.monotonic() < deadline, (
                    f"not granted after the reload: {client.missing_subscriptions}"
                )
                await asyncio.sleep(0.05)
            assert not list(client.missing_subscriptions)
            async with MqttClient(cluster.url("hub")) as hub:
                await hub.publish(wanted, b"now readable", qos=1, retain=True, wait=True)
            assert (await _first(client, wanted)).payload == b"now readable"
        finally:
            await client.close()


# ------------------------------------------------------------------ failover mid-rollout


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("killed", "hub_sub_qos"),
    [(1, None), (2, None), (3, None), (1, 1)],
    ids=["hub-server", "server-2", "server-3", "hub-server-qos1-subscriptions"],
)
async def test_rollout_survives_kill_9_of_any_one_server(
    tmp_path: Path, topics: Topics, killed: int, hub_sub_qos: int | None
) -> None:
    """Server 1 is the hub's (it starts at the first URL); agents start at random ones."""
    async with running_cluster(tmp_path / "nats", topics.prefix, anonymous=True) as cluster:
        url = cluster.url("hub")
        fleet = Fleet(url, tmp_path / "fleet", topics)
        try:
            async with Observer(url, topics) as observer:
                births = observer.hub_births
                # With QoS 1 subscriptions (each a replicated JetStream consumer) the surviving
                # servers may refuse the hub's resubscriptions for a while: retried, never dropped.
                qos = "" if hub_sub_qos is None else f"&subqos={hub_sub_qos}"
                fleet.start_hub(broker_url=",".join(f"{u}{qos}" for u in url.split(",")))
                for node in NODES:
                    # The default heartbeat (5 s): a failover stalls NATS clients for seconds
                    # (its JetStream streams elect new leaders), far less than 3 heartbeats.
                    fleet.start_agent(node, heartbeat_s=5, keepalive_s=10)
                await observer.hub_ready(births, timeout=90)
                await observer.online(NODES, timeout=90)
                # The offline grace (DESIGN 3.4) covers a node whose connection a surviving
                # server closes while its streams elect new leaders (NATS then sends its will).
                spec = parts_spec(
                    "update v1", "v1", NODES, pause="0.5", node_timeout_s=120, offline_grace_s=30
                )
                rollout = (await observer.ok("create_rollout", spec))["rollout"]
                await observer.status(rollout, "running")
                started = time.monotonic()
                cluster.kill(killed)
                # Every node wholly new, no step run twice, nothing left retained. A node a
                # surviving server closes while its streams elect new leaders (NATS then sends
                # its will) is back within the offline grace (DESIGN 3.4): no rollback.
                state = await check_outcome(
                    fleet, observer, rollout, NODES, frozenset({"succeeded"}), "v0", "v1", timeout=180
                )
                _LOGGER.info(
                    "NATS server %d killed mid-rollout: %s %.1f s after the kill",
                    killed, state, time.monotonic() - started,
                )  # fmt: skip
        finally:
            fleet.close()


# ------------------------------------------------------------------ a simulated fleet


@pytest.mark.timeout(300)
def test_simulated_fleet_completes_a_rollout_on_the_cluster() -> None:
    """``fleet simulate`` nodes spread over the 3 servers (each starts at a random URL); the hub on one.

    200 nodes here (CI-sized); the 1000-node figure is bench/rollout_latency.py --broker nats
    (bench/README.md).
    """
    _need_nats()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "rollout_latency.py"), "--broker", "nats", "--nodes", "200",
         "--repeat", "1", "--raw-repeat", "1"],
        cwd=root, capture_output=True, timeout=280, check=False,
        env={k: v for k, v in os.environ.items() if k != "BENCH_PROFILE"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["broker"] == "nats"
    (run,) = result["runs"]
    assert run["state"] == "succeeded", result
    assert run["every_step_reported"] is True
    assert run["step_reports"] == 200 * 2 * 2
    assert set(run["cpu_s"]) == {"hub", "simulate", "broker", "wall"}
    _LOGGER.info("200 simulated nodes on the NATS cluster: rollout %.2f s", result["seconds"])
