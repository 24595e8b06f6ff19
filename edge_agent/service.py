"""The agent process: presence on the bus, command intake, clean shutdown.

``Agent.run`` connects with a last will of a fresh session on every connect,
publishes a retained birth after every (re)connect, sends heartbeats every
``heartbeat_s``, subscribes to its own ``cmd`` topic only, and hands each
command message to the command runner (``edge_agent.runner.CommandRunner``).
When ``stop`` is set (SIGTERM/SIGINT in ``fleet agent``) it publishes a
retained offline state with reason ``shutdown`` in the same session, closes
the runner and disconnects cleanly, so the broker sends no will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from bus import memory
from bus.messages import Inventory, JobRef, encode
from bus.mqtt import MqttClient, Will
from bus.publisher import Publish
from bus.topics import Topics
from edge_agent.claims import Claim, disagreements
from edge_agent.config import AgentConfig
from edge_agent.inventory import collect_inventory
from edge_agent.presence import Presence, sample_system
from edge_agent.settings import ExecutorSettings

__all__ = ["Agent", "CommandHandler", "RunnerFactory"]

_LOGGER = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 5.0
_RUNNER_CLOSE_TIMEOUT_S = 15.0


class CommandHandler(Protocol):
    """What the agent needs of its command runner (edge_agent/runner.py)."""

    async def recover(self) -> None:
        """Finish what an earlier run left (journal); called once after connecting."""

    async def handle_command(self, topic: str, payload: bytes) -> None:
        """Take one message from the node's ``cmd`` topic; returns quickly."""

    def current_job(self) -> JobRef | None:
        """The job in progress, for heartbeats."""

    async def close(self) -> None:
        """Stop work and release everything."""


RunnerFactory = Callable[[ExecutorSettings, Topics, Publish], CommandHandler]


def default_runner(settings: ExecutorSettings, topics: Topics, publish: Publish) -> CommandHandler:
    """``edge_agent.runner.CommandRunner``, imported only when an agent starts."""
    from edge_agent.runner import CommandRunner

    return CommandRunner(settings, topics, publish)


