"""A real fleet in one event loop: the hub service (manager, store, registry) and real agents.

``LiveFleet`` starts ``hub.service.HubService`` with a signing key and a TinyDB
file in ``tmp_path``, and real ``edge_agent.service.Agent``s (the code ``fleet
agent`` runs: presence, intake, journal, runner, steps) that trust the hub's
key, each with its own state dir and a scripts dir holding ``SCRIPTS``.
Requests go over MQTT (``bus.rpc.HubClient``: the ``hub/request`` topic, as
the CLI and the TUI send them); ``http()`` gives an httpx client on the
hub's real FastAPI app (in-process ASGI).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from bus.errors import BusError
from bus.messages import Reply, RequestOp
from bus.mqtt import MqttClient
from bus.rpc import HubClient
from bus.signing import generate_keypair
from bus.topics import Topics
from edge_agent.config import AgentConfig
from edge_agent.service import Agent
from hub.config import HubConfig
from hub.http import make_app
from hub.service import HubService
from tests.conftest import RunningBroker

DEADLINE = 30.0  # generous: the machine is shared
FINAL = frozenset({"succeeded", "halted", "rolled_back", "rollback_failed", "aborted"})

#: Scripts every agent gets: record.sh appends "<phase> <script> <args>" to STATE_DIR/record.log.
SCRIPTS = {
    "record.sh": '#!/bin/sh\necho "$FLEET_PHASE $(basename "$0") $*" >> "$FLEET_STATE_DIR/record.log"\n',
    "fail.sh": (
        '#!/bin/sh\necho "$FLEET_PHASE $(basename "$0") $*" >> "$FLEET_STATE_DIR/record.log"\nexit 1\n'
    ),
}
RECORD_PLAN: list[dict[str, Any]] = [
    {"type": "script", "name": "record.sh", "args": ["2.0"], "rollback": "record.sh"}
]


async def until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` against a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


class LiveAgent:
    """One real agent of the fleet, running in a task until ``stop()``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.agent = Agent(config)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def node(self) -> str:
        return self.config.node_id

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def records(self) -> list[str]:
        path = self.state_dir / "record.log"
        return path.read_text().splitlines() if path.exists() else []

    async def start(self) -> None:
        self._task = asyncio.create_task(self.agent.run(self._stop), name=f"agent-{self.node}")
        ready = asyncio.create_task(self.agent.ready.wait())
        try:
            done, _ = await asyncio.wait({ready, self._task}, timeout=DEADLINE, return_when="FIRST_COMPLETED")
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        if self._task in done:
            self._task.result()  # raises what stopped it
            raise AssertionError(f"agent {self.node} stopped before it was ready")
        if not self.agent.ready.is_set():
            raise AssertionError(f"agent {self.node} not ready within {DEADLINE:g} s")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, DEADLINE)
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()


