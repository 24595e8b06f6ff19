"""The RolloutManager end to end on a real broker, a real Store file and fake agents.

The fake agents below are protocol peers, not mocks of the hub: they verify
each command's signature over the fields as received, check that it names
their node, ignore replays, refuse a command not later than the last one they
ran, and answer with ``StepStatus`` and a retained ``JobSnapshot`` exactly as
the agent protocol says (a failed step: ``failed``, then ``rolling_back``,
then ``rolled_back`` with the failed step still shown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.errors import Conflict, InvalidInput, NotFound, SignatureError
from bus.messages import (
    Command,
    Event,
    JobSnapshot,
    NodeState,
    RolloutNodes,
    RolloutSummary,
    StepState,
    StepStatus,
    decode,
    encode,
    loads_object,
)
from bus.mqtt import MqttClient
from bus.signing import public_key_of, verify_fields
from bus.topics import Topics
from hub.core.registry import Registry
from hub.retention import Archive, archive_path
from hub.rollouts import SUMMARY_NODES, RolloutManager
from hub.store import Store
from tests.conftest import RunningBroker

pytestmark = pytest.mark.broker

DEADLINE = 20.0  # generous: the machine is shared
PLAN: list[dict[str, Any]] = [
    {"type": "script", "name": "install_update.sh", "rollback": "rollback.sh"},
    {"type": "health", "check": "command", "target": "health.sh"},
]


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` against a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class FakeAgent:
    """A node that speaks the agent protocol and records what it was sent."""

    def __init__(
        self,
        broker: RunningBroker,
        topics: Topics,
        node: str,
        key: Ed25519PrivateKey,
        *,
        fail_step: int | None = None,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.node = node
        self.topics = topics
        self.trusted = [public_key_of(key)]
        self.fail_step = fail_step
        self.hold = hold
        self.client = MqttClient(broker.url, client_id=f"fake-{node}-{uuid.uuid4().hex[:6]}")
        self.cmd_topic = topics.node(node, "cmd")
        self.commands: list[Command] = []  # commands run, in order
        self.replays = 0
        self.rejected: list[str] = []
        self.clears = 0
        self.finished: list[str] = []  # final phases reported
        self._seen: set[str] = set()
        self._last_issued = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeAgent:
        await self.client.start()
        await self.client.subscribe(self.cmd_topic)
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    @property
    def actions(self) -> list[str]:
        return [c.action for c in self.commands]

    async def _serve(self) -> None:
        async for message in self.client.messages():
            if message.topic != self.cmd_topic:
                continue
            if not message.payload:
                self.clears += 1
                continue
            await self._take(message.payload)

    async def _take(self, payload: bytes) -> None:
        fields = loads_object(payload)
        try:
            verify_fields(fields, self.trusted)
            command = Command.model_validate(fields)
        except (SignatureError, ValueError) as exc:
            self.rejected.append(str(exc))
            return
        if command.node != self.node:
            self.rejected.append("not my node")
            return
        if command.id in self._seen:
            self.replays += 1
            return
        self._seen.add(command.id)
        if command.issued_at <= self._last_issued or command.expires_at <= time.time():
            self.rejected.append(f"stale command {command.id}")
            await self._status(command, -1, "command", "rejected", "not later than the last command")
            await self._snapshot(command, "rejected", [])
            return
        self._last_issued = command.issued_at
        self.commands.append(command)
        if command.action == "apply":
            await self._apply(command)
        else:
            await self._snapshot(command, "rolling_back", [])
            await self._snapshot(command, "rolled_back", [])
            self.finished.append("rolled_back")

    async def _apply(self, command: Command) -> None:
        steps = [StepState(index=i, type=step.type) for i, step in enumerate(command.plan)]
        await self._snapshot(command, "applying", steps)
        for i, step in enumerate(command.plan):
            steps[i] = StepState(index=i, type=step.type, state="running")
            await self._status(command, i, step.type, "running")
            if self.hold is not None and i == 0:
                await self.hold.wait()
            if i == self.fail_step:
                steps[i] = StepState(index=i, type=step.type, state="failed", detail="exit 1")
                await self._status(command, i, step.type, "failed", "exit 1")
                await self._snapshot(command, "rolling_back", steps)
                for j in reversed(range(i)):
                    steps[j] = StepState(index=j, type=command.plan[j].type, state="rolled_back")
                    await self._status(command, j, command.plan[j].type, "rolled_back")
                await self._snapshot(command, "rolled_back", steps)
                self.finished.append("rolled_back")
                return
            steps[i] = StepState(index=i, type=step.type, state="succeeded")
            await self._status(command, i, step.type, "succeeded")
            await self._snapshot(command, "applying", steps)
        await self._snapshot(command, "succeeded", steps)
        self.finished.append("succeeded")

    async def _status(self, command: Command, index: int, type_: str, state: str, detail: str = "") -> None:
        status = StepStatus.model_validate(
            {
                "node": self.node,
                "command": command.id,
                "rollout": command.rollout,
                "index": index,
                "type": type_,
                "state": state,
                "ts": time.time(),
                "detail": detail,
            }
        )
        await self.client.publish(self.topics.node(self.node, "status"), encode(status), qos=1)

    async def _snapshot(self, command: Command, phase: str, steps: list[StepState]) -> None:
        snapshot = JobSnapshot.model_validate(
            {
                "node": self.node,
                "id": command.id,
                "rollout": command.rollout,
                "action": command.action,
                "phase": phase,
                "steps": [s.model_dump() for s in steps],
                "issued_at": command.issued_at,
                "updated_at": time.time(),
            }
        )
        await self.client.publish(self.topics.node(self.node, "job"), encode(snapshot), qos=1, retain=True)


class Hub:
    """The hub's side: a client, a real Store, a Registry, the manager, and the message pump."""

    def __init__(
        self,
        broker: RunningBroker,
        topics: Topics,
        db: Path,
        key: Ed25519PrivateKey,
        *,
        keep_rollouts: int | None = None,
        summary_nodes: int = SUMMARY_NODES,
    ) -> None:
        self.topics = topics
        self.store = Store(db, commit_interval_s=0.02)
        self.registry = Registry(5.0)
        self.client = MqttClient(broker.url, client_id=f"hub-{uuid.uuid4().hex[:8]}")
        self.archive = Archive(archive_path(db))
        self.manager = RolloutManager(
            topics=topics,
            publish=self.client.publish,
            store=self.store,
            registry=self.registry,
            signing_key=key,
            summary_interval_s=0.05,
            keep_rollouts=keep_rollouts,
            archive=self.archive if keep_rollouts is not None else None,
            summary_nodes=summary_nodes,
        )
        self.summaries: dict[str, RolloutSummary] = {}
        self.changes: list[RolloutNodes] = []
        self.events: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    def online(self, *nodes: str, now: float | None = None) -> None:
        for node in nodes:
            birth = NodeState(node=node, state="online", session=f"s-{node}", reason="birth")
            self.registry.on_state(birth, now or time.time())

    async def __aenter__(self) -> Hub:
        await self.store.open()
        await self.client.start()
        for channel in ("status", "job"):
            await self.client.subscribe(self.topics.node_filter(channel))
        await self.client.subscribe(self.topics.rollout_filter)
        await self.client.subscribe(self.topics.rollout_nodes_filter)
        await self.client.subscribe(self.topics.events)
        await self.manager.start()
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.manager.stop()
        await self.store.close()
        await self.client.close()

    async def _pump(self) -> None:
        async for message in self.client.messages():
            rollout = self.topics.parse_rollout(message.topic)
            if rollout is not None and message.payload:
                self.summaries[rollout] = decode(RolloutSummary, message.payload)
            elif self.topics.parse_rollout_nodes(message.topic) is not None:
                self.changes.append(decode(RolloutNodes, message.payload))
            elif message.topic == self.topics.events:
                self.events.append(decode(Event, message.payload))
            elif (parsed := self.topics.parse_node(message.topic)) is not None and message.payload:
                # What hub.service does: decode once, then hand the report over.
                report: StepStatus | JobSnapshot = (
                    decode(StepStatus, message.payload)
                    if parsed.channel == "status"
                    else decode(JobSnapshot, message.payload)
                )
                await self.manager.on_report(parsed.node, report)

    def state(self, rollout: str) -> str:
        return self.manager.summary(rollout).state

    async def create(self, nodes: list[str], **fields: Any) -> str:
        reply = await self.manager.request(
            "create_rollout", {"name": "update", "targets": nodes, "plan": PLAN, **fields}
        )
        rollout: str = reply["rollout"]
        return rollout


