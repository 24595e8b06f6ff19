"""The simulated fleet: real agents (presence, intake, journal, reports) with simulated step work.

The hub in these tests is the real ``HubService`` with a signing key and a
TinyDB file in ``tmp_path``; the simulated nodes are real ``Agent``s in this
test's process, on each real broker.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bus.errors import BusError, ConfigError
from bus.messages import (
    Command,
    JobSnapshot,
    NodeState,
    RolloutSummary,
    StepStatus,
    decode,
    encode,
    new_id,
)
from bus.mqtt import Message, MqttClient
from bus.signing import generate_keypair, load_private_key, sign_command
from bus.topics import Topics
from edge_agent import blocking
from edge_agent.simulator import (
    STEP_TYPES,
    InlineExecutor,
    SimulationConfig,
    Simulator,
    is_ram_backed,
    node_ids,
    parse_fail,
    ram_dir,
)
from hub.config import HubConfig
from hub.service import HubService
from tests.conftest import RunningBroker

pytestmark = pytest.mark.broker

DEADLINE = 30.0  # generous: the machine is shared
PLAN: list[dict[str, Any]] = [
    {"type": "package", "manager": "apt", "name": "app", "version": "2.0"},
    {"type": "service", "action": "restart", "name": "app"},
]


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """Every message under the test's prefix, as received by a separate client."""

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.seen: list[Message] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.subscribe(f"{self.topics.prefix}/#")
        self._task = asyncio.create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self._task

    async def _pump(self) -> None:
        async for message in self.client.messages():
            self.seen.append(message)

    def statuses(self) -> list[StepStatus]:
        return [decode(StepStatus, m.payload) for m in self.seen if m.topic.endswith("/status") and m.payload]

    def snapshots(self, node: str) -> list[JobSnapshot]:
        topic = self.topics.node(node, "job")
        return [decode(JobSnapshot, m.payload) for m in self.seen if m.topic == topic and m.payload]

    def states(self, node: str) -> list[NodeState]:
        topic = self.topics.node(node, "state")
        return [decode(NodeState, m.payload) for m in self.seen if m.topic == topic and m.payload]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
async def recorder(broker: RunningBroker, topics: Topics) -> AsyncIterator[Recorder]:
    async with MqttClient(broker.url, client_id=f"rec-{uuid.uuid4().hex[:8]}") as client:
        rec = Recorder(client, topics)
        await rec.start()
        yield rec
        await rec.stop()


@pytest.fixture
async def hub(
    broker: RunningBroker, topics: Topics, tmp_path: Path, keys: tuple[Path, Path]
) -> AsyncIterator[HubService]:
    config = HubConfig(
        broker=broker.url,
        prefix=topics.prefix,
        db=tmp_path / "hub.json",
        client_id=f"hub-{uuid.uuid4().hex[:8]}",
        signing_key=keys[0],
    )
    async with HubService(config) as service:
        yield service


def sim_config(
    broker: RunningBroker, topics: Topics, keys: tuple[Path, Path], **extra: Any
) -> SimulationConfig:
    values: dict[str, Any] = {
        "broker": broker.url,
        "nodes": 12,
        "prefix": topics.prefix,
        "node_prefix": f"s{uuid.uuid4().hex[:6]}-",
        "trust": [keys[1]],
        "heartbeat_s": 0.5,
        "step_ms": 20,
        "start_batch": 5,
    }
    values.update(extra)
    return SimulationConfig(**values)


def succeeded(recorder: Recorder, node: str) -> bool:
    return any(s.phase == "succeeded" for s in recorder.snapshots(node))


async def rollout_final(hub: HubService, rollout: str) -> RolloutSummary:
    final = {"succeeded", "rolled_back", "rollback_failed", "halted", "aborted"}
    assert hub.manager is not None
    manager: Any = hub.manager
    await until(lambda: manager.summary(rollout).state in final, f"rollout {rollout} to end")
    summary: RolloutSummary = manager.summary(rollout)
    return summary


# ------------------------------------------------------------------------- pure parts


def test_node_ids_are_valid_padded_and_offset() -> None:
    assert node_ids(3) == ["sim-0000", "sim-0001", "sim-0002"]
    assert node_ids(2, "edge-", first=99999) == ["edge-099999", "edge-100000"]
    with pytest.raises(Exception, match="invalid node id"):
        node_ids(1, "/bad-")


def test_parse_fail_takes_node_and_optional_step() -> None:
    assert parse_fail(["sim-0001", "sim-0002:1"]) == {"sim-0001": 0, "sim-0002": 1}
    with pytest.raises(ConfigError, match="STEP"):
        parse_fail(["sim-0001:x"])
    with pytest.raises(ConfigError, match="invalid node id"):
        parse_fail(["../etc:1"])