class Agent:
    """One node's agent; ``await Agent(config).run(stop)`` until ``stop`` is set.

    Args:
        config: the agent's configuration.
        runner_factory: builds the command runner (default: edge_agent.runner.CommandRunner).
        clock: wall-clock time, for timestamps.
        inventory: collects what the node runs, at start and after each job (default:
            probe the machine for the configured packages, drivers and services).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        runner_factory: RunnerFactory | None = None,
        clock: Callable[[], float] = time.time,
        inventory: Callable[[], Awaitable[Inventory]] | None = None,
    ) -> None:
        self.config = config
        self.topics = config.topics
        self._runner_factory = runner_factory or default_runner
        self._inventory_source = inventory or self._probe_inventory
        self._clock = clock
        self._started = time.monotonic()
        self.presence = Presence(
            config.node_id,
            self.topics,
            labels=dict(config.labels),
            heartbeat_s=config.heartbeat_s,
            started_at=clock(),
        )
        self._inventory = Inventory()
        self._claims: dict[str, tuple[str, str | None]] = {}  # subject -> (seen, reported then)
        self._stopping = False
        self._client: MqttClient | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._runner: CommandHandler | None = None
        self._refresh_lock = asyncio.Lock()
        self._runner_reports_jobs = False
        self.ready = asyncio.Event()
        """Set once connected, recovered and taking commands (the simulator and tests wait on it)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down cleanly.

        Raises:
            ConfigError: a trust or policy file cannot be used.
        """
        settings = await asyncio.to_thread(self.config.to_executor_settings)
        await asyncio.to_thread(settings.state_dir.mkdir, parents=True, exist_ok=True)
        self._inventory = await self._collect_inventory()
        client = MqttClient(
            self.config.broker,
            client_id=f"agent-{self.config.node_id}",
            will=self.next_will,
            keepalive=self.config.keepalive_s,
            spread=True,  # a cluster's servers share the fleet out
        )
        self._client = client
        client.on_connect(self._publish_birth)
        await client.subscribe(self.presence.cmd_topic, qos=1)
        # The active hub's signed term (DESIGN 3.9); an older ACL may refuse it: not waited for.
        await client.subscribe(self.topics.hub_state, qos=1, optional=True)
        runner = self._runner_factory(settings, self.topics, client.publish)
        self._runner = runner
        watch = getattr(runner, "watch_versions", None)
        self._runner_reports_jobs = callable(watch)
        if callable(watch):  # the runner re-reads versions as each job ends (no heartbeat lag)
            watch(self.refresh_inventory)
        tasks: list[asyncio.Task[None]] = []
        try:
            await client.start(wait=False)
            if await _first(client.wait_connected(), stop.wait()) == 0:
                await runner.recover()
                tasks.append(asyncio.create_task(self._heartbeats(client, runner), name="heartbeats"))
                tasks.append(asyncio.create_task(self._commands(client, runner), name="commands"))
                self.ready.set()
                memory.release_soon()  # what start-up built and dropped (imports, schemas, inventory)
                _LOGGER.info("agent %s ready (session %s)", self.config.node_id, self.presence.session)
                await stop.wait()
        finally:
            await self._shut_down(client, runner, tasks)

    # ------------------------------------------------------------------ presence

    def next_will(self) -> Will:
        """Called by the client before every connect attempt: a fresh session and its will."""
        self.presence.new_session()
        return Will(self.presence.state_topic, encode(self.presence.will()), qos=1, retain=True)

    async def _publish_birth(self) -> None:
        client = self._client
        if self._stopping or client is None or client.missing_subscriptions:
            return  # not reachable yet: the client's on_connect hook announces it once subscribed
        birth = self.presence.birth(self._inventory)
        await client.publish(self.presence.state_topic, encode(birth), qos=1, retain=True)
        _LOGGER.info("birth of %s published (session %s)", birth.node, birth.session)
        # A broker restarted without persistence lost the retained job snapshot: say it again.
        republish = getattr(self._runner, "republish_snapshot", None)
        if republish is not None:
            await republish()

    async def _probe_inventory(self) -> Inventory:
        config = self.config
        return await collect_inventory(
            packages=config.packages,
            drivers=config.drivers,
            services=config.services,
            state_dir=config.state_dir,
            tools=config.system_tools(),
        )

    async def _collect_inventory(self) -> Inventory:
        try:
            return await self._inventory_source()
        except Exception:  # the birth goes out without an inventory rather than not at all
            _LOGGER.exception("inventory failed")
            return Inventory()

    async def refresh_inventory(self, claims: Sequence[Claim] = ()) -> Inventory:
        """Re-read what the node runs; re-announce it (retained birth) at once if it changed.

        The runner calls it as every job ends (with what the job's health checks saw
        answering: ``claims``) and when it verifies a restore. A seen version the
        re-read versions do not bear out goes into ``Inventory.health_saw`` until
        the subject's reported version changes or a later check says otherwise.
        Serialized: a read that started before a job's last change never
        overwrites one that started after it.
        """
        async with self._refresh_lock:
            inventory = self._held_against(await self._collect_inventory(), claims)
            if inventory == self._inventory:
                return inventory  # the retained birth still tells the truth
            changed = _changed_versions(self._inventory, inventory)
            self._inventory = inventory
            _LOGGER.info("versions changed (%s): birth re-published", changed)
            try:
                await self._publish_birth()
            except Exception as exc:  # the next (re)connect publishes it anyway
                _LOGGER.warning("could not re-publish the birth: %s", exc)
            memory.release_soon()  # what the job and the scan freed
            return inventory

    def _held_against(self, inventory: Inventory, claims: Sequence[Claim]) -> Inventory:
        reported = {**inventory.drivers, **inventory.packages, **inventory.services}
        kept = {s: c for s, c in self._claims.items() if reported.get(s) == c[1]}  # still speaks
        for claim in claims:
            kept[claim.subject] = (claim.version, reported.get(claim.subject))
            if claim.version and claim.subject in disagreements({claim.subject: claim.version}, reported):
                _LOGGER.warning(
                    "%s reports version %s, but its health check (%s) just saw %s answering",
                    claim.subject,
                    reported[claim.subject],
                    claim.check,
                    claim.version,
                )
        self._claims = {s: c for s, c in kept.items() if c[0]}
        saw = disagreements({s: c[0] for s, c in kept.items()}, reported)
        return inventory.model_copy(update={"health_saw": saw}) if saw else inventory

    async def _refresh_inventory(self) -> None:
        await self.refresh_inventory()

    async def _heartbeats(self, client: MqttClient, runner: CommandHandler) -> None:
        period = self.config.heartbeat_s
        next_at = time.monotonic()
        last_job: JobRef | None = None
        while True:
            job = _current_job(runner)
            if (
                not self._runner_reports_jobs
                and last_job is not None
                and (job is None or job.command != last_job.command)
            ):
                # A runner that does not report its jobs' ends: only a job seen by a
                # heartbeat is noticed (a job shorter than heartbeat_s is missed).
                self._start_refresh()
            last_job = job
            if client.is_connected:
                sample = await asyncio.to_thread(sample_system, self.config.state_dir)
                beat = self.presence.heartbeat(
                    now=self._clock(), uptime_s=time.monotonic() - self._started, sample=sample, job=job
                )
                await client.publish(self.presence.heartbeat_topic, encode(beat), qos=0)
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspended, overloaded): do not burst to catch up
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _start_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._refresh_inventory(), name="inventory")

    # ------------------------------------------------------------------ commands

    async def _commands(self, client: MqttClient, runner: CommandHandler) -> None:
        wanted = (self.presence.cmd_topic, self.topics.hub_state)
        async for message in client.messages():
            if message.topic not in wanted:
                # Only these two are subscribed; anything else is a broker leak (FINDINGS 1).
                _LOGGER.warning("ignored a message on %s: not this node's cmd topic", message.topic)
                continue
            try:
                await runner.handle_command(message.topic, message.payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # bad input must never stop the agent (DESIGN section 7)
                _LOGGER.exception("command runner failed on a message of %d bytes", len(message.payload))

    # ------------------------------------------------------------------ shutdown

    async def _shut_down(
        self, client: MqttClient, runner: CommandHandler, tasks: list[asyncio.Task[None]]
    ) -> None:
        self._stopping = True
        for task in (*tasks, self._refresh_task):
            if task is not None:
                task.cancel()
        for task in (*tasks, self._refresh_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if client.is_connected:
            payload = encode(self.presence.shutdown())
            try:
                await asyncio.wait_for(
                    client.publish(self.presence.state_topic, payload, qos=1, retain=True, wait=True),
                    _SHUTDOWN_TIMEOUT_S,
                )
            except Exception as exc:  # the will still covers us if this fails
                _LOGGER.warning("could not publish the shutdown state: %s", exc)
        try:
            await asyncio.wait_for(runner.close(), _RUNNER_CLOSE_TIMEOUT_S)
        except Exception:
            _LOGGER.exception("command runner did not close cleanly")
        await client.close()
        _LOGGER.info("agent %s stopped", self.config.node_id)


def _changed_versions(old: Inventory, new: Inventory) -> str:
    """``demo-app 1.0 -> 2.0, ...``: what changed between two inventories, for the log."""
    parts = []
    for kind in ("services", "packages", "drivers"):
        before, after = getattr(old, kind), getattr(new, kind)
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                parts.append(f"{name} {before.get(name, '-')} -> {after.get(name, '-')}")
    return ", ".join(parts) or "os"


def _current_job(runner: CommandHandler) -> JobRef | None:
    try:
        return runner.current_job()
    except Exception:
        _LOGGER.exception("command runner failed to report its job")
        return None


async def _first(*awaitables: Awaitable[Any]) -> int:
    """Index of the awaitable that finishes first; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(i for i, t in enumerate(tasks) if t in done)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
