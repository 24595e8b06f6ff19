"""The hub process: one MQTT client, the fleet registry, the store and the rollout manager.

``HubService`` subscribes to every node's ``state``, ``heartbeat``, ``status``
and ``job`` topic and to ``hub/request`` (DESIGN section 1). Every payload is
parsed with ``bus.messages.decode``; a malformed one costs a log line and
nothing else. Presence goes through the pure ``Registry`` (a timer expires
silent nodes); step reports and job snapshots, and presence transitions, go to
the ``RolloutManager``. Requests are answered on the requester's reply topic
and nowhere else (``Topics.parse_reply_to``).

Start order: open the store and restore the registry, connect and subscribe,
start the manager (which reloads its rollouts and may publish), and only then
read messages, so the retained births and job snapshots (queued in the
client meanwhile) flow into a ready hub. Stop order: publish the
hub's offline state, stop the manager, flush and close the store, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from bus.errors import BusError, ConfigError, Conflict, FleetError, InvalidInput, NotFound
from bus.messages import (
    MAX_PAYLOAD_BYTES,
    PLAN_PREFIX,
    Event,
    Heartbeat,
    HubState,
    JobSnapshot,
    NodeState,
    Reply,
    Request,
    RequestOp,
    StepStatus,
    decode,
    encode,
    loads_object,
    new_id,
)
from bus.mqtt import Message, MqttClient, Will
from bus.signing import load_private_key
from bus.topics import Topics
from hub.config import NO_SIGNING_KEY, HubConfig
from hub.metrics import HubMetrics, MetricsSource
from hub.registry import Registry, Transition
from hub.retention import Archive, archive_path
from hub.store import Store

__all__ = ["HubService", "ManagerFactory", "RolloutManagerLike", "steady_wall_clock"]

_LOGGER = logging.getLogger(__name__)

_VERSION = "0.1.0"
_OPS: frozenset[str] = frozenset(get_args(RequestOp))
_MAX_CONCURRENT_REQUESTS = 32
_ERROR_KINDS: tuple[tuple[type[FleetError], str], ...] = (
    (Conflict, "conflict"),
    (NotFound, "not_found"),
    (InvalidInput, "invalid_input"),
    (ConfigError, "config"),
    (BusError, "bus"),
)


class RolloutManagerLike(Protocol):
    """What the hub needs of ``hub.rollouts.RolloutManager``."""

    async def start(self) -> None:
        """Reload rollouts from the store and resume them."""

    async def stop(self) -> None:
        """Stop timers; everything is in the store."""

    async def request(self, op: str, body: dict[str, Any]) -> Any:
        """Answer one rollout request (raises FleetError subclasses)."""

    async def on_node_message(self, node: str, channel: str, payload: Any) -> None:
        """A node's ``StepStatus`` (channel "status") or ``JobSnapshot`` (channel "job")."""

    async def on_presence(self, node: str, online: bool) -> None:
        """A node went online or offline."""


#: Builds the manager: called with topics, publish, store, registry, signing_key, clock.
ManagerFactory = Callable[..., RolloutManagerLike]


def _default_manager_factory(**kwargs: Any) -> RolloutManagerLike:
    module = importlib.import_module("hub.rollouts")
    manager: RolloutManagerLike = module.RolloutManager(**kwargs)
    return manager