def test_every_protocol_step_type_is_simulated() -> None:
    assert set(STEP_TYPES) == {
        "download",
        "service",
        "package",
        "container",
        "file",
        "script",
        "module",
        "health",
    }


def test_ram_backed_paths_are_told_by_their_mount() -> None:
    mounts = "\n".join(
        [
            "/dev/vda / ext4 rw 0 0",
            "tmpfs /dev/shm tmpfs rw,nosuid 0 0",
            "tmpfs /data tmpfs rw 0 0",
            "/dev/vdb /data/disk ext4 rw 0 0",
            "short line",
        ]
    )
    assert is_ram_backed(Path("/dev/shm/fleet-sim-1/node"), mounts)
    assert is_ram_backed(Path("/data/x"), mounts)
    assert not is_ram_backed(Path("/data/disk/x"), mounts)  # the deepest mount decides
    assert not is_ram_backed(Path("/tmp/x"), mounts)
    assert not is_ram_backed(Path("/dev/shmem"), mounts)


async def test_inline_executor_runs_calls_at_once_in_the_loop_thread() -> None:
    loop = asyncio.get_running_loop()
    executor = InlineExecutor()
    assert await loop.run_in_executor(executor, threading.get_ident) == threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        await loop.run_in_executor(executor, divmod, 1, 0)
    executor.shutdown()


async def test_file_io_runs_on_the_loop_only_on_ram_and_unless_threads_are_asked_for(
    topics: Topics, tmp_path: Path
) -> None:
    def config(**extra: Any) -> SimulationConfig:
        return SimulationConfig(broker="mqtt://127.0.0.1:1", nodes=1, prefix=topics.prefix, **extra)

    shm = Path("/dev/shm")
    assert config(state_root=shm / "x").inline_io() == is_ram_backed(shm)
    assert not config(state_root=shm / "x", threaded_io=True).inline_io()
    assert config(state_root=tmp_path).inline_io() == is_ram_backed(tmp_path)
    # edge_agent.blocking: the runner's file work, in a worker thread or at once on the loop.
    here = threading.get_ident()
    assert await blocking.run(threading.get_ident) != here
    blocking.set_inline(True)
    try:
        assert await blocking.run(threading.get_ident) == here
    finally:
        blocking.set_inline(False)


def test_fail_must_name_a_simulated_node(topics: Topics) -> None:
    config = SimulationConfig(broker="mqtt://127.0.0.1:9", nodes=2, prefix=topics.prefix, fail={"other-1": 0})
    with pytest.raises(ConfigError, match="not simulated: other-1"):
        Simulator(config)


# ------------------------------------------------------------------------- on a broker


async def test_simulated_fleet_runs_a_rollout_reporting_every_step(
    broker: RunningBroker,
    topics: Topics,
    keys: tuple[Path, Path],
    hub: HubService,
    recorder: Recorder,
) -> None:
    config = sim_config(broker, topics, keys)
    async with Simulator(config) as sim:
        nodes = sim.node_ids
        assert sim.ready_count() == len(nodes)
        await until(lambda: all(hub.registry.is_online(n) for n in nodes), "every node online at the hub")
        info = hub.registry.get(nodes[0])
        assert info is not None
        assert info.labels["sim"] == "1"
        assert info.heartbeat_s == 0.5
        assert sim.state_root is not None
        reply = await hub.request("create_rollout", {"name": "sim", "targets": nodes, "plan": PLAN})
        summary = await rollout_final(hub, reply["rollout"])
        assert summary.state == "succeeded", summary.detail
        assert summary.counts.succeeded == len(nodes)
        # Every step of every node reported running and succeeded, by the real runner.
        expected = {(n, i, st) for n in nodes for i in range(len(PLAN)) for st in ("running", "succeeded")}

        def seen() -> set[tuple[str, int, str]]:
            return {(s.node, s.index, s.state) for s in recorder.statuses() if s.rollout == reply["rollout"]}

        await until(lambda: expected <= seen(), "every step report")
        assert seen() == expected
        for node in nodes:
            await until(functools.partial(succeeded, recorder, node), f"{node}'s retained snapshot")
            journal = json.loads((sim.state_root / node / "journal.json").read_text())
            assert reply["rollout"] in json.dumps(journal)
        assert sim.work.applied == len(nodes) * len(PLAN)
        assert sim.work.undone == 0
        root = sim.state_root
    # A temporary state root is removed on stop; every node said goodbye cleanly.
    assert not root.exists()
    if ram_dir() is not None:
        assert root.parent == ram_dir()
    await until(
        lambda: all((states := recorder.states(n)) and states[-1].reason == "shutdown" for n in nodes),
        "every node's shutdown state",
    )


