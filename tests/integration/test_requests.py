"""Requests to the hub through a real broker: `fleet nodes`, `fleet rollout`, bad input of every kind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bus.errors import Conflict, InvalidInput, NotFound
from bus.messages import (
    HubState,
    Inventory,
    JobSnapshot,
    NodeSummary,
    Reply,
    RolloutCounts,
    RolloutSummary,
    StepStatus,
    decode,
    encode,
    new_id,
)
from bus.mqtt import Message, MqttClient
from bus.signing import generate_keypair
from bus.topics import Topics
from hub.config import NO_SIGNING_KEY
from hub.core.registry import Registry
from hub.requests import CreateRollout, ListRollouts, RolloutOperation, RolloutRequest
from hub.service import HubService
from tests.conftest import RunningBroker, free_port
from tests.integration.test_registry import FakeAgent, hub_config, until

pytestmark = pytest.mark.broker

SPEC = {
    "name": "app 2.0",
    "targets": ["n1"],
    "plan": [{"type": "script", "name": "install_update.sh", "args": ["2.0"], "rollback": "rollback.sh"}],
}


# ---------------------------------------------------------------------- helpers


async def fleet(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run the real `fleet` command line; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def target(broker: RunningBroker, topics: Topics) -> list[str]:
    return ["--broker", broker.url, "--prefix", topics.prefix]


class Requester:
    """Raw request/reply: publish any JSON to hub/request, collect replies."""

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.reply_topic = topics.hub_reply(client.client_id)
        self.replies: dict[str, Reply] = {}
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
            if message.topic == self.reply_topic:
                reply = decode(Reply, message.payload)
                self.replies[reply.request] = reply

    async def send(self, fields: dict[str, Any] | bytes) -> None:
        payload = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
        await self.client.publish(self.topics.hub_request, payload, qos=1, wait=True)

    async def ask(self, op: str, body: Any = None, **extra: Any) -> Reply:
        request_id = new_id()
        fields = {"v": 1, "id": request_id, "op": op, "reply_to": self.reply_topic, "body": body or {}}
        fields.update(extra)
        await self.send(fields)
        await until(lambda: request_id in self.replies, f"the reply to {op}")
        return self.replies[request_id]


@pytest.fixture
async def requester(broker: RunningBroker, topics: Topics) -> AsyncIterator[Requester]:
    async with MqttClient(broker.url) as client:
        req = Requester(client, topics)
        await req.start()
        try:
            yield req
        finally:
            await req.stop()


@pytest.fixture
async def hub(broker: RunningBroker, topics: Topics, tmp_path: Path) -> AsyncIterator[HubService]:
    service = HubService(hub_config(broker, topics, tmp_path))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class FakeManager:
    """Stands in for hub.rollouts.RolloutManager: answers requests, publishes retained summaries."""

    def __init__(
        self,
        *,
        topics: Topics,
        publish: Callable[..., Any],
        store: Any,
        registry: Registry,
        signing_key: Any,
        clock: Callable[[], float],
        **_options: Any,
    ) -> None:
        self.topics = topics
        self.publish = publish
        self.registry = registry
        self.clock = clock
        self.rollouts: dict[str, RolloutSummary] = {}
        self.node_messages: list[tuple[str, StepStatus | JobSnapshot]] = []
        self.presence: list[tuple[str, bool]] = []
        self.broker_changes: list[bool] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def set_state(self, rollout: str, state: str) -> None:
        summary = self.rollouts[rollout].model_copy(update={"state": state, "updated_at": self.clock()})
        self.rollouts[rollout] = summary
        await self.publish(self.topics.rollout(rollout), encode(summary), qos=1, retain=True)

    def summaries(self) -> list[RolloutSummary]:
        return list(self.rollouts.values())

    def is_issued(self, node: str, rollout: str, command: str) -> bool:
        return False

    async def handle(self, request: RolloutRequest) -> Any:
        if isinstance(request, CreateRollout):
            spec = request.spec
            known, unknown = self.registry.resolve(spec.targets)
            bad = unknown + [n for n in known if not self.registry.is_online(n)]
            if bad:
                raise Conflict(f"targets offline or unknown: {', '.join(bad)}", nodes=bad)
            rid = new_id()
            self.rollouts[rid] = RolloutSummary(
                id=rid,
                name=spec.name,
                state="pending",
                created_at=self.clock(),
                updated_at=self.clock(),
                counts=RolloutCounts(running=len(known)),
                waves=1,
                wave=1,
                nodes={n: NodeSummary(phase="applying", step=0) for n in known},
            )
            await self.set_state(rid, "running")
            return {"rollout": rid}
        if isinstance(request, ListRollouts):
            return list(self.rollouts.values())
        assert isinstance(request, RolloutOperation)
        op, rollout = request.op, request.rollout
        if op == "show" and rollout == "explode":
            raise RuntimeError("a bug in the manager")
        if rollout not in self.rollouts:
            raise NotFound(f"no rollout {rollout!r}")
        if op == "show":
            audit = [{"ts": 1.0, "message": "made"}]
            return {**self.rollouts[rollout].model_dump(mode="json"), "audit": audit}
        await self.set_state(rollout, "aborting" if op == "abort" else self.rollouts[rollout].state)
        return {"rollout": rollout, "state": self.rollouts[rollout].state}

    async def on_report(self, node: str, report: StepStatus | JobSnapshot) -> None:
        self.node_messages.append((node, report))

    async def on_presence(self, node: str, online: bool) -> None:
        self.presence.append((node, online))

    async def on_broker(self, connected: bool) -> None:
        self.broker_changes.append(connected)


@pytest.fixture
async def managed_hub(broker: RunningBroker, topics: Topics, tmp_path: Path) -> AsyncIterator[HubService]:
    key, _pub = generate_keypair(tmp_path / "keys")
    service = HubService(hub_config(broker, topics, tmp_path, signing_key=key), manager_factory=FakeManager)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def fake(service: HubService) -> FakeManager:
    assert isinstance(service.manager, FakeManager)
    return service.manager


# ---------------------------------------------------------------------- fleet nodes


async def test_fleet_nodes_json_and_table(hub: HubService, broker: RunningBroker, topics: Topics) -> None:
    async with (
        FakeAgent(broker, topics, "n1", labels={"role": "web"}) as one,
        FakeAgent(broker, topics, "n2", labels={"role": "db"}) as two,
    ):
        await one.heartbeat()
        await until(
            lambda: hub.registry.is_online("n2") and hub.registry.to_api("n1")["heartbeat"] is not None,
            "both nodes seen",
        )
        await two.publish_state("offline", "shutdown")
        await until(lambda: not hub.registry.is_online("n2"), "n2 offline")

        code, out, err = await fleet("nodes", *target(broker, topics), "--json")
        assert code == 0, err
        table = json.loads(out)
        assert [n["node"] for n in table] == ["n1", "n2"]
        assert table == hub.registry.all_api()
        first = table[0]
        assert list(first)[:6] == ["node", "online", "last_seen", "labels", "inventory", "job"]
        assert first["online"] is True
        assert first["labels"] == {"role": "web"}
        assert table[1]["online"] is False

        code, out, err = await fleet("nodes", *target(broker, topics))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["NODE", "STATE", "LAST"]
        assert lines[1].split()[:2] == ["n1", "online"]
        assert "role=web" in lines[1]
        assert "0.25" in lines[1]
        assert lines[2].split()[:2] == ["n2", "offline"]
        assert lines[-2] == f"hub: {hub.hub_id} active (term {hub.term})"  # DESIGN 3.9


async def test_fleet_nodes_filters_and_summary(
    hub: HubService, broker: RunningBroker, topics: Topics
) -> None:
    async with (
        FakeAgent(
            broker, topics, "web-1", labels={"role": "web"}, inventory=Inventory(services={"app": "2.0"})
        ),
        FakeAgent(
            broker, topics, "web-2", labels={"role": "web"}, inventory=Inventory(services={"app": "1.0"})
        ),
        FakeAgent(
            broker, topics, "db-1", labels={"role": "db"}, inventory=Inventory(services={"app": "2.0"})
        ) as db,
    ):
        await until(lambda: len(hub.registry.online()) == 3, "three nodes")
        await db.publish_state("offline", "shutdown")
        await until(lambda: not hub.registry.is_online("db-1"), "db-1 offline")
        where = target(broker, topics)

        async def names(*flags: str) -> list[str]:
            code, out, err = await fleet("nodes", *where, "--json", *flags)
            assert code == 0, err
            return [n["node"] for n in json.loads(out)]

        assert await names("--node", "web-*") == ["web-1", "web-2"]
        assert await names("--label", "role=db") == ["db-1"]
        assert await names("--state", "online", "--version", "app=2.0") == ["web-1"]
        assert await names("--node", "nothing-*") == []
        code, out, err = await fleet("nodes", *where, "--summary", "--json")
        assert code == 0, err
        assert json.loads(out) == {
            "total": 3,
            "by_state": {"online": 2, "offline": 1},
            "by_version": {"app": {"2.0": 2, "1.0": 1}, "fleet-agent": {"test": 3}},
        }
        code, out, err = await fleet("nodes", *where, "--summary", "--label", "role=web")
        assert code == 0, err
        assert out.splitlines()[0] == "2 nodes: 2 online, 0 offline"
        assert "app" in out.splitlines()[1]
        assert "DRIFT" in out.splitlines()[1]
        code, out, err = await fleet("nodes", *where, "--label", "novalue")
        assert code == 2
        assert "--label needs NAME=VALUE" in err


async def test_fleet_nodes_without_a_hub_fails_in_one_line(broker: RunningBroker, topics: Topics) -> None:
    code, out, err = await fleet("nodes", *target(broker, topics), "--request-timeout", "1")
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no reply from the hub" in err


async def test_a_request_while_the_hub_is_offline_fails_fast_saying_so(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    # Issue 15: the retained hub/state answers at once; no waiting out the timeout.
    service = HubService(hub_config(broker, topics, tmp_path))
    await service.start()
    await service.stop()  # publishes its retained offline state (shutdown)
    started = time.monotonic()
    code, out, err = await fleet("rollout", *target(broker, topics), "list", "--request-timeout", "30")
    took = time.monotonic() - started
    assert code == 1, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "hub offline since " in err
    assert "(it shut down)" in err
    assert took < 20, took  # the 30 s timeout was not waited out (process start-up included)
    # A hub back online answers again.
    async with HubService(hub_config(broker, topics, tmp_path)):
        code, out, err = await fleet("nodes", *target(broker, topics), "--json")
        assert code == 0, err
        assert json.loads(out) == []


async def test_nodes_can_be_paged(
    hub: HubService, requester: Requester, broker: RunningBroker, topics: Topics
) -> None:
    async with FakeAgent(broker, topics, "a"), FakeAgent(broker, topics, "b"), FakeAgent(broker, topics, "c"):
        await until(lambda: len(hub.registry.online()) == 3, "three nodes")
        page = await requester.ask("nodes", {"offset": 1, "limit": 1})
        assert page.ok
        assert [n["node"] for n in page.body] == ["b"]
        some = await requester.ask("nodes", {"nodes": ["c", "zz", "a"]})
        assert [n["node"] for n in some.body] == ["c", "a"]


async def test_big_node_tables_come_in_smaller_pages(
    hub: HubService, requester: Requester, broker: RunningBroker, topics: Topics
) -> None:
    # ~100 KB of inventory per node: three of them exceed the 256 KB payload limit.
    packages = {f"package-{i:05d}": f"1.2.{i}-1+deb12u1" for i in range(3000)}
    big = Inventory(packages=packages)
    async with (
        FakeAgent(broker, topics, "a", inventory=big),
        FakeAgent(broker, topics, "b", inventory=big),
        FakeAgent(broker, topics, "c", inventory=big),
    ):
        await until(lambda: len(hub.registry.online()) == 3, "three nodes")
        whole = await requester.ask("nodes")
        assert not whole.ok
        assert whole.body == {"kind": "too_large"}
        assert whole.error is not None
        assert "offset/limit" in whole.error
        code, out, err = await fleet("nodes", *target(broker, topics), "--json")
        assert code == 0, err
        table = json.loads(out)
        assert [n["node"] for n in table] == ["a", "b", "c"]
        assert table[2]["inventory"]["packages"] == packages


# ---------------------------------------------------------------------- bad input


GARBAGE: list[bytes] = [
    os.urandom(300),
    b"\xff\xfe\x00garbage",
    b"null",
    b"[]",
    b"{}",
    b'"a string"',
    b"1e999999",
    b'{"v": 1, "node": 5, "state": [], "session": {}, "seq": "x", "op": 7, "id": null}',
    b'{"v": 2, "node": "n1", "state": "online", "session": "s", "reason": "birth"}',
    b'{"v": 1, "node": "someone-else", "state": "online", "session": "s", "reason": "birth"}',
    b'{"big": "' + b"x" * 300_000 + b'"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"v": 1, "node": "n1", "seq": NaN}',
]


async def test_malformed_payloads_on_every_topic_crash_nothing(
    hub: HubService, requester: Requester, broker: RunningBroker, topics: Topics
) -> None:
    async with FakeAgent(broker, topics, "n1", labels={"keep": "me"}) as agent:
        await until(lambda: hub.registry.is_online("n1"), "n1 online")
        channels = [topics.node("n1", c) for c in ("state", "heartbeat", "status", "job")]
        for topic in [*channels, topics.hub_request]:
            for payload in GARBAGE:
                await agent.client.publish(topic, payload, qos=1)
        # A topic naming no valid node, and an empty (retained-clearing) payload.
        await agent.client.publish(f"{topics.prefix}/node/bad id!/state", b"{}", qos=1)
        await agent.client.publish(topics.node("n1", "job"), b"", qos=1, wait=True)
        expected = len(GARBAGE) * 5
        await until(lambda: hub.malformed >= expected, f"{expected} malformed messages handled")
        assert hub.malformed == expected
        # Nothing changed, and the hub still answers.
        assert hub.registry.is_online("n1")
        assert hub.registry.to_api("n1")["labels"] == {"keep": "me"}
        reply = await requester.ask("nodes")
        assert reply.ok
        assert [n["node"] for n in reply.body] == ["n1"]


async def test_reply_to_outside_the_reply_space_is_never_used(
    hub: HubService, requester: Requester, topics: Topics
) -> None:
    cmd = topics.node("n1", "cmd")
    bad_targets = [
        cmd,
        "../../node/n1/cmd",
        f"{topics.prefix}/hub/reply/../../node/n1/cmd",
        f"{topics.prefix}/hub/reply/a/b",
        "+",
        "#",
        "other/v1/hub/reply/x",
        "x" * 200,
    ]
    for reply_to in bad_targets:
        await requester.send({"v": 1, "id": new_id(), "op": "nodes", "reply_to": reply_to, "body": {}})
        # A bad request too: refusing it must not use the bad reply_to either.
        await requester.send({"v": 1, "id": new_id(), "op": "nope", "reply_to": reply_to})
    good = await requester.ask("nodes")
    assert good.ok
    hub_published = [
        m
        for m in requester.seen
        if m.topic not in (topics.hub_request, topics.hub_state) and "/hub/member/" not in m.topic
    ]
    assert [m.topic for m in hub_published] == [requester.reply_topic]
    assert not any(m.topic == cmd for m in requester.seen)


async def test_bad_requests_get_ok_false_with_a_reason(hub: HubService, requester: Requester) -> None:
    request_id = new_id()
    await requester.send({"v": 1, "id": request_id, "op": "explode", "reply_to": requester.reply_topic})
    await until(lambda: request_id in requester.replies, "the reply to a bad op")
    reply = requester.replies[request_id]
    assert not reply.ok
    assert reply.error is not None
    assert "op" in reply.error

    extra = await requester.ask("nodes", surprise=1)
    assert not extra.ok
    assert extra.error is not None
    assert "surprise" in extra.error
    assert extra.body == {"kind": "invalid_input"}

    not_object = await requester.ask("nodes", body=[1, 2])
    assert not not_object.ok
    assert not_object.error is not None
    assert "body" in not_object.error

    offset = await requester.ask("nodes", {"offset": -1})
    assert not offset.ok
    assert offset.error == "offset must be a non-negative integer"

    no_key = await requester.ask("list")
    assert not no_key.ok
    assert no_key.error == NO_SIGNING_KEY
    assert no_key.body == {"kind": "config"}

    # Through the in-process door (the HTTP bridge's path) too.
    with pytest.raises(InvalidInput, match="unknown op"):
        await hub.request("drop_tables", {})
    assert (await requester.ask("nodes")).ok


# ---------------------------------------------------------------------- the manager seam


async def test_manager_gets_reports_presence_and_errors_map_to_replies(
    managed_hub: HubService, requester: Requester, broker: RunningBroker, topics: Topics
) -> None:
    manager = fake(managed_hub)
    assert manager.started
    async with FakeAgent(broker, topics, "n1") as agent:
        await until(lambda: ("n1", True) in manager.presence, "presence reported")
        status = StepStatus(
            node="n1", command="c1", rollout="r1", index=0, type="script", state="running", ts=time.time()
        )
        job = JobSnapshot(node="n1", id="c1", rollout="r1", action="apply", phase="applying")
        await agent.client.publish(topics.node("n1", "status"), encode(status), qos=1)
        await agent.client.publish(topics.node("n1", "job"), encode(job), qos=1, retain=True)
        await until(lambda: len(manager.node_messages) == 2, "reports forwarded")
        assert manager.node_messages == [("n1", status), ("n1", job)]
        await agent.publish_state("offline", "lost")
        await until(lambda: ("n1", False) in manager.presence, "offline reported")

    refused = await requester.ask("create_rollout", {**SPEC, "targets": ["n1", "ghost"]})
    assert not refused.ok
    assert refused.body == {"kind": "conflict", "nodes": ["ghost", "n1"]}
    assert refused.error is not None
    assert "ghost" in refused.error

    missing = await requester.ask("show", {"rollout": "nope"})
    assert not missing.ok
    assert missing.body == {"kind": "not_found"}

    crash = await requester.ask("show", {"rollout": "explode"})
    assert not crash.ok
    assert crash.error == "internal error"

    listing = await requester.ask("list")
    assert listing.ok
    assert listing.body == []


async def test_fleet_rollout_command_line(
    managed_hub: HubService, broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    manager = fake(managed_hub)
    where = target(broker, topics)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({**SPEC, "plan": [{"type": "script"}]}))
    not_json = tmp_path / "not.json"
    not_json.write_text("{targets: all")

    # Bad input: exit 2, one line naming the problem; nothing reaches the hub.
    code, out, err = await fleet("rollout", *where, "create", str(bad_file))
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert "plan.0.name: Field required" in err
    code, _out, err = await fleet("rollout", *where, "create", str(not_json))
    assert code == 2
    assert "not valid JSON" in err

    # Refused: an offline target is named, exit 1.
    code, out, err = await fleet("rollout", *where, "create", str(spec_file))
    assert (code, out) == (1, "")
    assert "n1" in err
    assert len(err.strip().splitlines()) == 1
    assert manager.rollouts == {}

    async with FakeAgent(broker, topics, "n1"):
        await until(lambda: managed_hub.registry.is_online("n1"), "n1 online")

        # --wait: the id on stdout at once, progress on stderr, exit 0 only for succeeded.
        for final, expected_code in (("succeeded", 0), ("rolled_back", 1)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cli.main",
                "rollout",
                "create",
                str(spec_file),
                "--wait",
                "--timeout",
                "60",
                *where,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                assert proc.stderr is not None
                rid = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
                assert rid in manager.rollouts
                first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
                assert f"rollout {rid[:8]} running" in first
                await manager.set_state(rid, final)
                out_rest, err_rest = await asyncio.wait_for(proc.communicate(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == expected_code, err_rest
            assert out_rest == b""
            assert f"rollout {rid[:8]} {final}" in err_rest.decode()

        code, out, err = await fleet("rollout", *where, "list", "--json")
        assert code == 0, err
        assert sorted(s["id"] for s in json.loads(out)) == sorted(manager.rollouts)
        code, out, err = await fleet("rollout", *where, "list")
        assert code == 0
        assert out.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]
        assert all(rid in out for rid in manager.rollouts)

        rid = next(iter(manager.rollouts))
        code, out, err = await fleet("rollout", *where, "show", rid)
        assert code == 0, err
        assert rid in out
        assert "n1" in out
        assert "made" in out
        code, out, err = await fleet("rollout", *where, "show", rid, "--json")
        assert code == 0
        assert json.loads(out)["id"] == rid

        code, out, err = await fleet("rollout", *where, "abort", rid)
        assert code == 0, err
        assert "abort accepted" in out
        assert manager.rollouts[rid].state == "aborting"

        code, out, err = await fleet("rollout", *where, "abort", "no-such-rollout")
        assert code == 1
        assert "no rollout" in err


async def test_rollout_wait_times_out_with_exit_1(
    managed_hub: HubService, broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    async with FakeAgent(broker, topics, "n1"):
        await until(lambda: managed_hub.registry.is_online("n1"), "n1 online")
        code, out, err = await fleet(
            "rollout", *target(broker, topics), "create", str(spec_file), "--wait", "--timeout", "1"
        )
    assert code == 1
    assert out.strip() in fake(managed_hub).rollouts
    assert "gave up after 1 s" in err
    assert "running" in err


# ---------------------------------------------------------------------- fleet hub


async def test_fleet_hub_process_serves_until_sigterm(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    key, _pub = generate_keypair(tmp_path / "keys")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "hub",
        *target(broker, topics),
        "--db",
        str(tmp_path / "hub.json"),
        "--signing-key",
        str(key),
        "--http",
        f"127.0.0.1:{port}",
        "--client-id",
        f"hub-{new_id()[:8]}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert ready.startswith("fleet hub: connected to")
        assert f"127.0.0.1:{port}" in ready
        code, out, err = await fleet("nodes", *target(broker, topics), "--json")
        assert code == 0, err
        assert json.loads(out) == []
        async with httpx.AsyncClient() as http:

            async def healthy() -> bool:
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/api/health")
                except httpx.TransportError:
                    return False
                return response.status_code == 200 and response.json()["ok"] is True

            deadline = time.monotonic() + 30
            while not await healthy():
                assert time.monotonic() < deadline, "the HTTP bridge never answered"
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _out, err_rest = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err_rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with MqttClient(broker.url) as spy:
        await spy.subscribe(topics.hub_state)
        state = decode(HubState, (await asyncio.wait_for(spy.messages().__anext__(), 10)).payload)
    assert state.state == "offline"
    assert state.reason == "shutdown"


async def test_fleet_hub_usage_errors_exit_2_in_one_line(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    db = ["--db", str(tmp_path / "hub.json")]
    code, _out, err = await fleet("hub", *target(broker, topics), *db, "--http", "0.0.0.0:8080")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "without a token" in err
    no_key = str(tmp_path / "no.key")
    code, _out, err = await fleet("hub", *target(broker, topics), *db, "--signing-key", no_key)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "fleet keys generate --out DIR" in err
    assert not (tmp_path / "hub.json").exists()
