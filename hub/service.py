"""The hub process: one MQTT connection at a time, the fleet registry, the store and the rollout manager.

``HubService`` subscribes to every node's ``state``, ``heartbeat``, ``status``
and ``job`` topic, to ``hub/state``, the hubs' membership records and the
rollouts' retained records (DESIGN sections 1 and 3.9). Every payload is
parsed with ``bus.messages.decode``; a malformed one costs a log line and
nothing else. Presence goes through the pure ``Registry`` (a timer expires
silent nodes); step reports and job snapshots, and presence transitions, go to
the ``RolloutManager``. Requests are answered on the requester's reply topic
and nowhere else (``Topics.parse_reply_to``).

One active hub (DESIGN 3.9, ``hub.standby``): a standby hub reads with a
connection of its own id and keeps its view warm (registry, job snapshots,
rollout records); it acts only after taking the fleet's *active* connection
(one client id per fleet: the broker ends any older holder), with a term
stored durably first. Only that connection subscribes to ``hub/request`` and
publishes commands, so requests are answered by the active hub only. When it
drops, the hub stops acting at once and stands by again.

Start order: open the store and restore the registry, connect and subscribe,
read what the broker holds until the hub's own membership record comes back,
then take the active place if it is vacant (load the broker's rollout records
into the store, start the manager, which reloads and resumes its rollouts,
and feed it the job snapshots read meanwhile), else stand by. Stop order:
publish the hub's offline state, stop the manager, flush and close the store,
disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from bus.errors import BusError, ConfigError, Conflict, FleetError, InvalidInput
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
    RolloutSummary,
    StepStatus,
    decode,
    encode,
    loads_object,
    new_id,
)
from bus.mqtt import Message, MqttClient, Will
from bus.signing import load_private_key, sign_model
from bus.topics import NodeChannel, Topics
from hub.config import NO_SIGNING_KEY, HubConfig
from hub.core.engine import check_record
from hub.core.node_query import NodeQuery, summarise
from hub.core.registry import Registry, Transition
from hub.metrics import HubMetrics, MetricsSource
from hub.requests import RolloutRequest, rollout_request
from hub.retention import Archive, archive_path
from hub.rollouts import RolloutManager
from hub.standby import HUB_HEARTBEAT_S, ActiveView, TermFile, decode_record, lock_client_id, term_path
from hub.store import Store

__all__ = ["ActivePublisher", "HubService", "ManagerFactory", "RolloutManagerLike", "steady_wall_clock"]

_LOGGER = logging.getLogger(__name__)

_VERSION = "0.1.0"
_OPS: frozenset[str] = frozenset(get_args(RequestOp))
_MAX_CONCURRENT_REQUESTS = 32
#: How long a standby waits, at random, before it takes a vacant place (fewer contenders at once).
_TAKEOVER_JITTER_S = (0.2, 0.8)
#: How long a takeover may take to connect and read what the broker holds before it gives up.
_TAKEOVER_TIMEOUT_S = 5.0
#: How long the active connection may take to have every subscription granted.
_SUBSCRIBED_TIMEOUT_S = 30.0
#: Keepalive of the active connection: a half-open one ends (and its will fires) within 1.5 x this.
_ACTIVE_KEEPALIVE_S = 4
#: The agents' MQTT keepalive (DESIGN 3.7): part of the default offline grace.
AGENT_KEEPALIVE_S = 10.0


class RolloutManagerLike(Protocol):
    """What the hub needs of ``hub.rollouts.RolloutManager``."""

    async def start(self) -> None:
        """Reload rollouts from the store and resume them."""

    async def stop(self) -> None:
        """Stop timers; everything is in the store."""

    async def handle(self, request: RolloutRequest) -> Any:
        """Answer one rollout request, decoded at the edge (raises FleetError subclasses)."""

    def summaries(self) -> Sequence[RolloutSummary]:
        """Every rollout's summary (what feeds the metrics)."""

    def is_issued(self, node: str, rollout: str, command: str) -> bool:
        """Whether a node's report names a command this hub sent it."""

    async def on_report(self, node: str, report: StepStatus | JobSnapshot) -> None:
        """A node's decoded ``StepStatus`` or ``JobSnapshot``."""

    async def on_presence(self, node: str, online: bool) -> None:
        """A node went online or offline."""

    async def on_broker(self, connected: bool) -> None:
        """The hub's own broker connection went down or came back."""