async def test_a_rollout_succeeds_on_three_nodes(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "hub.json"
    nodes = ["n1", "n2", "n3"]
    async with Hub(broker, topics, db, key) as hub, contextlib.AsyncExitStack() as stack:
        agents = {n: await stack.enter_async_context(FakeAgent(broker, topics, n, key)) for n in nodes}
        hub.online(*nodes)
        rid = await hub.create(nodes, strategy={"waves": [1, "100%"]}, step_timeout_s=77)
        await until(lambda: hub.state(rid) == "succeeded", "the rollout to succeed")
        for agent in agents.values():
            assert agent.actions == ["apply"]
            assert agent.rejected == []
            assert [step.timeout_s for step in agent.commands[0].plan] == [77, 77]
        # Wave 1 (n1) went out, and finished, before wave 2.
        assert agents["n1"].commands[0].issued_at < agents["n2"].commands[0].issued_at
        # Each node's retained command is cleared once its part is final.
        await until(lambda: all(a.clears >= 1 for a in agents.values()), "every command to be cleared")
        # The retained summary on the broker ends with the final state.
        await until(
            lambda: rid in hub.summaries and hub.summaries[rid].state == "succeeded", "the final summary"
        )
        assert hub.summaries[rid].counts.succeeded == 3
        assert (hub.summaries[rid].wave, hub.summaries[rid].waves) == (2, 2)
        await until(lambda: any(e.kind == "succeeded" and e.rollout == rid for e in hub.events), "the event")
        kinds = [entry["kind"] for entry in hub.manager.audit(rid)]
        assert kinds[0] == "created"
        assert kinds[-1] == "succeeded"
        assert "wave_started" in kinds
        listed = await hub.manager.request("list", {})
        assert [s["id"] for s in listed] == [rid]
        shown = await hub.manager.request("show", {"rollout": rid})
        assert shown["state"] == "succeeded"
        assert [step["type"] for step in shown["plan"]] == ["script", "health"]
        assert shown["audit"][-1]["message"] == "succeeded on 3 nodes"
    # Everything is in the store file, through the store's atomic rewrites.
    data = json.loads(db.read_text())
    assert data["rollouts"][rid]["state"] == "succeeded"
    assert any(entry["kind"] == "succeeded" for entry in data["audit"].values())


async def test_a_failing_node_rolls_the_others_back(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    nodes = ["n1", "n2", "n3"]
    async with Hub(broker, topics, tmp_path / "hub.json", key) as hub, contextlib.AsyncExitStack() as stack:
        agents = {
            n: await stack.enter_async_context(
                FakeAgent(broker, topics, n, key, fail_step=1 if n == "n3" else None)
            )
            for n in nodes
        }
        hub.online(*nodes)
        rid = await hub.create(nodes)
        await until(lambda: hub.state(rid) == "rolled_back", "the rollout to roll back")
        # The failed node restored itself; the others got a rollback (if done) or abort (if not).
        assert agents["n3"].actions == ["apply"]
        for node in ("n1", "n2"):
            assert agents[node].actions[0] == "apply"
            assert agents[node].actions[1:] in (["rollback"], ["abort"])
            assert agents[node].commands[1].issued_at > agents[node].commands[0].issued_at
            assert agents[node].rejected == []
        summary = hub.manager.summary(rid)
        assert {n: s.phase for n, s in summary.nodes.items()} == dict.fromkeys(nodes, "rolled_back")
        assert summary.counts.rolled_back == 3
        started = [e for e in hub.manager.audit(rid) if e["kind"] == "rollback_started"]
        assert started[0]["message"] == "rollback started: n3 failed step 2 (health): exit 1"
        assert started[0]["evidence"]["failures"] == {"n3": "failed step 2 (health): exit 1"}
        await until(
            lambda: rid in hub.summaries and hub.summaries[rid].state == "rolled_back", "the final summary"
        )
        # A finished rollout cannot be aborted; a rolled-back one not rolled back again.
        with pytest.raises(Conflict):
            await hub.manager.request("abort", {"rollout": rid})
        with pytest.raises(Conflict):
            await hub.manager.request("rollback", {"rollout": rid})


async def five_rolled_back(
    hub: Hub, stack: contextlib.AsyncExitStack, broker: RunningBroker, topics: Topics, key: Ed25519PrivateKey
) -> str:
    """Agents n1-n5 (n4 fails its second step), a rollout in waves of 2, rolled back: its id."""
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    for n in nodes:
        await stack.enter_async_context(FakeAgent(broker, topics, n, key, fail_step=1 if n == "n4" else None))
    hub.online(*nodes)
    rid = await hub.create(nodes, strategy={"waves": [2]})
    await until(lambda: hub.state(rid) == "rolled_back", "the rollout to roll back")
    return rid


async def test_a_big_rollout_has_a_bounded_summary_and_per_node_changes(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    async with (
        Hub(broker, topics, tmp_path / "hub.json", key, summary_nodes=2) as hub,
        contextlib.AsyncExitStack() as stack,
    ):
        rid = await five_rolled_back(hub, stack, broker, topics, key)
        await until(
            lambda: rid in hub.summaries and hub.summaries[rid].state == "rolled_back", "the final summary"
        )
        final = hub.summaries[rid]
        # The retained summary: every count, two nodes, the failed one first, and how many there are.
        assert final.nodes_total == 5
        assert len(final.nodes) == 2
        assert "n4" in final.nodes
        assert final.counts.failed == 1
        full = hub.manager.summary(rid)  # show and GET /api/rollouts/{id}: every node
        assert sorted(full.nodes) == nodes
        assert full.nodes_total is None
        listed = await hub.manager.request("list", {})
        assert listed[0]["nodes_total"] == 5
        assert len(listed[0]["nodes"]) == 2
        # The changes, folded in order, give every node's final row; seq has no gap.
        await until(
            lambda: {n for c in hub.changes if c.rollout == rid for n in c.nodes} == set(nodes), "every node"
        )
        changes = [c for c in hub.changes if c.rollout == rid]
        assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
        table: dict[str, Any] = {}
        for change in changes:
            table.update(change.nodes)
        assert {n: row.model_dump() for n, row in table.items()} == {
            n: row.model_dump() for n, row in full.nodes.items()
        }
        # Only what changed: no message repeats a node's row unchanged.
        seen: dict[str, Any] = {}
        for change in changes:
            for node, row in change.nodes.items():
                assert seen.get(node) != row, (node, row)
                seen[node] = row


async def test_show_gives_a_big_rollout_page_by_page_and_the_cli_merges_the_pages(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """A 10,000-node ``show`` exceeds the MQTT payload limit: pages of nodes, merged by the CLI."""
    from bus.messages import Reply
    from bus.rpc import fetch_show

    async with (
        Hub(broker, topics, tmp_path / "hub.json", key) as hub,
        contextlib.AsyncExitStack() as stack,
    ):
        rid = await five_rolled_back(hub, stack, broker, topics, key)
        whole = await hub.manager.request("show", {"rollout": rid})
        page = await hub.manager.request("show", {"rollout": rid[:8], "offset": 1, "limit": 2})
        assert sorted(page["nodes"]) == ["n2", "n3"]
        assert sorted(page["steps"]) == ["n2", "n3"]
        assert page["steps"]["n2"] == whole["steps"]["n2"]
        assert (page["nodes_total"], page["offset"], page["audit"]) == (5, 1, [])
        assert page["counts"] == whole["counts"]  # the counts are the whole rollout's
        for bad in ({"offset": -1}, {"limit": 0}, {"offset": "1"}, {"limit": True}):
            with pytest.raises(InvalidInput):
                await hub.manager.request("show", {"rollout": rid, **bad})

        class TooBig:
            """A session whose hub finds the whole reply too large (as at 10,000 nodes)."""

            def __init__(self) -> None:
                self.calls: list[dict[str, Any]] = []

            async def call(self, op: str, body: dict[str, Any]) -> Reply:
                self.calls.append(body)
                if "limit" not in body:
                    return Reply(request="r", ok=False, body={"kind": "too_large"}, error="too large")
                if body["limit"] > 2:  # a page too big as well: asked again smaller
                    return Reply(request="r", ok=False, body={"kind": "too_large"}, error="too large")
                return Reply(request="r", ok=True, body=await hub.manager.request(op, body))

        session = TooBig()
        merged = await fetch_show(session.call, rid, page=8)
        assert merged.ok
        assert merged.body == whole
        assert [c.get("limit") for c in session.calls] == [None, 8, 2, 2, 2]  # 5 nodes, pages of 2


async def test_the_step_grid_of_a_finished_rollout_is_the_same_after_a_hub_restart(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "hub.json"
    nodes = ["n1", "n2", "n3"]
    async with contextlib.AsyncExitStack() as stack:
        for n in nodes:
            agent = FakeAgent(broker, topics, n, key, fail_step=1 if n == "n3" else None)
            await stack.enter_async_context(agent)
        async with Hub(broker, topics, db, key) as hub:
            hub.online(*nodes)
            rid = await hub.create(["n3", "n1", "n2"], strategy={"waves": [2]})
            await until(lambda: hub.state(rid) == "rolled_back", "the rollout to roll back")
            shown = await hub.manager.request("show", {"rollout": rid})
            counts = shown["counts"]
            assert (counts["failed"], counts["rolled_back"], counts["not_started"]) == (1, 2, 1)
        steps = shown["steps"]
        assert steps["n3"] == [
            {"index": 0, "type": "script", "state": "rolled_back", "detail": ""},
            {"index": 1, "type": "health", "state": "failed", "detail": "exit 1"},
        ]
        assert [c["state"] for c in steps["n2"]] == ["not_started", "not_started"]  # never started
        assert all(c["state"] in ("not_started", "running", "succeeded", "rolled_back") for c in steps["n1"])
        # A fresh hub (a fresh TUI, `fleet rollout show`, GET /api/rollouts/ID) shows the same grid.
        async with Hub(broker, topics, db, key) as hub:
            again = await hub.manager.request("show", {"rollout": rid})
            assert again["steps"] == steps
            assert again["counts"] == shown["counts"]


async def test_rollout_ops_take_a_unique_id_prefix_and_refuse_an_ambiguous_one(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    nodes = [f"p{i}" for i in range(17)]
    async with Hub(broker, topics, tmp_path / "hub.json", key) as hub:
        hub.online(*nodes)
        ids = [await hub.create([node]) for node in nodes]  # 17 ids, 16 hex digits: two share one
        first = {rid: rid[0] for rid in ids}
        shared = next(c for c in first.values() if list(first.values()).count(c) > 1)
        with pytest.raises(InvalidInput, match=f"prefix '{shared}' is ambiguous: it matches ") as ambiguous:
            await hub.manager.request("show", {"rollout": shared})
        assert all(rid in ambiguous.value.reason for rid in ids if rid[0] == shared)
        rid = ids[0]
        shown = await hub.manager.request("show", {"rollout": rid[:8]})
        assert shown["id"] == rid
        paused = await hub.manager.request("pause", {"rollout": rid[:8]})
        assert paused == {"rollout": rid, "state": "paused"}
        with pytest.raises(NotFound):
            await hub.manager.request("show", {"rollout": "zzzz"})


async def test_a_restarted_hub_resumes_the_rollout_and_finishes_it(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "hub.json"
    nodes = ["n1", "n2", "n3"]
    hold = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        agents = {
            n: await stack.enter_async_context(
                FakeAgent(broker, topics, n, key, hold=hold if n == "n2" else None)
            )
            for n in nodes
        }
        async with Hub(broker, topics, db, key) as hub:
            hub.online(*nodes)
            rid = await hub.create(nodes, strategy={"waves": [1]})
            await until(lambda: agents["n2"].actions == ["apply"], "wave 2 to reach n2")
            assert hub.manager.summary(rid).nodes["n2"].phase == "applying"
        # The hub is gone. n2 finishes meanwhile; only its retained snapshot tells.
        hold.set()
        await until(lambda: agents["n2"].finished == ["succeeded"], "n2 to finish")
        assert agents["n3"].commands == []
        async with Hub(broker, topics, db, key) as hub:
            hub.online(*nodes)
            await until(lambda: hub.manager.summary(rid).state == "succeeded", "the resumed rollout")
            for agent in agents.values():
                assert agent.actions == ["apply"]  # n2 never got a second apply: at most a replay
                assert agent.rejected == []
            kinds = [entry["kind"] for entry in hub.manager.audit(rid)]
            assert "resumed_after_restart" in kinds
            assert kinds[-1] == "succeeded"


async def test_bad_requests_are_refused_and_change_nothing(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    async with Hub(broker, topics, tmp_path / "hub.json", key) as hub:
        hub.online("n1", "n2")
        hub.registry.on_state(
            NodeState(node="n2", state="offline", session="s-n2", reason="lost"), time.time()
        )
        with pytest.raises(InvalidInput, match="plan"):
            await hub.manager.request("create_rollout", {"name": "x", "targets": ["n1"], "plan": []})
        with pytest.raises(InvalidInput, match=r"strategy\.max_parallel"):
            await hub.create(["n1"], strategy={"max_parallel": 0})
        with pytest.raises(Conflict) as unknown:
            await hub.create(["n1", "ghost"])
        assert unknown.value.nodes == ["ghost"]
        with pytest.raises(Conflict) as offline:
            await hub.create(["n1", "n2"])
        assert offline.value.nodes == ["n2"]
        with pytest.raises(NotFound):
            await hub.manager.request("show", {"rollout": "nope"})
        with pytest.raises(InvalidInput, match="rollout"):
            await hub.manager.request("abort", {})
        assert hub.manager.summaries() == []
        # require_online false queues the offline node instead.
        rid = await hub.create(["n2"], require_online=False)
        assert hub.manager.summary(rid).nodes["n2"].phase == "pending"
        with pytest.raises(Conflict) as busy:
            await hub.create(["n2"], require_online=False)
        assert busy.value.nodes == ["n2"]


class Recorder:
    """A publish() that records what the manager sends and, for commands, what the store file held then."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.sent: list[tuple[str, bytes, bool]] = []
        self.on_disk_at_command: dict[str, bool] = {}

    async def __call__(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, retain))
        if topic.endswith("/cmd") and payload:
            command = decode(Command, payload)
            text = await asyncio.to_thread(self.db.read_text)
            self.on_disk_at_command[command.id] = command.id in text

    def commands(self) -> list[Command]:
        return [decode(Command, p) for t, p, _ in self.sent if t.endswith("/cmd") and p]

    def summaries(self, topics: Topics, rollout: str) -> list[tuple[RolloutSummary, bool]]:
        return [(decode(RolloutSummary, p), r) for t, p, r in self.sent if t == topics.rollout(rollout)]


async def test_summaries_are_coalesced_and_commands_are_on_disk_before_they_are_sent(
    topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "hub.json"
    nodes = [f"n{i:03d}" for i in range(200)]
    store = Store(db, commit_interval_s=0.02)
    await store.open()
    registry = Registry(5.0)
    for node in nodes:
        registry.on_state(NodeState(node=node, state="online", session="s", reason="birth"), time.time())
    publish = Recorder(db)
    manager = RolloutManager(
        topics=topics,
        publish=publish,
        store=store,
        registry=registry,
        signing_key=key,
        summary_interval_s=0.05,
    )
    await manager.start()
    try:
        rid = (
            await manager.request(
                "create_rollout",
                {"name": "burst", "targets": nodes, "plan": PLAN, "strategy": {"max_parallel": 100}},
            )
        )["rollout"]
        fed: set[str] = set()
        reports = 0
        deadline = time.monotonic() + DEADLINE
        while manager.summary(rid).state == "running":
            assert time.monotonic() < deadline, "the rollout did not finish"
            for command in publish.commands():
                if command.id in fed:
                    continue
                fed.add(command.id)
                for phase in ("applying", "succeeded"):
                    snapshot = JobSnapshot(
                        node=command.node, id=command.id, rollout=rid, action="apply", phase=phase
                    )
                    await manager.on_report(command.node, snapshot)
                    reports += 1
            await asyncio.sleep(0.01)
        assert manager.summary(rid).state == "succeeded"
        # Durable before visible: every command's id was in the store file when it went out.
        assert len(publish.on_disk_at_command) == 200
        assert all(publish.on_disk_at_command.values())
        # The latest state is always published last, retained...
        await until(lambda: publish.summaries(topics, rid)[-1][0].state == "succeeded", "the final summary")
        summaries = publish.summaries(topics, rid)
        assert all(retained for _, retained in summaries)
        assert summaries[-1][0].counts.succeeded == 200
        # ...and far fewer summaries go out than reports came in.
        assert reports == 400
        assert len(summaries) < reports / 10
    finally:
        await manager.stop()
        await store.close()
    assert json.loads(db.read_text())["rollouts"][rid]["state"] == "succeeded"


async def retained_summaries(broker: RunningBroker, topics: Topics) -> set[str]:
    """The rollouts whose summary the broker keeps retained (what a UI lists when it connects)."""
    found: set[str] = set()

    async def collect(look: MqttClient) -> None:
        async for message in look.messages():
            rollout = topics.parse_rollout(message.topic)
            if rollout is not None and message.payload:
                found.add(rollout)

    async with MqttClient(broker.url, client_id=f"look-{uuid.uuid4().hex[:8]}") as look:
        await look.subscribe(topics.rollout_filter)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(look), 1.0)
    return found


async def test_finished_rollouts_beyond_the_kept_ones_are_archived(
    broker: RunningBroker, topics: Topics, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = tmp_path / "hub.json"
    done: list[str] = []
    async with Hub(broker, topics, db, key, keep_rollouts=2) as hub, FakeAgent(broker, topics, "n1", key):
        hub.online("n1")
        for _ in range(4):
            done.append(await hub.create(["n1"]))
            await until(lambda: hub.state(done[-1]) == "succeeded", "the rollout to succeed")
        await until(lambda: len(hub.manager.summaries()) == 2, "the oldest two to be archived")
        assert [s.id for s in hub.manager.summaries()] == [done[3], done[2]]
        await hub.store.flush()
        # Gone from the database (records and audit), kept whole in the archive.
        stored = json.loads(db.read_text())
        assert set(stored["rollouts"]) == {done[2], done[3]}
        assert {entry["rollout"] for entry in stored["audit"].values()} == {done[2], done[3]}
        lines = [json.loads(line) for line in archive_path(db).read_text().splitlines()]
        assert [line["rollout"] for line in lines] == done[:2]
        assert all(line["record"]["state"] == "succeeded" for line in lines)
        for line in lines:  # each with its own audit trail
            assert line["audit"]
            assert {entry["rollout"] for entry in line["audit"]} == {line["rollout"]}
        # Asked for, an archived rollout is named as such; the broker no longer retains it.
        for op in ("show", "rollback"):
            with pytest.raises(NotFound, match="archived in"):
                await hub.manager.request(op, {"rollout": done[0]})
        assert await retained_summaries(broker, topics) == {done[2], done[3]}
        # The kept ones still work: a finished rollout can be rolled back.
        await hub.manager.request("rollback", {"rollout": done[3]})
        await until(lambda: hub.state(done[3]) == "rolled_back", "the rollback")

    # A restart with a smaller limit archives at once, and still knows the archived ids.
    async with Hub(broker, topics, db, key, keep_rollouts=1) as hub:
        assert [s.id for s in hub.manager.summaries()] == [done[3]]
        assert await hub.archive.holds(done[0])
        with pytest.raises(NotFound, match="archived in"):
            await hub.manager.request("show", {"rollout": done[2]})
    lines = archive_path(db).read_text().splitlines()
    assert [json.loads(line)["rollout"] for line in lines] == [done[0], done[1], done[2]]