async def test_a_failing_node_makes_the_hub_roll_the_simulated_fleet_back(
    broker: RunningBroker,
    topics: Topics,
    keys: tuple[Path, Path],
    hub: HubService,
    recorder: Recorder,
) -> None:
    prefix = f"f{uuid.uuid4().hex[:6]}-"
    failing = f"{prefix}0003"
    config = sim_config(broker, topics, keys, node_prefix=prefix, nodes=8, fail={failing: 1}, step_ms=10)
    async with Simulator(config) as sim:
        nodes = sim.node_ids
        await until(lambda: all(hub.registry.is_online(n) for n in nodes), "every node online at the hub")
        reply = await hub.request("create_rollout", {"name": "sim-fail", "targets": nodes, "plan": PLAN})
        summary = await rollout_final(hub, reply["rollout"])
        assert summary.state == "rolled_back", summary.detail
        assert summary.nodes[failing].phase == "rolled_back"
        assert "simulated failure of step 1" in summary.nodes[failing].detail
        await until(
            lambda: any(s.node == failing and s.state == "rolled_back" for s in recorder.statuses()),
            "the failing node's undo report",
        )
        failed = [s for s in recorder.statuses() if s.state == "failed"]
        assert [(s.node, s.index) for s in failed] == [(failing, 1)]
        assert sim.work.failed == 1
        # The failing node undid its own step 0; the others restored what they had done.
        assert sim.work.undone >= 1


async def test_a_burst_of_reports_costs_few_summaries_and_store_rewrites(
    broker: RunningBroker,
    topics: Topics,
    keys: tuple[Path, Path],
    hub: HubService,
    recorder: Recorder,
) -> None:
    config = sim_config(broker, topics, keys, nodes=60, step_ms=0, start_batch=30, heartbeat_s=5)
    async with Simulator(config) as sim:
        nodes = sim.node_ids
        await until(lambda: all(hub.registry.is_online(n) for n in nodes), "every node online at the hub")
        rewrites = hub.store.rewrites
        reply = await hub.request("create_rollout", {"name": "burst", "targets": nodes, "plan": PLAN})
        summary = await rollout_final(hub, reply["rollout"])
        assert summary.state == "succeeded", summary.detail
        topic = topics.rollout(reply["rollout"])
        await until(
            lambda: any(m.topic == topic and b'"succeeded"' in m.payload for m in recorder.seen),
            "the final summary",
        )

        def reports() -> list[Message]:
            return [m for m in recorder.seen if m.topic.endswith(("/status", "/job")) and m.payload]

        # 60 nodes x (4 step reports + at least the final snapshot) ...
        await until(lambda: len(reports()) >= 60 * 5, "every report")
    summaries = [m for m in recorder.seen if m.topic == topic]
    # ... coalesced into a few summaries and a few store commits.
    assert len(summaries) <= len(reports()) // 20
    assert hub.store.rewrites - rewrites <= len(reports()) // 20