#: Builds the manager: called with topics, publish, store, registry, signing_key, clock.
ManagerFactory = Callable[..., RolloutManagerLike]


class ActivePublisher:
    """Publishes through the active connection until the hub stands by (then BusError).

    What the rollout manager is given to publish with: it names the connection,
    not the hub that owns the manager; the hub closes it the moment it stops
    being active, so nothing a stopping manager flushes reaches the broker under
    a term that is no longer this hub's (DESIGN 3.9).
    """

    def __init__(self, client: MqttClient, hub_id: str) -> None:
        self._client: MqttClient | None = client
        self._hub_id = hub_id

    def close(self) -> None:
        """Refuse every publish from now on."""
        self._client = None

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, wait: bool = False
    ) -> None:
        """Publish on the active connection.

        Raises:
            BusError: the hub stands by (or the connection refuses it).
        """
        client = self._client
        if client is None:
            raise BusError(f"hub {self._hub_id} is standing by")
        await client.publish(topic, payload, qos=qos, retain=retain, wait=wait)


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
        #: This hub's id among the hubs of one fleet (DESIGN 3.9): its client id.
        self.hub_id = config.client_id
        #: "active" while this hub holds the active connection, else "standby".
        self.role = "standby"
        #: The term this hub acts in (0 until it first becomes active).
        self.term = 0
        #: What this hub knows of the active hub (hub/state, membership records).
        self.view = ActiveView(me=config.client_id)
        #: Takeovers: (monotonic time the place was found vacant, time this hub acted).
        self.takeovers: list[tuple[float, float]] = []
        self._terms = TermFile(term_path(config.db))
        self._key: Ed25519PrivateKey | None = None
        self._lock: MqttClient | None = None
        self._active: ActivePublisher | None = None  # publishes on self._lock while active
        self._lock_tasks: set[asyncio.Task[None]] = set()
        self._records: dict[str, bytes] = {}  # retained rollout records, by rollout (the warm view)
        self._record_parts: dict[str, dict[int, bytes]] = {}  # ... the parts of big ones (10,000 nodes)
        self._jobs: dict[str, JobSnapshot] = {}  # the latest job snapshot of every node
        self._view_ready = asyncio.Event()
        self._role_lock = asyncio.Lock()
        self._clock = clock
        self._now = steady_wall_clock() if clock is time.time else clock
        self._manager_factory: ManagerFactory = manager_factory or RolloutManager
        self._expire_interval_s = expire_interval_s
        self._session = new_id()
        self._started_at = clock()
        self._broker_up = False  # the connection state the manager was last told of
        self._was_connected = False
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
    def is_active(self) -> bool:
        """True while this hub is the active one (it holds the active connection)."""
        return self.role == "active"

    @property
    def missing_subscriptions(self) -> tuple[str, ...]:
        """Subscriptions the broker has not granted: the hub is degraded (deaf) while any is missing."""
        return () if self._client is None else self._client.missing_subscriptions

    @property
    def client(self) -> MqttClient | None:
        """The hub's MQTT client (for the HTTP bridge's health)."""
        return self._client

    async def start(self) -> None:
        """Open the store, connect and subscribe, read what the broker holds, then act or stand by.

        A hub that finds no other hub active takes the active place before this
        returns (DESIGN 3.9); one that finds another active stands by.

        Raises:
            ConfigError: the database or the signing key cannot be used.
            BusError: no broker connection within the client's connect timeout.
        """
        if self.config.signing_key is not None:
            # A bad key is a usage error: fail before touching the database or the broker.
            try:
                self._key = await asyncio.to_thread(load_private_key, self.config.signing_key)
            except ConfigError as exc:
                hint = NO_SIGNING_KEY.removeprefix("no signing key: ")
                raise ConfigError(f"{exc.reason} ({hint})") from exc
        await self.store.open()
        try:
            restored = self.registry.restore(self.store.all("nodes"), self._now())
            _LOGGER.info("hub database %s: %d nodes known", self.config.db, restored)
            self._client = await self._member_client()
            self._running = True
            await self._client.start()
            # Everything retained (births, job snapshots, hub state, rollout records) is read
            # before deciding: the own membership record comes back after it.
            await self._read_until_ready()
            self._spawn(self._message_loop(), "hub-messages")
            self._spawn(self._expire_loop(), "hub-expire")
            if self.view.vacant(time.monotonic()) is not None:
                await self._try_take_over("no hub is active")
            self._spawn(self._standby_loop(), "hub-standby")
            self._spawn(self._heartbeat_loop(), "hub-heartbeat")
        except BaseException:
            await self._teardown()
            raise
        _LOGGER.info(
            "hub %s connected to %s, prefix %s: %s",
            self.hub_id,
            self._client.url.redacted(),
            self.config.prefix,
            self.role,
        )

    async def _member_client(self) -> MqttClient:
        """The connection of a standby hub: its own client id, its membership record as will."""
        client = MqttClient(self.config.broker, client_id=self.config.client_id, will=self._will)
        client.on_connect(self._on_connected)
        await self._subscribe_all(client)
        return client

    async def _subscribe_all(self, client: MqttClient) -> None:
        """Every node channel, the hub state, membership and rollout records.

        No two of them overlap: the embedded broker ended a connection as lost when a
        message matched two of its subscriptions.
        """
        topics = self.topics
        wanted = [topics.node_filter(channel) for channel in ("state", "heartbeat", "status", "job")]
        records = (topics.rollout_record_filter, topics.rollout_record_part_filter)
        for topic in (*wanted, topics.hub_state, topics.hub_member_filter, *records):
            await client.subscribe(topic, qos=1)

    async def _read_until_ready(self) -> None:
        assert self._client is not None  # noqa: S101 - connected just before
        deadline = time.monotonic() + _TAKEOVER_TIMEOUT_S
        while not self._view_ready.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _LOGGER.warning("own membership record not seen back in time: deciding on what is known")
                return
            message = self._client.get_nowait()
            if message is None:
                await asyncio.sleep(0.01)
                continue
            await self._dispatch(message)

    async def stop(self) -> None:
        """Hand over (publish the offline state), stop the manager, flush the store, disconnect."""
        if not self._running:
            return
        self._running = False
        tasks = [*self._tasks, *self._lock_tasks]
        if self._lock is not None and self._client is self._lock:
            self._client = None  # the reading loop is stopped: the active connection is closed below
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        lock = self._lock
        if lock is not None and lock.is_connected:
            state = self._hub_state("offline", reason="shutdown")
            with contextlib.suppress(BusError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    lock.publish(self.topics.hub_state, encode(state), qos=1, retain=True, wait=True), 5
                )
        client = self._client or self._lock
        if client is not None and client.is_connected:
            member = self._hub_state("offline", reason="shutdown")
            with contextlib.suppress(BusError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.publish(
                        self.topics.hub_member(self.hub_id), encode(member), qos=1, retain=True, wait=True
                    ),
                    5,
                )
        await self._teardown()

    async def _teardown(self) -> None:
        self._running = False
        for task in (*self._tasks, *self._requests, *self._lock_tasks):
            task.cancel()
        for task in (*self._tasks, *self._requests, *self._lock_tasks):
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
        if self._lock is not None:
            await self._lock.close()
        if self._client is not None:
            await self._client.close()

    async def _start_manager(self, key: Ed25519PrivateKey | None) -> None:
        if key is None:
            self.manager_error = ConfigError(NO_SIGNING_KEY)
            _LOGGER.warning("%s; rollouts are refused", NO_SIGNING_KEY)
            return
        assert self._active is not None  # noqa: S101 - set by the takeover that calls this
        self.manager = self._manager_factory(
            topics=self.topics,
            publish=self._active.publish,
            store=self.store,
            registry=self.registry,
            signing_key=key,
            clock=self._clock,
            keep_rollouts=self.config.keep_rollouts,
            archive=Archive(archive_path(self.config.db)),
            # DESIGN 3.4/3.7: offline mid-job is "lost", not failed, for 3 heartbeats
            # plus the agents' keepalive.
            offline_grace_s=3 * self.config.heartbeat_s + AGENT_KEEPALIVE_S,
            term=self.term,
        )
        await self.manager.start()

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hub_state(self, state: Any, *, reason: Any = "birth", term: int | None = None) -> HubState:
        return HubState(
            state=state,
            session=self._session,
            reason=reason,
            version=_VERSION,
            started_at=self._started_at,
            ts=self._clock(),
            hub=self.hub_id,
            term=self.term if term is None else term,
        )

    def _signed(self, state: HubState) -> bytes:
        """An active state, signed when the hub has a key: agents take its term as their floor."""
        return encode(sign_model(state, self._key) if self._key is not None else state)

    def _will(self) -> Will:
        # A fresh session per connection; the birth of that connection reuses it. The main
        # connection's will is this hub's membership record (DESIGN 3.9).
        self._session = new_id()
        state = self._hub_state("offline", reason="lost")  # ts: the connection's start
        return Will(self.topics.hub_member(self.hub_id), encode(state), qos=1, retain=True)

    async def _on_connected(self) -> None:
        # The hub was blind while disconnected; the nodes were not silent.
        self.registry.refresh(self._now())
        if self._was_connected:
            # A reconnect: the connection dropped, however briefly (the retained wills
            # the broker now replays are a broker event, not failures).
            await self._broker_changed(False)
            await self._broker_changed(True)
        self._was_connected = True
        await self._publish_member()

    async def _publish_member(self) -> None:
        """This hub's retained membership record: active or standby, its term."""
        client = self._client
        if client is None:
            return
        state = self._hub_state("active" if self.is_active else "standby")
        with contextlib.suppress(BusError):
            await client.publish(self.topics.hub_member(self.hub_id), encode(state), qos=1, retain=True)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, wait: bool = False
    ) -> None:
        """Publish through the active connection (``ActivePublisher``).

        Raises:
            BusError: this hub is not the active one (a standby never acts).
        """
        active = self._active
        if not self.is_active or active is None:
            raise BusError(f"hub {self.hub_id} is standing by")
        await active.publish(topic, payload, qos=qos, retain=retain, wait=wait)

    # ------------------------------------------------------------------ one active hub (DESIGN 3.9)

    async def _standby_loop(self) -> None:
        """Take the active place when it is vacant (the active hub's will, or its silence)."""
        while True:
            await asyncio.sleep(0.1)
            if self.is_active or not self.is_connected:
                continue
            found = time.monotonic()
            why = self.view.vacant(found)
            if why is None:
                continue
            await asyncio.sleep(random.uniform(*_TAKEOVER_JITTER_S))  # noqa: S311 - spreading contenders
            if self.is_active or self.view.vacant(time.monotonic()) is None:
                continue
            await self._try_take_over(why, found)

    async def _heartbeat_loop(self) -> None:
        """The active hub's heartbeat: its membership record, again and again."""
        while True:
            await asyncio.sleep(HUB_HEARTBEAT_S)
            if self.is_active:
                await self._publish_member()

    async def _try_take_over(self, why: str, found: float | None = None) -> None:
        found = time.monotonic() if found is None else found
        async with self._role_lock:
            if self.is_active or not self._running:
                return
            try:
                await self._take_over(why)
            except BusError as exc:
                _LOGGER.warning("hub %s could not take the active place: %s", self.hub_id, exc.reason)
                return
            self.takeovers.append((found, time.monotonic()))

    async def _take_over(self, why: str) -> None:
        """Connect the active connection, fix the term durably, then act (DESIGN 3.9)."""
        stored = await asyncio.to_thread(self._terms.read)
        term = max(self.view.max_term, stored, self.term) + 1
        _LOGGER.info("hub %s taking the active place (term %d): %s", self.hub_id, term, why)

        def will() -> Will:
            return Will(
                self.topics.hub_state,
                encode(self._hub_state("offline", reason="lost", term=term)),
                qos=1,
                retain=True,
            )

        lock = MqttClient(
            self.config.broker,
            client_id=lock_client_id(self.config.prefix),
            will=will,
            keepalive=_ACTIVE_KEEPALIVE_S,
            connect_timeout=_SUBSCRIBED_TIMEOUT_S,
            reconnect=False,
        )
        own = self.topics.hub_member(self.hub_id)
        # Requests reach the active connection only (one answer per request, DESIGN 3.9).
        await lock.subscribe(self.topics.hub_request, qos=1)
        await self._subscribe_all(lock)  # (not connected yet: made at connect; covers its own record)
        # One connection at a time: where the broker names every connection of a user after
        # the user (mosquitto's use_username_as_clientid), two would end each other.
        member, self._client = self._client, None
        if member is not None:
            await member.close()
        try:
            # Every subscription granted before it goes on (a refused one is asked again: a
            # NATS failover refuses QoS 1 ones for a while, hence the longer wait).
            await lock.start()
            active = await self._claim(lock, own, term)
        except BaseException:
            await lock.close()
            if self._running:
                self._client = await self._member_client()
                await self._client.start(wait=False)
            raise
        self._lock = lock
        self._active = ActivePublisher(lock, self.hub_id)
        self.role = "active"
        self.view.on_state(active, time.monotonic())
        self._client = lock
        await self._publish_member()
        await self._activate()
        task: asyncio.Task[None] = asyncio.create_task(self._watch_lock(lock), name="hub-watch")
        self._lock_tasks.add(task)
        task.add_done_callback(self._lock_tasks.discard)
        _LOGGER.warning("hub %s is active, term %d", self.hub_id, term)

    async def _claim(self, lock: MqttClient, own: str, term: int) -> HubState:
        """With the active connection up: learn the latest term, store ours, say we are active."""
        # What the broker did before this connection (an older active hub's last state)
        # comes before the echo of this probe: then the latest term is known.
        probe = self._hub_state("standby", term=term)
        await lock.publish(own, encode(probe), qos=1, retain=True)
        try:
            await asyncio.wait_for(self._read_probe(lock, probe.session, probe.ts), _TAKEOVER_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            raise BusError("the broker did not echo the takeover probe in time") from exc
        if self.view.max_term >= term:
            raise BusError(f"another hub took term {self.view.max_term} meanwhile")
        if lock.lost.is_set():
            raise BusError("the active connection was taken over meanwhile")
        # Durable before acting: no restart of this hub ever reuses a term.
        await asyncio.to_thread(self._terms.write, term)
        self.term = term
        active = self._hub_state("active")
        await lock.publish(self.topics.hub_state, self._signed(active), qos=1, retain=True, wait=True)
        return active

    async def _read_probe(self, lock: MqttClient, session: str, ts: float) -> None:
        own = self.topics.hub_member(self.hub_id)
        async for message in lock.messages():
            if message.topic == own:
                with contextlib.suppress(InvalidInput):
                    state = decode(HubState, message.payload) if message.payload else None
                    if state is not None and state.session == session and state.ts == ts:
                        return
                continue
            if message.topic == self.topics.hub_request:
                continue  # not active yet: the requester asks again
            await self._dispatch(message)  # the view stays warm meanwhile
        raise BusError("the active connection closed")

    async def _activate(self) -> None:
        """Carry the rollouts on: the broker's records into the store, then the restart path."""
        loaded = 0
        for rollout, payload in list(self._records.items()):
            try:
                record, audit = decode_record(payload, self._record_parts.get(rollout))
            except InvalidInput as exc:
                _LOGGER.warning("retained record of %s unusable: %s", rollout, exc.reason)
                continue
            problem = check_record(record)
            if problem is not None or record.get("id") != rollout:
                _LOGGER.warning("retained record of %s unusable: %s", rollout, problem or "id differs")
                continue
            # The broker's record wins over this hub's own copy, even a newer one: what a hub
            # decided after it lost the active connection never reached the broker (a clear,
            # say), and the record is published before any command it names.
            self.store.put("rollouts", rollout, record)
            for key, doc in self.store.items("audit"):
                if doc.get("rollout") == rollout:
                    self.store.delete("audit", key)
            for entry in audit:
                self.store.append("audit", entry)
            loaded += 1
        _LOGGER.info("hub %s: %d rollout records taken from the broker", self.hub_id, loaded)
        await self._start_manager(self._key)
        if self.manager is None:
            return
        for node, snapshot in list(self._jobs.items()):
            await self.manager.on_report(node, snapshot)
        for node in self.registry.nodes():
            if not self.registry.is_online(node):
                await self.manager.on_presence(node, False)

    async def _watch_lock(self, lock: MqttClient) -> None:
        await lock.lost.wait()
        async with self._role_lock:
            if self._lock is lock:
                await self._stand_down("the active connection was lost or taken over")

    async def _stand_down(self, why: str) -> None:
        """Stop acting at once: no manager, no answers; keep the view warm."""
        if not self.is_active:
            return
        _LOGGER.warning("hub %s stands by (term %d): %s", self.hub_id, self.term, why)
        self.role = "standby"
        lock, self._lock = self._lock, None
        if self._active is not None:
            self._active.close()
            self._active = None
        manager, self.manager = self.manager, None
        for task in list(self._requests):
            task.cancel()
        if manager is not None:
            try:
                await manager.stop()
            except Exception:
                _LOGGER.exception("rollout manager failed to stop cleanly")
        if lock is not None:
            await lock.close()
        if self._client is lock:
            self._client = None
        if self._running:
            # Back to a connection of its own, standing by (no reconnect of the active one).
            self._client = await self._member_client()
            await self._client.start(wait=False)

    def _take_hub_state(self, payload: bytes) -> HubState | None:
        try:
            state = decode(HubState, payload) if payload else None
        except InvalidInput as exc:
            _LOGGER.warning("malformed hub state ignored: %s", exc.reason)
            return None
        self.view.on_state(state, time.monotonic())
        return state

    async def _on_hub_state(self, payload: bytes) -> None:
        state = self._take_hub_state(payload)
        if not self.is_active:
            return
        if state is not None and state.term > self.term:
            async with self._role_lock:
                await self._stand_down(f"hub {state.hub} holds a newer term ({state.term})")
            return
        if (
            state is not None
            and state.state == "active"
            and state.term == self.term
            and state.hub > self.hub_id
        ):
            # Two hubs took one term at once (a cluster orders their probes loosely): one of
            # them, by id, stands down; the broker ends the other's connection if it is not
            # the holder, and the next takeover takes a higher term.
            async with self._role_lock:
                await self._stand_down(f"hub {state.hub} took term {state.term} too")
            return
        if state is None or state.state != "active" or state.hub != self.hub_id:
            # A late will of an older hub overwrote the retained state: say who is active.
            active = self._signed(self._hub_state("active"))
            with contextlib.suppress(BusError):
                await self.publish(self.topics.hub_state, active, qos=1, retain=True)

    # ------------------------------------------------------------------ metrics

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of the hub's metrics (``GET /metrics``), built off the loop."""
        return await self.metrics.render_async()

    def _is_issued(self, report: StepStatus) -> bool:
        """True for a report of a command the hub issued: only those feed metrics (issue 16)."""
        if report.rollout.startswith(PLAN_PREFIX):
            return False
        manager = self.manager
        return manager is not None and manager.is_issued(report.node, report.rollout, report.command)

    def _node_counts(self) -> tuple[int, int]:
        online = len(self.registry.online())
        return online, len(self.registry.nodes()) - online

    def _rollout_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.manager is None:
            return counts
        try:
            for summary in self.manager.summaries():
                counts[summary.state] = counts.get(summary.state, 0) + 1
        except Exception:
            _LOGGER.exception("rollout summaries for metrics failed")
        return counts

    def _message_counts(self) -> tuple[int, int]:
        if self._client is None:
            return 0, 0
        return self._client.stats.received, self._client.stats.sent

    # ------------------------------------------------------------------ requests

    async def request(self, op: str, body: Mapping[str, Any] | None = None) -> Any:
        """Carry out one request in its wire form (the MQTT path; the bridge's other endpoints).

        A rollout op's body is decoded and validated here, once (``hub.requests``).

        Returns:
            The reply body, as plain JSON values.

        Raises:
            FleetError: the request is refused (InvalidInput, NotFound, Conflict...).
        """
        if op not in _OPS:
            raise InvalidInput(f"unknown op {_shown(op, 40)}; one of {', '.join(sorted(_OPS))}")
        self._check_active()
        if op == "nodes":
            return self._nodes_reply(body or {})
        manager = self._manager()  # a hub without a manager refuses before it reads the body
        return _jsonable(await manager.handle(rollout_request(op, dict(body or {}))))

    async def handle(self, request: RolloutRequest) -> Any:
        """Carry out one rollout request decoded at the edge (the HTTP bridge's create and plan).

        Returns:
            The reply body, as plain JSON values.

        Raises:
            FleetError: the request is refused (Conflict, NotFound, a hub standing by...).
        """
        return _jsonable(await self._manager().handle(request))

    def _check_active(self) -> None:
        """FleetError naming the active hub unless this one is."""
        if not self.is_active:
            active = self.view.active_hub()
            where = f"; hub {active} is active" if active else ""
            raise FleetError(f"hub {self.hub_id} is standing by{where}")

    def _manager(self) -> RolloutManagerLike:
        """The rollout manager of the active hub; FleetError saying why there is none."""
        self._check_active()
        if self.manager is None:
            raise self.manager_error or FleetError("rollouts not available")
        return self.manager

    def _nodes_reply(self, body: Mapping[str, Any]) -> Any:
        """The node table, optionally one page of it (``offset``, ``limit``) or some nodes.

        ``state``, ``labels``, ``node`` (a glob on the id) and ``versions`` filter
        (``hub.core.node_query``); with ``"summary": true`` the reply is the counts of the
        matching nodes by state and by version instead of their rows; with
        ``"total": true`` it is ``{"total": matching nodes, "nodes": [the page]}``.
        """
        offset, limit = body.get("offset", 0), body.get("limit")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InvalidInput("limit must be a positive integer")
        query = NodeQuery.parse(body)
        names = body.get("nodes")
        if names is None:
            selected = self.registry.nodes()
        elif isinstance(names, list) and all(isinstance(n, str) for n in names):
            selected = [n for n in names if self.registry.get(n) is not None]
        else:
            raise InvalidInput("nodes must be a list of node ids")
        if not query.empty:
            get = self.registry.get
            selected = [n for n in selected if query.matches(get(n))]
        if body.get("summary") is True:
            return summarise(self.registry.get(n) for n in selected)
        end = None if limit is None else offset + limit
        rows = [self.registry.to_api(name) for name in selected[offset:end]]
        if body.get("total") is True:
            return {"total": len(selected), "nodes": rows}
        return rows

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
            error_body: dict[str, Any] = {"kind": exc.status.kind}
            if isinstance(exc, Conflict):
                error_body["nodes"] = list(exc.nodes)
            return Reply(request=request_id, ok=False, error=exc.reason, body=error_body)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("request %s (%s) failed", request_id, op)
            return Reply(request=request_id, ok=False, error="internal error", body={"kind": "internal"})
        return Reply(request=request_id, ok=True, body=result)

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
            body={"kind": InvalidInput.status.kind},
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
        """Read the hub's connection; it changes when the hub takes over or stands down."""
        while True:
            client = self._client
            if client is None:
                await asyncio.sleep(0.02)
                continue
            async for message in client.messages():
                try:
                    await self._dispatch(message)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _LOGGER.exception("handling a message on %s failed", _shown(message.topic))
                if client is not self._client:
                    break  # replaced (the messages of the old one are old news)
            while client is self._client:  # noqa: ASYNC110 - closed, not replaced yet: rare and short
                await asyncio.sleep(0.02)

    async def _dispatch(self, message: Message) -> None:
        parsed = self.topics.parse_node(message.topic)  # the many: nodes' heartbeats and reports
        if parsed is not None:
            if message.payload:  # (empty: a retained message being cleared)
                await self._on_node_message(parsed.node, parsed.channel, message)
            return
        if message.topic == self.topics.hub_request:
            if self.is_active:  # only the active connection subscribes to requests
                # Bounded concurrency: a flood of requests waits here, not in memory.
                await self._request_slots.acquire()
                self._spawn_request(message.payload)
            return
        if message.topic == self.topics.hub_state:
            await self._on_hub_state(message.payload)
            return
        member = self.topics.parse_hub_member(message.topic)
        if member is not None:
            self._on_member(member, message.payload)
            return
        rollout = self.topics.parse_rollout_record(message.topic)
        if rollout is not None:
            # The warm view: what a standby carries the rollouts on from (DESIGN 3.9).
            if message.payload:
                self._records[rollout] = message.payload
            else:
                self._records.pop(rollout, None)
            return
        part = self.topics.parse_rollout_record_part(message.topic)
        if part is not None:
            parts = self._record_parts.setdefault(part[0], {})
            if message.payload:
                parts[part[1]] = message.payload
            else:
                parts.pop(part[1], None)
                if not parts:
                    del self._record_parts[part[0]]
            return
        _LOGGER.debug("ignoring message on %s", _shown(message.topic))

    async def _on_node_message(self, node: str, channel: NodeChannel, message: Message) -> None:
        try:
            if channel == "state":
                state = self._decoded(NodeState, message.payload, node)
                if state is not None:
                    before = self.registry.get(state.node)
                    transition = self.registry.on_state(state, self._now(), retained=message.retain)
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
                    transition = self.registry.on_heartbeat(beat, self._now())
                    if transition is not None:  # (the common case, 2,000 a second at 10,000 nodes, is None)
                        await self._presence(transition)
            elif channel in ("status", "job"):
                model = StepStatus if channel == "status" else JobSnapshot
                report: StepStatus | JobSnapshot = self._decoded(model, message.payload, node)
                if isinstance(report, JobSnapshot):
                    self._jobs[node] = report
                if isinstance(report, StepStatus) and self._is_issued(report):
                    self.metrics.observe_status(report)
                if self.manager is not None:
                    await self.manager.on_report(node, report)
        except InvalidInput as exc:
            self.malformed += 1
            _LOGGER.warning("malformed %s from %s ignored: %s", channel, node, exc.reason)

    def _on_member(self, hub: str, payload: bytes) -> None:
        try:
            state = decode(HubState, payload) if payload else None
        except InvalidInput as exc:
            _LOGGER.warning("malformed membership record of %s ignored: %s", hub, exc.reason)
            return
        if hub == self.hub_id:
            # This hub's own record coming back: everything retained before it has been read.
            if state is not None and state.session == self._session:
                self._view_ready.set()
            return
        self.view.on_member(hub, state, time.monotonic())

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
        if self.is_active:
            with contextlib.suppress(BusError):
                await self.publish(self.topics.events, encode(event), qos=0)
        if self.manager is not None:
            await self.manager.on_presence(transition.node, transition.online)

    async def _broker_changed(self, connected: bool) -> None:
        """Tell the manager once per change of the hub's own broker connection."""
        if connected == self._broker_up or self.manager is None:
            return
        self._broker_up = connected
        _LOGGER.warning("broker connection %s", "back" if connected else "lost")
        await self.manager.on_broker(connected)

    async def _expire_loop(self) -> None:
        self._broker_up = self.is_connected
        while True:
            await asyncio.sleep(self._expire_interval_s)
            await self._broker_changed(self.is_connected)
            if not self.is_connected:
                continue  # the hub is blind, not the nodes silent
            for transition in self.registry.expire(self._now()):
                try:
                    await self._presence(transition)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _LOGGER.exception("handling %s going offline failed", transition.node)