class LiveFleet:
    """``async with LiveFleet(broker, topics, tmp_path) as fleet:`` a hub; add agents with ``agent()``."""

    def __init__(
        self, broker: RunningBroker, topics: Topics, root: Path, *, hub_heartbeat_s: float = 1.0
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.root = root
        self.hub_heartbeat_s = hub_heartbeat_s
        self.key, self.pub = generate_keypair(root / "keys")
        self.scripts = root / "scripts"
        self.scripts.mkdir(parents=True, exist_ok=True)
        for name, text in SCRIPTS.items():
            self.add_script(name, text)
        self.hub: HubService | None = None
        self.agents: dict[str, LiveAgent] = {}
        self._client: MqttClient | None = None
        self._rpc: HubClient | None = None
        self._pump: asyncio.Task[None] | None = None

    def add_script(self, name: str, text: str, directory: Path | None = None) -> Path:
        path = (directory or self.scripts) / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    async def __aenter__(self) -> LiveFleet:
        await self.start_hub()
        self._client = MqttClient(self.broker.url, client_id=f"tool-{uuid.uuid4().hex[:8]}")
        await self._client.start()
        self._rpc = HubClient(self._client, self.topics)
        await self._rpc.subscribe()
        self._pump = asyncio.create_task(self._rpc.pump(), name="rpc-pump")
        await self.hub_ready()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for agent in list(self.agents.values()):
            await agent.stop()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._client is not None:
            await self._client.close()
        await self.stop_hub()

    async def start_hub(self) -> HubService:
        config = HubConfig(
            broker=self.broker.url,
            prefix=self.topics.prefix,
            db=self.root / "hub.json",
            client_id=f"hub-{uuid.uuid4().hex[:8]}",
            signing_key=self.key,
            heartbeat_s=self.hub_heartbeat_s,
            commit_interval_s=0.02,
        )
        self.hub = HubService(config)
        await self.hub.start()
        return self.hub

    async def hub_ready(self) -> None:
        """Wait until the hub answers requests.

        ``HubService.start`` returns before the broker acknowledged its
        subscriptions; amqtt processes them one by one, so a request sent in
        that gap is lost (the hub never sees it).
        """
        assert self._rpc is not None
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                await self._rpc.call("list", {}, timeout=0.5)
            except BusError:
                if time.monotonic() > deadline:
                    raise
            else:
                return

    async def restart_hub(self) -> HubService:
        """Stop the hub and start a new one on the same database; return once it answers."""
        await self.stop_hub()
        hub = await self.start_hub()
        await self.hub_ready()
        return hub

    async def stop_hub(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None

    async def agent(
        self,
        node: str,
        *,
        labels: Mapping[str, str] | None = None,
        scripts_dir: Path | None = None,
        start: bool = True,
        **fields: Any,
    ) -> LiveAgent:
        """Start a real agent and wait until the hub sees it online."""
        values: dict[str, Any] = {
            "broker": self.broker.url,
            "node_id": node,
            "prefix": self.topics.prefix,
            "state_dir": self.root / f"state-{node}",
            "scripts_dir": scripts_dir or self.scripts,
            "trust": [self.pub],
            "labels": dict(labels or {}),
            "heartbeat_s": 0.5,
            **fields,
        }
        config = AgentConfig(**values)
        agent = LiveAgent(config)
        self.agents[node] = agent
        if start:
            await agent.start()
            await self.wait_online(node)
        return agent

    async def wait_online(self, node: str, online: bool = True) -> None:
        def seen() -> bool:
            hub = self.hub
            return hub is not None and hub.registry.is_online(node) == online

        await until(seen, f"the hub to see {node} {'online' if online else 'offline'}")

    async def call(
        self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = DEADLINE
    ) -> Reply:
        """One request over MQTT, as the CLI sends it."""
        assert self._rpc is not None
        return await self._rpc.call(op, body or {}, timeout=timeout)

    async def ask(self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = DEADLINE) -> Any:
        """The body of a successful reply (AssertionError naming the error otherwise)."""
        reply = await self.call(op, body, timeout)
        assert reply.ok, f"{op} refused: {reply.error} {reply.body}"
        return reply.body

    def _manager(self) -> Any:
        assert self.hub is not None
        assert self.hub.manager is not None
        return self.hub.manager

    def summary(self, rollout: str) -> dict[str, Any]:
        manager: Any = self._manager()
        result: dict[str, Any] = manager.summary(rollout).model_dump(mode="json")
        return result

    def audit(self, rollout: str) -> list[dict[str, Any]]:
        manager: Any = self._manager()
        entries: list[dict[str, Any]] = manager.audit(rollout)
        return entries

    async def wait_state(self, rollout: str, *states: str, timeout: float = DEADLINE) -> dict[str, Any]:
        wanted = set(states) or set(FINAL)
        await until(
            lambda: self.summary(rollout)["state"] in wanted, f"rollout {rollout} to be {wanted}", timeout
        )
        return self.summary(rollout)

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        """An httpx client on the hub's FastAPI app (in-process ASGI)."""
        assert self.hub is not None
        app = make_app(self.hub, token)
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://hub", timeout=DEADLINE)
