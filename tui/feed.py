"""Bus -> app: parse MQTT messages into model updates and hand them to the app in batches.

A ``Feed`` is where the TUI's updates come from and where its hub requests go:
``MqttFeed`` is the real one (``bus.mqtt`` + ``bus.rpc.HubClient``, DESIGN
sections 1-2), ``ListFeed`` serves a fixed list for tests and demos. ``pump``
runs in the app's one feed worker: it starts the feed (retrying while the
broker is away) and posts one ``FeedBatch`` per short interval, so a burst of
a thousand heartbeats costs the app one message, not a thousand.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from textual.message import Message as TextualMessage

from bus.display import printable_payload
from bus.errors import BusError, FleetError, InvalidInput
from bus.messages import (
    Event,
    Heartbeat,
    HubState,
    JobSnapshot,
    LogLine,
    NodeState,
    Reply,
    Request,
    RequestOp,
    RolloutNodes,
    RolloutSummary,
    StepStatus,
    decode,
    new_id,
)
from bus.mqtt import MqttClient
from bus.rpc import HubClient
from bus.topics import NodeChannel, Topics
from tui.messages import FeedBatch, FeedStatus
from tui.model import BusUpdate, Cleared

__all__ = ["Feed", "ListFeed", "MqttFeed", "Responder", "parse_message", "pump"]

_LOGGER = logging.getLogger(__name__)

#: Updates queued beyond this many make the feed drop heartbeats and log lines.
QUEUE_LIMIT = 100_000

_NODE_MODELS: dict[str, type[NodeState | Heartbeat | StepStatus | JobSnapshot | LogLine]] = {
    "state": NodeState,
    "heartbeat": Heartbeat,
    "status": StepStatus,
    "job": JobSnapshot,
    "log": LogLine,
}


_NODE_QOS: tuple[tuple[NodeChannel, int], ...] = (
    ("state", 1),
    ("status", 1),
    ("job", 1),
    ("heartbeat", 0),
    ("log", 0),
)


def parse_message(topics: Topics, topic: str, payload: bytes) -> BusUpdate | None:
    """One received MQTT message as a model update, or None (not ours, or invalid).

    An empty retained payload on a node's ``state`` or a rollout topic clears it.
    A payload naming another node than its topic is dropped (DESIGN section 2).
    Control characters in its strings are made visible first (bus.display): bus
    text never reaches the terminal as escape sequences.
    """
    payload = printable_payload(payload)
    try:
        node_topic = topics.parse_node(topic)
        if node_topic is not None:
            model = _NODE_MODELS.get(node_topic.channel)
            if model is None:
                return None
            if not payload:
                return Cleared("node", node_topic.node) if node_topic.channel == "state" else None
            update = decode(model, payload)
            if update.node != node_topic.node:
                _LOGGER.debug("dropped %s: names node %s", topic, update.node)
                return None
            return update
        rollout = topics.parse_rollout_nodes(topic)
        if rollout is not None:
            changes = decode(RolloutNodes, payload)
            return changes if changes.rollout == rollout else None
        rollout = topics.parse_rollout(topic)
        if rollout is not None:
            if not payload:
                return Cleared("rollout", rollout)
            summary = decode(RolloutSummary, payload)
            return summary if summary.id == rollout else None
        if topic == topics.hub_state:
            return decode(HubState, payload) if payload else None
        if topic == topics.events:
            return decode(Event, payload)
    except InvalidInput as exc:
        _LOGGER.debug("dropped %s: %s", topic, exc.reason)
    return None


class Feed(abc.ABC):
    """Where the TUI's updates come from and its hub requests go."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[BusUpdate] = asyncio.Queue()
        self.dropped = 0

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool:
        """True while updates can flow."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and subscribe.

        Raises:
            BusError: the broker could not be reached.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect; the feed cannot be used afterwards."""

    @abc.abstractmethod
    async def call(self, op: RequestOp, body: dict[str, Any], timeout: float = 10.0) -> Reply:
        """Send one hub request and return its reply.

        Raises:
            BusError: no reply in time, or no connection.
        """

    def _put(self, update: BusUpdate) -> None:
        if self._queue.qsize() >= QUEUE_LIMIT and isinstance(update, Heartbeat | LogLine):
            self.dropped += 1
            return
        self._queue.put_nowait(update)

    async def next_batch(self, window: float = 0.1, limit: int = 5000) -> list[BusUpdate]:
        """Wait for an update, then gather what else arrives within ``window`` (at most ``limit``)."""
        batch = [await self._queue.get()]
        if window > 0:
            await asyncio.sleep(window)
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch


Responder = Callable[[Request], "Reply | Awaitable[Reply | None] | None"]


def _ok(request: Request) -> Reply:
    return Reply(request=request.id, ok=True, body={})