def _jsonable(value: Any) -> Any:
    """Reply bodies as plain JSON values (pydantic models dumped)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def steady_wall_clock() -> Callable[[], float]:
    """Wall-clock seconds that never jump: the start's ``time.time()`` plus monotonic time since.

    Presence deadlines use it, so an NTP step of the system clock cannot expire
    (or revive) every node at once; ``last_seen`` stays close to wall time.
    """
    wall, mono = time.time(), time.monotonic()
    return lambda: wall + (time.monotonic() - mono)


def _shown(value: object, limit: int = 80) -> str:
    return re.sub(r"\s+", " ", repr(value))[:limit]


class HubService:
    """The hub's asyncio runner; ``async with HubService(config) as hub:`` or start()/stop().

    Args:
        config: the hub's configuration.
        clock: wall-clock time source of the rollouts; presence uses a steady
            version of it (``steady_wall_clock``) unless another clock is given.
        manager_factory: builds the rollout manager (default: ``hub.rollouts.RolloutManager``).
        expire_interval_s: how often silent nodes are looked for.
    """

    def __init__(
        self,
        config: HubConfig,
        *,
        clock: Callable[[], float] = time.time,
        manager_factory: ManagerFactory | None = None,
        expire_interval_s: float = 0.5,
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.store = Store(config.db, commit_interval_s=config.commit_interval_s)
        self.registry = Registry(config.heartbeat_s)
        self.manager: RolloutManagerLike | None = None
        #: Why rollout requests are refused when there is no manager.
        self.manager_error: FleetError | None = None
        self._clock = clock
        self._now = steady_wall_clock() if clock is time.time else clock
        self._manager_factory = manager_factory or _default_manager_factory
        self._expire_interval_s = expire_interval_s
        self._session = new_id()
        self._started_at = clock()
        self._client: MqttClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self._request_slots = asyncio.Semaphore(_MAX_CONCURRENT_REQUESTS)
        self._running = False
        #: Messages dropped as malformed (for metrics).
        self.malformed = 0
        self.metrics = HubMetrics(
            MetricsSource(
                nodes=self._node_counts,
                rollouts_by_state=self._rollout_counts,
                messages=self._message_counts,
                store_commit_s=lambda: self.store.last_commit_s,
                store_rewrites=lambda: self.store.rewrites,
            )
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> HubService:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    @property
    def is_connected(self) -> bool:
        """True while the broker connection is up."""
        return self._client is not None and self._client.is_connected

    @property
    def client(self) -> MqttClient | None:
        """The hub's MQTT client (for the HTTP bridge's health)."""
        return self._client

    async def start(self) -> None:
        """Open the store, connect and subscribe, start the manager, then read messages.

        Raises:
            ConfigError: the database or the signing key cannot be used.
            BusError: no broker connection within the client's connect timeout.
        """
        key: Ed25519PrivateKey | None = None
        if self.config.signing_key is not None:
            # A bad key is a usage error: fail before touching the database or the broker.
            try:
                key = await asyncio.to_thread(load_private_key, self.config.signing_key)
            except ConfigError as exc:
                hint = NO_SIGNING_KEY.removeprefix("no signing key: ")
                raise ConfigError(f"{exc.reason} ({hint})") from exc
        await self.store.open()
        try:
            restored = self.registry.restore(self.store.all("nodes"), self._now())
            _LOGGER.info("hub database %s: %d nodes known", self.config.db, restored)
            self._client = MqttClient(
                self.config.broker,
                client_id=self.config.client_id,
                will=self._will,
            )
            self._client.on_connect(self._on_connected)
            for channel in ("state", "heartbeat", "status", "job"):
                await self._client.subscribe(self.topics.node_filter(channel), qos=1)
            await self._client.subscribe(self.topics.hub_request, qos=1)
            self._running = True
            await self._client.start()
            # Messages (retained births and job snapshots first) wait in the client's
            # queue until the manager has reloaded its rollouts and can take them.
            await self._start_manager(key)
            self._spawn(self._message_loop(), "hub-messages")
            self._spawn(self._expire_loop(), "hub-expire")
        except BaseException:
            await self._teardown()
            raise
        _LOGGER.info("hub connected to %s, prefix %s", self._client.url.redacted(), self.config.prefix)

    async def stop(self) -> None:
        """Publish the offline state, stop the manager, flush the store, disconnect."""
        if not self._running:
            return
        self._running = False
        client = self._client
        if client is not None and client.is_connected:
            state = HubState(
                state="offline",
                session=self._session,
                reason="shutdown",
                version=_VERSION,
                started_at=self._started_at,
            )
            with contextlib.suppress(BusError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.publish(self.topics.hub_state, encode(state), qos=1, retain=True, wait=True), 5
                )
        await self._teardown()

    async def _teardown(self) -> None:
        self._running = False
        for task in (*self._tasks, *self._requests):
            task.cancel()
        for task in (*self._tasks, *self._requests):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.manager is not None:
            try:
                await self.manager.stop()
            except Exception:
                _LOGGER.exception("rollout manager failed to stop cleanly")
        try:
            await self.store.close()
        except FleetError as exc:
            _LOGGER.error("hub database not flushed: %s", exc.reason)  # noqa: TRY400
        if self._client is not None:
            await self._client.close()

    async def _start_manager(self, key: Ed25519PrivateKey | None) -> None:
        if key is None:
            self.manager_error = ConfigError(NO_SIGNING_KEY)
            _LOGGER.warning("%s; rollouts are refused", NO_SIGNING_KEY)
            return
        try:
            self.manager = self._manager_factory(
                topics=self.topics,
                publish=self.publish,
                store=self.store,
                registry=self.registry,
                signing_key=key,
                clock=self._clock,
                keep_rollouts=self.config.keep_rollouts,
                archive=Archive(archive_path(self.config.db)),
            )
        except ModuleNotFoundError as exc:
            if exc.name != "hub.rollouts":
                raise
            self.manager_error = FleetError("rollouts not available")
            _LOGGER.warning("hub.rollouts is missing: rollouts not available")
            return
        await self.manager.start()

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _will(self) -> Will:
        # A fresh session per connection; the birth of that connection reuses it.
        self._session = new_id()
        state = HubState(
            state="offline",
            session=self._session,
            reason="lost",
            version=_VERSION,
            started_at=self._started_at,
        )
        return Will(self.topics.hub_state, encode(state), qos=1, retain=True)

    async def _on_connected(self) -> None:
        # The hub was blind while disconnected; the nodes were not silent.
        self.registry.refresh(self._now())
        state = HubState(
            state="online",
            session=self._session,
            reason="birth",
            version=_VERSION,
            started_at=self._started_at,
        )
        await self.publish(self.topics.hub_state, encode(state), qos=1, retain=True)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, wait: bool = False
    ) -> None:
        """Publish through the hub's client (what the rollout manager is given)."""
        if self._client is None:
            raise BusError("hub is not connected")
        await self._client.publish(topic, payload, qos=qos, retain=retain, wait=wait)

    # ------------------------------------------------------------------ metrics

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the hub's metrics (``GET /metrics``)."""
        return self.metrics.render()

    def _node_counts(self) -> tuple[int, int]:
        online = len(self.registry.online())
        return online, len(self.registry.nodes()) - online

    def _rollout_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        summaries = getattr(self.manager, "summaries", None)
        if summaries is None:
            return counts
        try:
            for summary in summaries():
                if isinstance(summary, Mapping):
                    state = summary.get("state")
                else:
                    state = getattr(summary, "state", None)
                if isinstance(state, str):
                    counts[state] = counts.get(state, 0) + 1
        except Exception:
            _LOGGER.exception("rollout summaries for metrics failed")
        return counts

    def _message_counts(self) -> tuple[int, int]:
        if self._client is None:
            return 0, 0
        return self._client.stats.received, self._client.stats.sent

    # ------------------------------------------------------------------ requests

    async def request(self, op: str, body: Mapping[str, Any] | None = None) -> Any:
        """Carry out one request; the MQTT path and the HTTP bridge both call this.

        Returns:
            The reply body, as plain JSON values.

        Raises:
            FleetError: the request is refused (InvalidInput, NotFound, Conflict...).
        """
        if op not in _OPS:
            raise InvalidInput(f"unknown op {_shown(op, 40)}; one of {', '.join(sorted(_OPS))}")
        if op == "nodes":
            return self._nodes_reply(body or {})
        if self.manager is None:
            raise self.manager_error or FleetError("rollouts not available")
        return _jsonable(await self.manager.request(op, dict(body or {})))

    def _nodes_reply(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The node table, optionally one page of it (``offset``, ``limit``) or some nodes."""
        offset, limit = body.get("offset", 0), body.get("limit")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InvalidInput("limit must be a positive integer")
        names = body.get("nodes")
        if names is None:
            selected = self.registry.nodes()
        elif isinstance(names, list) and all(isinstance(n, str) for n in names):
            selected = [n for n in names if self.registry.get(n) is not None]
        else:
            raise InvalidInput("nodes must be a list of node ids")
        end = None if limit is None else offset + limit
        return [self.registry.to_api(name) for name in selected[offset:end]]

    async def _answer(self, payload: bytes) -> None:
        """Decode one request and publish its reply on the requester's reply topic."""
        try:
            request = decode(Request, payload)
        except InvalidInput as exc:
            self.malformed += 1
            await self._refuse_malformed(payload, exc.reason)
            return
        try:
            reply_topic = self.topics.parse_reply_to(request.reply_to)
        except InvalidInput as exc:
            _LOGGER.warning("request %s (%s) refused, no reply sent: %s", request.id, request.op, exc.reason)
            return
        reply = await self._reply_for(request.id, request.op, request.body)
        data = encode(reply)
        if len(data) > MAX_PAYLOAD_BYTES:
            reply = Reply(
                request=request.id,
                ok=False,
                body={"kind": "too_large"},
                error=f"reply of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit; "
                "ask for less (nodes: offset/limit)",
            )
            data = encode(reply)
        await self.publish(reply_topic, data, qos=1)

    async def _reply_for(self, request_id: str, op: str, body: dict[str, Any]) -> Reply:
        try:
            result = await self.request(op, body)
        except FleetError as exc:
            error_body: dict[str, Any] = {"kind": self._kind(exc)}
            if isinstance(exc, Conflict):
                error_body["nodes"] = list(exc.nodes)
            return Reply(request=request_id, ok=False, error=exc.reason, body=error_body)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("request %s (%s) failed", request_id, op)
            return Reply(request=request_id, ok=False, error="internal error", body={"kind": "internal"})
        return Reply(request=request_id, ok=True, body=result)

    @staticmethod
    def _kind(exc: FleetError) -> str:
        for cls, kind in _ERROR_KINDS:
            if isinstance(exc, cls):
                return kind
        return "error"

    async def _refuse_malformed(self, payload: bytes, reason: str) -> None:
        """Reply ok:false to a bad request when it names a usable reply topic, else log."""
        try:
            fields = loads_object(payload)
        except InvalidInput:
            fields = {}
        reply_to = fields.get("reply_to")
        try:
            topic = self.topics.parse_reply_to(reply_to if isinstance(reply_to, str) else "")
        except InvalidInput:
            _LOGGER.warning("malformed request ignored (no usable reply_to): %s", reason)
            return
        request_id = fields.get("id")
        reply = Reply(
            request=request_id[:128] if isinstance(request_id, str) else "",
            ok=False,
            error=reason,
            body={"kind": "invalid_input"},
        )
        _LOGGER.info("bad request refused: %s", reason)
        await self.publish(topic, encode(reply), qos=1)

    def _spawn_request(self, payload: bytes) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded_answer(payload), name="hub-request")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    async def _guarded_answer(self, payload: bytes) -> None:
        try:
            await self._answer(payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("answering a request failed")
        finally:
            self._request_slots.release()

    # ------------------------------------------------------------------ messages

    async def _message_loop(self) -> None:
        assert self._client is not None  # noqa: S101 - set before the loop starts
        async for message in self._client.messages():
            try:
                await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                _LOGGER.exception("handling a message on %s failed", _shown(message.topic))

    async def _dispatch(self, message: Message) -> None:
        if message.topic == self.topics.hub_request:
            # Bounded concurrency: a flood of requests waits here, not in memory.
            await self._request_slots.acquire()
            self._spawn_request(message.payload)
            return
        parsed = self.topics.parse_node(message.topic)
        if parsed is None:
            _LOGGER.debug("ignoring message on %s", _shown(message.topic))
            return
        if not message.payload:
            return  # a retained message being cleared
        node, channel = parsed.node, parsed.channel
        try:
            if channel == "state":
                state = self._decoded(NodeState, message.payload, node)
                if state is not None:
                    before = self.registry.get(state.node)
                    transition = self.registry.on_state(state, self._now())
                    await self._presence(transition, state=state)
                    if (
                        transition is None
                        and state.state == "online"
                        and before is not None
                        and before.online
                        and before.session != state.session
                        and self.manager is not None
                    ):
                        # A node online all along reconnected: what the broker retained for
                        # it may be lost (a restart without persistence): its open command
                        # goes out again (DESIGN 3.6).
                        await self.manager.on_presence(state.node, True)
            elif channel == "heartbeat":
                beat = self._decoded(Heartbeat, message.payload, node)
                if beat is not None:
                    await self._presence(self.registry.on_heartbeat(beat, self._now()))
            elif channel in ("status", "job"):
                model = StepStatus if channel == "status" else JobSnapshot
                report = self._decoded(model, message.payload, node)
                if isinstance(report, StepStatus) and not report.rollout.startswith(PLAN_PREFIX):
                    self.metrics.observe_status(report)
                if report is not None and self.manager is not None:
                    await self.manager.on_node_message(node, channel, report)
        except InvalidInput as exc:
            self.malformed += 1
            _LOGGER.warning("malformed %s from %s ignored: %s", channel, node, exc.reason)

    def _decoded(self, model: type[Any], payload: bytes, node: str) -> Any:
        value = decode(model, payload)
        if value.node != node:
            raise InvalidInput(f"payload names node {value.node!r}, not the topic's")
        return value

    async def _presence(self, transition: Transition | None, state: NodeState | None = None) -> None:
        if state is not None and self.registry.get(state.node) is not None:
            # Births and wills are rare: keep the latest labels/inventory and session.
            self.store.put("nodes", state.node, self.registry.record(state.node))
        if transition is None:
            return
        if state is None:
            self.store.put("nodes", transition.node, self.registry.record(transition.node))
        word = "online" if transition.online else "offline"
        _LOGGER.info("node %s %s (%s)", transition.node, word, transition.reason)
        event = Event(
            ts=self._clock(),
            kind=f"node_{word}",
            message=f"{transition.node} {word} ({transition.reason})",
            node=transition.node,
        )
        await self.publish(self.topics.events, encode(event), qos=0)
        if self.manager is not None:
            await self.manager.on_presence(transition.node, transition.online)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._expire_interval_s)
            if not self.is_connected:
                continue  # the hub is blind, not the nodes silent
            for transition in self.registry.expire(self._now()):
                try:
                    await self._presence(transition)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _LOGGER.exception("handling %s going offline failed", transition.node)