async def test_simulated_nodes_refuse_forged_and_misaddressed_commands(
    broker: RunningBroker,
    topics: Topics,
    keys: tuple[Path, Path],
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    config = sim_config(broker, topics, keys, nodes=2)
    hub_key = load_private_key(keys[0])
    forger = generate_keypair(tmp_path / "forger")
    forged_key = load_private_key(forger[0])
    async with Simulator(config) as sim:
        first, second = sim.node_ids
        now = time.time()

        def command(node: str) -> Command:
            return Command(
                id=new_id(),
                node=node,
                rollout="r-1",
                action="apply",
                issued_at=now,
                expires_at=now + 600,
                plan=PLAN,
            )

        async with MqttClient(broker.url, client_id=f"pub-{uuid.uuid4().hex[:8]}") as pub:
            forged = sign_command(command(first), forged_key)
            await pub.publish(topics.node(first, "cmd"), encode(forged), qos=1, wait=True)
            # Signed by the trusted hub key, but for the other node: refused on this topic.
            misaddressed = sign_command(command(second), hub_key)
            await pub.publish(topics.node(first, "cmd"), encode(misaddressed), qos=1, wait=True)
            await until(
                lambda: len([s for s in recorder.statuses() if s.state == "rejected"]) >= 2,
                "two rejections",
            )
            rejected = [s for s in recorder.statuses() if s.state == "rejected"]
            assert {s.node for s in rejected} == {first}
            assert any("signature" in s.detail for s in rejected)
            assert any(f"for node '{second}'" in s.detail for s in rejected)
            await pub.publish(topics.node(first, "cmd"), b"", qos=1, retain=True, wait=True)
        assert sim.work.applied == 0


async def test_a_memory_journal_writes_no_file_and_still_ignores_replays(
    broker: RunningBroker,
    topics: Topics,
    keys: tuple[Path, Path],
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    config = sim_config(broker, topics, keys, nodes=2, journal="memory", state_root=tmp_path / "s")
    hub_key = load_private_key(keys[0])
    async with Simulator(config) as sim:
        node = sim.node_ids[0]
        now = time.time()
        command = Command(
            id=new_id(),
            node=node,
            rollout="r-1",
            action="apply",
            issued_at=now,
            expires_at=now + 600,
            plan=PLAN,
        )
        payload = encode(sign_command(command, hub_key))
        topic = topics.node(node, "cmd")
        async with MqttClient(broker.url, client_id=f"pub-{uuid.uuid4().hex[:8]}") as pub:
            await pub.publish(topic, payload, qos=1, wait=True)
            await until(lambda: succeeded(recorder, node), "the job to succeed")
            await pub.publish(topic, payload, qos=1, wait=True)  # a replay: ignored, silently
            await pub.publish(topic, b"{}", qos=1, wait=True)  # taken after it: rejected, loudly
            await until(lambda: any(s.state == "rejected" for s in recorder.statuses()), "the rejection")
        assert not list((tmp_path / "s").rglob("journal.json"))
        # The replay was known (the journal state lives on in memory): nothing ran again.
        assert sim.work.applied == len(PLAN)
        assert len([s for s in recorder.statuses() if s.state == "rejected"]) == 1


async def test_hundreds_of_nodes_share_one_process_and_one_loop(
    mosquitto_broker: RunningBroker, topics: Topics, keys: tuple[Path, Path]
) -> None:
    # paho's loop_start() stops at ~338 clients per process (FINDINGS.md); the simulator does not.
    config = sim_config(mosquitto_broker, topics, keys, nodes=400, start_batch=100, heartbeat_s=5)
    async with Simulator(config) as sim:
        assert sim.ready_count() == 400
        fds = len(os.listdir("/proc/self/fd"))
        assert fds > 400


async def test_start_fails_cleanly_when_no_broker_answers(topics: Topics, tmp_path: Path) -> None:
    config = SimulationConfig(
        broker="mqtt://127.0.0.1:9",
        nodes=3,
        prefix=topics.prefix,
        start_timeout_s=1.0,
        state_root=tmp_path / "state",
    )
    sim = Simulator(config)
    with pytest.raises(BusError, match="3 simulated nodes not online"):
        await sim.start()
    assert sim.ready_count() == 0


# ------------------------------------------------------------------------- the command line


async def test_fleet_simulate_runs_until_sigterm_then_leaves_cleanly(
    broker: RunningBroker, topics: Topics, keys: tuple[Path, Path], recorder: Recorder
) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}-"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "simulate",
        "--broker",
        broker.url,
        "--nodes",
        "3",
        "--node-prefix",
        prefix,
        "--trust",
        str(keys[1]),
        "--step-ms",
        "5",
        "--heartbeat-s",
        "1",
        "--fail",
        f"{prefix}0001:1",
        env={**os.environ, "FLEET_PREFIX": topics.prefix},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert f"3 nodes online ({prefix}0000 .. {prefix}0002)" in line.decode()
        assert f"prefix {topics.prefix}" in line.decode()
        root = Path(line.decode().rsplit("state in ", 1)[1].strip())
        assert await asyncio.to_thread(root.is_dir)
        nodes = node_ids(3, prefix)
        await until(lambda: all(recorder.states(n) for n in nodes), "three births")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "stopped" in out.decode()
    assert not await asyncio.to_thread(root.exists)
    for node in nodes:
        assert recorder.states(node)[-1].reason == "shutdown"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--nodes is required"),
        (["--nodes", "0"], "nodes"),
        (["--nodes", "2", "--fail", "sim-0000:x"], "STEP must be"),
        (["--nodes", "2", "--fail", "sim-0007"], "not simulated: sim-0007"),
        (["--nodes", "2", "--label", "novalue"], "expected key=value"),
    ],
)
async def test_fleet_simulate_refuses_bad_usage_in_one_line(args: list[str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "simulate",
        "--broker",
        "mqtt://127.0.0.1:9",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