class ListFeed(Feed):
    """A feed that serves a list of updates and records the requests sent (tests, demos).

    Args:
        updates: served in order once the feed starts; ``push`` adds more later.
        responder: builds the reply to each request; returning None means the
            hub did not answer (``call`` raises BusError). By default every
            request succeeds with an empty body.
    """

    def __init__(self, updates: Iterable[BusUpdate] = (), responder: Responder | None = None) -> None:
        super().__init__()
        self._initial = list(updates)
        self._responder: Responder = responder or _ok
        self.requests: list[Request] = []
        self.started = False
        self.stopped = False

    @property
    def is_connected(self) -> bool:
        """True between start and stop."""
        return self.started and not self.stopped

    async def start(self) -> None:
        """Queue the initial updates."""
        self.started = True
        self.push(*self._initial)

    async def stop(self) -> None:
        """Mark the feed stopped."""
        self.stopped = True

    def push(self, *updates: BusUpdate) -> None:
        """Queue more updates, as if they had just arrived."""
        for update in updates:
            self._put(update)

    async def call(self, op: RequestOp, body: dict[str, Any], timeout: float = 10.0) -> Reply:
        """Record the request and answer it with the responder."""
        request = Request(id=new_id(), op=op, reply_to="fleet-tui", body=body)
        self.requests.append(request)
        reply = self._responder(request)
        if inspect.isawaitable(reply):
            reply = await asyncio.wait_for(reply, timeout)
        if reply is None:
            raise BusError(f"no reply from the hub within {timeout:g} s (is `fleet hub` running?)")
        return reply


class MqttFeed(Feed):
    """The real feed: one MQTT connection, every topic the TUI shows, hub requests.

    Args:
        url: broker URL (``mqtt://`` or ``mqtts://``).
        topics: the topic tree (its prefix).
        client_id: MQTT client id; replies come to ``hub/reply/{client_id}``.
        connect_timeout: how long ``start`` waits for the broker.
    """

    def __init__(
        self, url: str, topics: Topics, *, client_id: str | None = None, connect_timeout: float = 10.0
    ) -> None:
        super().__init__()
        self._url = url
        self._topics = topics
        self._client_id = client_id or f"fleet-tui-{new_id()[:8]}"
        self._connect_timeout = connect_timeout
        self._client: MqttClient | None = None
        self._hub: HubClient | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        """True while the broker connection is up."""
        return self._client is not None and self._client.is_connected

    async def start(self) -> None:
        """Connect, subscribe to the fleet's topics, start reading."""
        client = MqttClient(
            self._url, client_id=self._client_id, keepalive=30, connect_timeout=self._connect_timeout
        )
        topics = self._topics
        hub = HubClient(client, topics)
        # Subscriptions made before connecting are sent with the CONNECT, and renewed
        # after every reconnect. Heartbeats, logs and events are QoS 0 on the wire.
        await hub.subscribe()
        for channel, qos in _NODE_QOS:
            await client.subscribe(topics.node_filter(channel), qos=qos)
        await client.subscribe(topics.rollout_filter, qos=1)
        await client.subscribe(topics.rollout_nodes_filter, qos=1)
        await client.subscribe(topics.hub_state, qos=1)
        await client.subscribe(topics.events, qos=0)
        try:
            await client.start()  # raises BusError (and closes itself) after connect_timeout
        except asyncio.CancelledError:
            await client.close()  # the app quit while we were still connecting
            raise
        self._client, self._hub = client, hub
        self._reader = asyncio.create_task(self._read(client, hub), name="fleet-tui-feed")

    async def _read(self, client: MqttClient, hub: HubClient) -> None:
        async for message in client.messages():
            if hub.feed(message.topic, printable_payload(message.payload)):  # replies are shown too
                continue
            update = parse_message(self._topics, message.topic, message.payload)
            if update is not None:
                self._put(update)

    async def stop(self) -> None:
        """Stop reading and disconnect."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._client is not None:
            await self._client.close()

    async def call(self, op: RequestOp, body: dict[str, Any], timeout: float = 10.0) -> Reply:
        """Send one request through ``hub/request`` and await the reply."""
        if self._hub is None or self._client is None:
            raise BusError("not connected to the broker")
        return await self._hub.call(op, body, timeout=timeout)


async def pump(
    feed: Feed,
    post: Callable[[TextualMessage], bool],
    *,
    window: float = 0.1,
    limit: int = 5000,
    retry: tuple[float, float] = (1.0, 30.0),
) -> None:
    """Start ``feed`` (retrying with backoff), then post a ``FeedBatch`` per batch until cancelled.

    Connection failures are posted as ``FeedStatus`` messages, never raised.
    """
    delay = retry[0]
    while True:
        try:
            await feed.start()
        except FleetError as exc:
            post(FeedStatus(connected=False, reason=exc.reason))
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry[1])
            continue
        break
    post(FeedStatus(connected=True, reason=""))
    while True:
        batch = await feed.next_batch(window, limit)
        post(FeedBatch(batch))
