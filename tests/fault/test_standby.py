"""Two hubs, one active (DESIGN 3.9): the active one killed -9 at seeded random moments.

Real ``fleet hub`` processes (two, each with its own database and id, one key)
and three real agents on one broker (the embedded one and mosquitto). Each
trial creates a rollout (or, with a broken node, a coordinated rollback),
kills the active hub at a random moment and checks that the standby becomes
active within 10 s with a higher term, that the rollout ends as it would have
(every node wholly on one version, no step run twice, nothing left retained)
and that no request got two replies, while a stream of requests runs
throughout. The killed hub comes back and stands by; the next trial kills the
other one. At the end a command of an older term, signed with the real key,
is replayed on purpose: the node refuses it and runs nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from broker_config.generate import write_broker_config
from bus.errors import BusError
from bus.messages import Command, HubState, ScriptStep, StepStatus, encode
from bus.mqtt import MqttClient
from bus.signing import load_private_key, sign_command
from bus.topics import Topics
from tests.conftest import RunningBroker, free_port, wait_port
from tests.fault.conftest import Fleet, Observer, check_outcome, observing, parts_spec, start_agents, trials
from tests.integration.test_acl import refused, run_broker
from tests.nats_cluster import NatsCluster, nats_binary

_LOGGER = logging.getLogger(__name__)

NODES = ["n1", "n2", "n3"]
TRIALS = trials(2)
TAKEOVER_LIMIT_S = 10.0


async def two_hubs(fleet: Fleet, observer: Observer, timeout: float = 60.0) -> list[str]:
    """Start hub A (active) then hub B (standing by); return their ids."""
    first, second = fleet.hub_id, f"{fleet.hub_id}-b"
    fleet.start_hub()
    await observer.wait(lambda: observer.active_hub() == first or None, "the first hub active", timeout)
    fleet.start_member(second)
    await observer.wait(lambda: observer.is_standing_by(second) or None, "the second hub on standby", timeout)
    # What `fleet nodes` prints below its table.
    line = observer.rpc.hubs_line()
    assert line.startswith(f"hub: {first} active (term "), line
    assert line.endswith(f"standing by: {second}"), line
    return [first, second]


class Requests:
    """A stream of ``list`` requests throughout a trial: every one answered, none twice.

    A request whose hub is lost before it answers waits for the takeover and goes to
    the new active hub (``bus.rpc``): none fails.
    """

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.sent = 0
        self.answered = 0
        self.failed: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.sent += 1
            try:
                await self.observer.rpc.call("list", timeout=TAKEOVER_LIMIT_S)
            except BusError as exc:
                self.failed.append(str(exc))
            else:
                self.answered += 1
            await asyncio.sleep(0.1)

    def __enter__(self) -> Requests:
        self._task = asyncio.create_task(self._run(), name="request-stream")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def kill_active(fleet: Fleet, observer: Observer, hubs: list[str]) -> tuple[str, float]:
    """Kill -9 the active hub; return the new active hub and the seconds until it said so."""
    state = observer.hub_state
    assert state is not None
    assert state.state == "active", state
    victim, term = state.hub, state.term
    fleet.members[victim].kill()
    killed = time.monotonic()

    def taken() -> str | None:
        now = observer.hub_state
        if now is not None and now.state == "active" and now.term > term and now.hub != victim:
            return now.hub
        return None

    successor = await observer.wait(taken, "a standby to take over", timeout=30)
    took = time.monotonic() - killed
    assert took < TAKEOVER_LIMIT_S, f"takeover took {took:.1f} s\n{fleet.logs()}"
    assert successor in hubs
    # The killed hub comes back and stands by.
    fleet.start_member(victim)
    await observer.wait(lambda: observer.is_standing_by(victim) or None, f"{victim} standing by again")
    # With three hubs two standbys may race: the higher term wins (the other stands down).
    now = observer.hub_state
    assert now is not None
    assert now.state == "active", now
    assert now.hub != victim or now.term > term + 1, now
    return successor, took


def check_replies(observer: Observer) -> None:
    twice = {request: count for request, count in observer.replies.items() if count != 1}
    assert not twice, f"requests answered more than once: {twice}"


async def replay_an_older_term(fleet: Fleet, observer: Observer, node: str) -> None:
    """A command of an older term, freshly signed with the real key: refused, nothing runs."""
    state = observer.hub_state
    assert state is not None
    assert state.term >= 2
    now = time.time()
    command = Command(
        id=str(uuid.uuid4()),
        node=node,
        rollout=str(uuid.uuid4()),
        action="apply",
        issued_at=now,
        expires_at=now + 600,
        plan=[ScriptStep(name="part.sh", args=["a", "stale"], rollback="part.sh")],
        term=state.term - 1,
    )
    signed = sign_command(command, load_private_key(fleet.key))
    seen = len(observer.statuses)
    topic = fleet.topics.node(node, "cmd")
    await observer.client.publish(topic, encode(signed), qos=1, retain=True)
    try:

        def refused() -> StepStatus | None:
            for status in observer.statuses[seen:]:
                if status.command == signed.id:
                    return status
            return None

        status = await observer.wait(refused, "the node's answer to the replayed command")
        assert status.state == "rejected", status
        assert f"hub term {state.term - 1} is below term" in status.detail, status.detail
        assert not fleet.records(node, command.rollout), "a step of the older term ran"
        assert fleet.parts(node)["a"] != "stale"
    finally:
        await observer.client.publish(topic, b"", qos=1, retain=True)


@pytest.mark.timeout(120 + 90 * TRIALS)
@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_the_active_hub_killed_mid_rollout_the_standby_carries_it_on(
    kind: str,
    amqtt_broker: RunningBroker,
    mosquitto_broker: RunningBroker,
    topics: Topics,
    make_fleet: Any,
    rng: random.Random,
) -> None:
    broker = amqtt_broker if kind == "amqtt" else mosquitto_broker
    fleet: Fleet = make_fleet(broker.url, topics)
    takeovers: list[float] = []
    mid_flight = 0
    async with observing(broker.url, topics) as observer:
        hubs = await two_hubs(fleet, observer)
        await start_agents(fleet, observer, NODES)
        version = "v0"
        for trial in range(TRIALS):
            new = f"v{trial + 1}"
            with Requests(observer) as stream:
                body = await observer.ok("create_rollout", parts_spec(f"update {new}", new, NODES))
                rollout = body["rollout"]
                await asyncio.sleep(rng.uniform(0.0, 3.0))  # the wave of 1, then 2 nodes: about 2-3 s
                summary = observer.summaries.get(rollout)
                mid_flight += summary is None or summary.state != "succeeded"
                _, took = await kill_active(fleet, observer, hubs)
                takeovers.append(took)
                await check_outcome(fleet, observer, rollout, NODES, frozenset({"succeeded"}), version, new)
            assert not stream.failed, stream.failed
            _LOGGER.info(
                "trial %d (%s): takeover in %.2f s; requests %d sent, %d answered",
                trial,
                kind,
                took,
                stream.sent,
                stream.answered,
            )
            check_replies(observer)
            version = new
        # A node fences off what it has seen: once it took a command of the newest term...
        new = "v-last"
        body = await observer.ok("create_rollout", parts_spec("after the takeovers", new, NODES))
        await check_outcome(fleet, observer, body["rollout"], NODES, frozenset({"succeeded"}), version, new)
        # ... a command of an older term, however fresh and well signed, is refused.
        await replay_an_older_term(fleet, observer, NODES[0])
        check_replies(observer)
    _LOGGER.info(
        "takeover (%s, %d trials, %d killed mid-rollout): median %.2f s, max %.2f s",
        kind,
        len(takeovers),
        mid_flight,
        statistics.median(takeovers),
        max(takeovers),
    )


@pytest.mark.timeout(120 + 90 * TRIALS)
@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_the_active_hub_killed_mid_rollback_the_standby_finishes_it(
    kind: str,
    amqtt_broker: RunningBroker,
    mosquitto_broker: RunningBroker,
    topics: Topics,
    make_fleet: Any,
    rng: random.Random,
) -> None:
    broker = amqtt_broker if kind == "amqtt" else mosquitto_broker
    fleet: Fleet = make_fleet(broker.url, topics)
    takeovers: list[float] = []
    mid_flight = 0
    async with observing(broker.url, topics) as observer:
        hubs = await two_hubs(fleet, observer)
        await start_agents(fleet, observer, NODES)
        for trial in range(TRIALS):
            # The broken node is in the last wave: the first wave's node is rolled back.
            marker = fleet.state_dir(NODES[-1]) / "broken"
            marker.write_text("")
            new = f"bad{trial}"
            seen = len(observer.statuses)
            with Requests(observer) as stream:
                body = await observer.ok("create_rollout", parts_spec(f"bad update {trial}", new, NODES))
                rollout = body["rollout"]
                await observer.status(rollout, "failed", after=seen)  # the broken node's gate
                await asyncio.sleep(rng.uniform(0.0, 1.0))  # the rollback of 2 nodes: about 1 s
                summary = observer.summaries.get(rollout)
                mid_flight += summary is None or summary.state != "rolled_back"
                _, took = await kill_active(fleet, observer, hubs)
                takeovers.append(took)
                await check_outcome(fleet, observer, rollout, NODES, frozenset({"rolled_back"}), "v0", new)
            assert not stream.failed, stream.failed
            check_replies(observer)
            marker.unlink()
    _LOGGER.info(
        "takeover mid-rollback (%s, %d trials, %d killed mid-rollback): median %.2f s, max %.2f s",
        kind,
        len(takeovers),
        mid_flight,
        statistics.median(takeovers),
        max(takeovers),
    )


@pytest.mark.timeout(300 + 90 * TRIALS)
async def test_three_hubs_on_the_nats_cluster(tmp_path: Path, topics: Topics, rng: random.Random) -> None:
    """Three hubs on a 3-server NATS cluster (their MQTT gateways take a client id over
    cluster-wide): the active hub killed mid-rollout, twice; the others carry on."""
    if nats_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed (.ci/run installs it)")
        pytest.skip("nats-server not installed: apt-get install -y nats-server")
    cluster = NatsCluster(tmp_path / "nats", NODES, prefix=topics.prefix, anonymous=True)
    takeovers: list[float] = []
    try:
        await cluster.start()
        url = cluster.url("hub")
        fleet = Fleet(url, tmp_path / "fleet", topics)
        try:
            async with Observer(url, topics) as observer:
                hubs = await two_hubs(fleet, observer, timeout=90)
                third = f"{fleet.hub_id}-c"
                fleet.start_member(third)
                hubs.append(third)
                await observer.wait(
                    lambda: observer.is_standing_by(third) or None, "the third hub standing by", 90
                )
                await start_agents(fleet, observer, NODES, timeout=90, heartbeat_s=5, keepalive_s=10)
                version = "v0"
                for trial in range(max(2, TRIALS)):
                    new = f"v{trial + 1}"
                    spec = parts_spec(f"update {new}", new, NODES, pause="0.5", offline_grace_s=30)
                    rollout = (await observer.ok("create_rollout", spec, timeout=90))["rollout"]
                    await asyncio.sleep(rng.uniform(0.0, 3.0))
                    _, took = await kill_active(fleet, observer, hubs)
                    takeovers.append(took)
                    await check_outcome(
                        fleet, observer, rollout, NODES, frozenset({"succeeded"}), version, new, timeout=180
                    )
                    check_replies(observer)
                    version = new
        finally:
            fleet.close()
    finally:
        cluster.stop()
    _LOGGER.info(
        "takeover (NATS, 3 hubs, %d trials): median %.2f s, max %.2f s",
        len(takeovers),
        statistics.median(takeovers),
        max(takeovers),
    )


@pytest.mark.timeout(240)
async def test_a_node_the_new_hub_never_commanded_refuses_the_old_term_at_once(
    amqtt_broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    """The active hub's signed state raises every node's term floor, commanded or not.

    Without it, a node fences off only the terms of commands it took: one the new
    hub never commanded would still obey a command of the replaced hub.
    """
    fleet = Fleet(amqtt_broker.url, tmp_path / "fleet", topics)
    floor = fleet.state_dir("n1") / "term-floor"

    def floor_is(term: int) -> bool | None:
        try:
            return int(floor.read_text().strip()) == term or None
        except (OSError, ValueError):
            return None

    try:
        async with observing(amqtt_broker.url, topics) as observer:
            hubs = await two_hubs(fleet, observer)
            fleet.start_agent("n1")
            await observer.online(["n1"])
            state = observer.hub_state
            assert state is not None
            await observer.wait(lambda: floor_is(state.term), f"n1's floor at term {state.term}")
            await kill_active(fleet, observer, hubs)
            new = observer.hub_state
            assert new is not None
            assert new.term > state.term
            await observer.wait(lambda: floor_is(new.term), f"n1's floor at term {new.term} (no command)")
            await replay_an_older_term(fleet, observer, "n1")
            # An unsigned "active" state (a broker credential without the hub's key) moves nothing.
            forged = HubState(state="active", session=str(uuid.uuid4()), hub="forged", term=new.term + 100)
            await observer.client.publish(topics.hub_state, encode(forged), qos=1, retain=False)
            agent = fleet.agents["n1"]
            await observer.wait(
                lambda: "ignored: command is not signed" in agent.log(100_000) or None,
                "n1 ignoring the forgery",
            )
            assert floor_is(new.term), floor.read_text()
    finally:
        fleet.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_two_hubs_share_the_generated_hub_credentials_on_the_hub_listener(
    tmp_path: Path, topics: Topics, kind: str
) -> None:
    """``fleet broker-config --hub-port``: mosquitto names every other client after its user.

    Two hubs sharing the user ``hub`` there would end each other's connections; on
    the hubs' own listener their ids are kept, only the hub's password is valid,
    and the active connections still share one id (one at a time). The embedded
    broker keeps every id its user's (``user~id``) on both listeners.
    """
    port, hub_port = free_port(), free_port()
    config = write_broker_config(
        tmp_path / "broker", ("n1",), port=port, hub_port=hub_port, prefix=topics.prefix,
        broker_user=getpass.getuser(),
    )  # fmt: skip
    with run_broker(kind, config):
        wait_port(hub_port)
        assert f":{hub_port}" in config.url("hub")
        if kind == "mosquitto":  # (the embedded broker keeps ids per user on every listener)
            node_on_hub_port = config.url("n1").replace(f":{port}", f":{hub_port}")
            assert await refused(node_on_hub_port), (
                "a node's password must not be valid on the hubs' listener"
            )
        fleet = Fleet(config.url("hub"), tmp_path / "fleet", topics)
        try:
            async with observing(config.url("tui"), topics) as observer:
                first, second = await two_hubs(fleet, observer)
                state = observer.hub_state
                assert state is not None
                # Requests answered one by one while both hubs stay connected: no takeover.
                for _ in range(10):
                    await observer.ok("list")
                now = observer.hub_state
                assert now is not None
                assert (now.hub, now.term, now.state) == (first, state.term, "active"), fleet.logs()
                assert observer.is_standing_by(second), fleet.logs()
                successor, took = await kill_active(fleet, observer, [first, second])
                assert successor == second
                _LOGGER.info("%s hub listener: takeover %.2f s", kind, took)
        finally:
            fleet.close()


@pytest.mark.timeout(300)
async def test_a_standby_carries_on_a_rollout_whose_record_is_in_parts(
    mosquitto_broker: RunningBroker, topics: Topics, make_fleet: Any
) -> None:
    """600 simulated nodes: the record (about 300 KB) is over one payload, so it is retained
    in parts; the active hub killed mid-rollout, the standby reads it back whole and ends it."""
    nodes = [f"sim-{i:04d}" for i in range(600)]
    fleet: Fleet = make_fleet(mosquitto_broker.url, topics)
    async with observing(mosquitto_broker.url, topics) as observer:
        hubs = await two_hubs(fleet, observer)
        fleet._spawn(
            "simulate",
            [
                "simulate", "--broker", mosquitto_broker.url, "--prefix", topics.prefix, "--nodes", "600",
                "--trust", str(fleet.pub), "--step-ms", "500", "--journal", "memory",
            ],
        )  # fmt: skip
        for start in range(0, len(nodes), 100):  # (a page at a time: 600 rows exceed one reply)
            await observer.online(nodes[start : start + 100], timeout=180)
        plan = [
            {"type": "package", "manager": "apt", "name": "app", "version": "2.0"},
            {"type": "service", "action": "restart", "name": "app"},
        ]
        spec = {"name": "six hundred", "targets": nodes, "plan": plan, "strategy": {"waves": ["10%"]}}
        rollout = (await observer.ok("create_rollout", spec))["rollout"]

        def waves_done() -> int | None:
            summary = observer.summaries.get(rollout)
            return summary.counts.succeeded if summary and summary.counts.succeeded >= 120 else None

        await observer.wait(waves_done, "two waves of the rollout done", timeout=120)
        parts: dict[str, bytes] = {}
        async with MqttClient(mosquitto_broker.url) as reader:
            await reader.subscribe(topics.rollout_record_part_filter, qos=1)
            await reader.subscribe(topics.rollout_record(rollout), qos=1)  # (after every part)
            async for message in reader.messages():
                if message.topic == topics.rollout_record(rollout):
                    break
                parts[message.topic] = message.payload
        assert len([t for t in parts if t.startswith(topics.rollout(rollout))]) >= 2, sorted(parts)

        successor, _ = await kill_active(fleet, observer, hubs)
        summary = await observer.final(rollout, timeout=180)
        assert summary.state == "succeeded", f"{summary}\n{fleet.logs()}"
        assert summary.counts.succeeded == len(nodes)
        log = fleet.members[successor].log(100_000)
        assert "1 rollout records taken from the broker" in log, log[-3000:]
        assert "unusable" not in log
