"""The embedded broker's guards against amqtt 0.12.1's defects (FINDINGS.md), on real brokers.

Each guard has a test that it works, and the defect itself has a test on amqtt's
plain ``Broker`` that fails the day upstream fixes it (then drop the guard).
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from amqtt.broker import Broker

from bus.broker import KEEPALIVE_GRACE, BrokerThread, FleetBroker, load_config
from bus.messages import MAX_PACKET_BYTES, MAX_PAYLOAD_BYTES
from bus.mqtt import Message, MqttClient, Will
from bus.topics import Topics
from tests.conftest import RunningBroker, free_port

pytestmark = pytest.mark.broker

RETAINED_COMMANDS = 1000
CONCURRENT_CLIENTS = 300


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def plain_amqtt() -> Iterator[RunningBroker]:
    """amqtt's own Broker, unguarded, with the same config as the embedded one."""
    port = free_port()
    thread = BrokerThread(load_config(None, "127.0.0.1", port), broker_class=Broker)
    thread.start()
    yield RunningBroker("plain-amqtt", port)
    thread.stop()


@pytest.fixture
def fleet_amqtt() -> Iterator[RunningBroker]:
    """A FleetBroker of this test's own (retained messages of other tests cannot interfere)."""
    port = free_port()
    thread = BrokerThread(load_config(None, "127.0.0.1", port))
    thread.start()
    assert isinstance(thread.broker, FleetBroker)
    yield RunningBroker("amqtt", port)
    thread.stop()


async def received_before_marker(client: MqttClient, publisher: MqttClient, topics: Topics) -> list[Message]:
    """Everything ``client`` received before a fresh marker message on a topic of its own.

    TCP keeps order and the broker handles one session's packets in order, so a
    message the broker sent this client before the marker is in the list: no
    sleeping and hoping that nothing else arrives.
    """
    marker_topic = f"{topics.prefix}/marker/{client.client_id}"
    token = uuid.uuid4().hex.encode()
    await client.subscribe(marker_topic, qos=1)
    await publisher.publish(marker_topic, token, qos=1, wait=True)
    seen: list[Message] = []

    async def until_marker() -> None:
        async for message in client.messages():
            if message.topic == marker_topic and message.payload == token:
                return
            seen.append(message)

    await asyncio.wait_for(until_marker(), 30)
    return seen


async def publish_retained_commands(url: str, topics: Topics, count: int) -> None:
    async with MqttClient(url, max_inflight=200) as hub:
        for i in range(count):
            await hub.publish(topics.node(f"n{i}", "cmd"), f'{{"n": {i}}}'.encode(), qos=1, retain=True)
        await hub.publish(topics.hub_state, b"{}", qos=1, retain=True, wait=True)


async def leaked_to_fresh_clients(url: str, topics: Topics) -> tuple[list[Message], list[Message]]:
    """(what a client with no subscriptions got, what node n7 subscribed to its cmd got)."""
    async with MqttClient(url) as monitor:
        # Someone in the fleet (a TUI, the hub) holds a wide subscription: the
        # broker replays retained messages of *every* filter it knows on CONNECT.
        await monitor.subscribe(topics.node_filter("#"))
        await publish_retained_commands(url, topics, RETAINED_COMMANDS)
        async with MqttClient(url) as publisher, MqttClient(url, client_id="bystander") as bystander:
            nothing = await received_before_marker(bystander, publisher, topics)
        async with MqttClient(url) as publisher, MqttClient(url, client_id="node-n7") as node:
            await node.subscribe(topics.node("n7", "cmd"), qos=1)
            own = await received_before_marker(node, publisher, topics)
    return nothing, own


# ------------------------------------------------------------------- defect 1: leak


async def test_retained_commands_reach_only_their_subscribers(
    fleet_amqtt: RunningBroker, topics: Topics
) -> None:
    nothing, own = await leaked_to_fresh_clients(fleet_amqtt.url, topics)

    assert nothing == [], f"a client with no subscriptions got {len(nothing)} retained messages"
    assert [(m.topic, m.payload, m.retain) for m in own] == [(topics.node("n7", "cmd"), b'{"n": 7}', True)]


async def test_plain_amqtt_still_leaks_retained_messages(plain_amqtt: RunningBroker, topics: Topics) -> None:
    """Proves the guard matters; fails once amqtt stops leaking (then drop the guard in bus/broker.py)."""
    nothing, _ = await leaked_to_fresh_clients(plain_amqtt.url, topics)

    leaked = {m.topic for m in nothing}
    assert len(leaked) == RETAINED_COMMANDS, (
        f"plain amqtt leaked {len(leaked)} of {RETAINED_COMMANDS} retained commands: "
        "if it no longer leaks, the upstream fix landed and FleetBroker's guard can go"
    )


# ---------------------------------------------------------- defect 2: connect race


async def test_clients_connecting_at_once_are_all_served(broker: RunningBroker, topics: Topics) -> None:
    # Retained messages under the filters make the broker's per-CONNECT loop over
    # the subscription table await, which is where amqtt's race bites.
    await publish_retained_commands(broker.url, topics, 50)
    clients = [
        MqttClient(broker.url, client_id=f"storm-{i}", connect_timeout=60, backoff=(0.05, 1.0))
        for i in range(CONCURRENT_CLIENTS)
    ]

    async def connect_and_subscribe(i: int) -> None:
        await clients[i].start()
        await clients[i].subscribe(topics.node(f"storm{i}", "cmd"), qos=1)

    async def first_message(client: MqttClient) -> Message:
        async for message in client.messages():
            if not message.retain:
                return message
        raise AssertionError("client closed")

    try:
        await asyncio.wait_for(
            asyncio.gather(*(connect_and_subscribe(i) for i in range(CONCURRENT_CLIENTS))), 90
        )
        async with MqttClient(broker.url, max_inflight=100) as hub:
            for i in range(CONCURRENT_CLIENTS):
                await hub.publish(topics.node(f"storm{i}", "cmd"), str(i).encode(), qos=1)
            got = await asyncio.wait_for(asyncio.gather(*(first_message(c) for c in clients)), 60)
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    assert [m.payload for m in got] == [str(i).encode() for i in range(CONCURRENT_CLIENTS)]
    assert [m.topic for m in got] == [topics.node(f"storm{i}", "cmd") for i in range(CONCURRENT_CLIENTS)]


# ------------------------------------------------------------- defect 3: keepalive


def connect_packet(client_id: str, keepalive: int, will_topic: str, will_payload: bytes) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, retained QoS 1 will."""

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x02 | 0x04 | (1 << 3) | 0x20  # clean session, will, will QoS 1, will retain
    body = (
        field(b"MQTT")
        + bytes([4, flags])
        + struct.pack("!H", keepalive)
        + field(client_id.encode())
        + field(will_topic.encode())
        + field(will_payload)
    )
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


class SilentClient:
    """A client that connects and then says nothing, with its socket open (a frozen host)."""

    def __init__(self, port: int, keepalive: int, will_topic: str, will_payload: bytes) -> None:
        self.port = port
        self.keepalive = keepalive
        self.will_topic = will_topic
        self.will_payload = will_payload
        self.connected_at = 0.0
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> SilentClient:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(
            connect_packet(
                f"silent-{uuid.uuid4().hex[:8]}", self.keepalive, self.will_topic, self.will_payload
            )
        )
        await self._writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        assert connack == b"\x20\x02\x00\x00", connack
        self.connected_at = time.monotonic()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.close()
        await self._writer.wait_closed()


@pytest.fixture
async def will_watcher(broker: RunningBroker, topics: Topics) -> AsyncIterator[MqttClient]:
    async with MqttClient(broker.url) as watcher:
        await watcher.subscribe(f"{topics.prefix}/node/+/state", qos=1)
        yield watcher


async def test_silent_client_yields_its_will_after_keepalive(
    broker: RunningBroker,
    topics: Topics,
    will_watcher: MqttClient,
    record_property: Callable[[str, object], None],
) -> None:
    keepalive = 2
    will_topic = topics.node("frozen", "state")
    async with SilentClient(broker.port, keepalive, will_topic, b'{"state": "offline"}') as silent:
        message = await asyncio.wait_for(will_watcher.messages().__anext__(), 10 * keepalive)
        latency = time.monotonic() - silent.connected_at

    assert (message.topic, message.payload) == (will_topic, b'{"state": "offline"}')
    # Not a connection that merely closed: the broker waited for the keepalive to run out.
    assert latency >= keepalive
    record_property(f"will_latency_s_{broker.kind}", round(latency, 3))


async def test_live_client_with_short_keepalive_stays_connected(
    broker: RunningBroker, topics: Topics, will_watcher: MqttClient
) -> None:
    """Pings go out in time: the keepalive guard does not drop idle but live clients."""
    keepalive = 1
    will_topic = topics.node("idle", "state")
    client = MqttClient(
        broker.url, keepalive=keepalive, will=lambda: Will(will_topic, b"lost", qos=1, retain=False)
    )
    async with client:
        deadline = time.monotonic() + (KEEPALIVE_GRACE + 3) * keepalive
        while time.monotonic() < deadline:
            assert client.is_connected
            await asyncio.sleep(0.1)
        assert client.stats.reconnects == 0
        assert client.get_nowait() is None
    assert will_watcher.get_nowait() is None


async def test_plain_amqtt_never_drops_a_silent_client(plain_amqtt: RunningBroker, topics: Topics) -> None:
    """Proves the keepalive guard matters; fails once amqtt enforces keepalive upstream."""
    keepalive = 1
    will_topic = topics.node("frozen", "state")
    async with MqttClient(plain_amqtt.url) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        async with SilentClient(plain_amqtt.port, keepalive, will_topic, b"offline"):
            with pytest.raises(asyncio.TimeoutError):
                # mosquitto and FleetBroker publish the will after 1.5 s
                await asyncio.wait_for(watcher.messages().__anext__(), 4 * keepalive)


# --------------------------------------------------------------- defect 4: QoS 0


async def test_amqtt_delivers_qos0_at_the_subscription_qos(
    fleet_amqtt: RunningBroker, topics: Topics
) -> None:
    """Known and unguarded (nothing in fleetbus relies on it); fails once amqtt follows the spec."""
    topic = f"{topics.prefix}/events"
    async with MqttClient(fleet_amqtt.url) as subscriber, MqttClient(fleet_amqtt.url) as publisher:
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(topic, b"e", qos=0)
        message = await asyncio.wait_for(subscriber.messages().__anext__(), 10)
    assert message.payload == b"e"
    assert message.qos == 1, "amqtt now delivers QoS 0 at QoS 0: update FINDINGS.md defect 4"


# --------------------------------------------------------------------------- defect 6: packet size


def remaining_length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_a_packet_over_the_limit_ends_the_connection_unread(
    fleet_amqtt: RunningBroker, topics: Topics
) -> None:
    """A client announcing a 100 MB publish is disconnected before the body is buffered;
    its will is published and the broker serves everyone else as before."""
    will_topic = topics.node("big", "state")
    async with MqttClient(fleet_amqtt.url) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        reader, writer = await asyncio.open_connection("127.0.0.1", fleet_amqtt.port)
        writer.write(connect_packet(f"big-{uuid.uuid4().hex[:8]}", 30, will_topic, b"big-lost"))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
        topic = f"{topics.prefix}/node/big/log".encode()
        size = 100 * 1024 * 1024
        writer.write(bytes([0x30]) + remaining_length(size) + struct.pack("!H", len(topic)) + topic)
        writer.write(b"x" * 65536)  # the start of the body; the rest never comes
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b"", "the broker kept the connection"
        writer.close()
        messages = watcher.messages()
        first = await asyncio.wait_for(anext(messages), 10)
        assert (first.topic, first.payload) == (will_topic, b"big-lost")
    # Just under the limit still passes (the hub's largest messages are far below it).
    async with MqttClient(fleet_amqtt.url) as client:
        await client.subscribe(f"{topics.prefix}/ok", qos=1)
        payload = b"y" * (MAX_PAYLOAD_BYTES)
        await client.publish(f"{topics.prefix}/ok", payload, qos=1)
        got = await asyncio.wait_for(anext(client.messages()), 10)
        assert len(got.payload) == MAX_PAYLOAD_BYTES
    assert MAX_PACKET_BYTES > MAX_PAYLOAD_BYTES + 4096


async def test_plain_amqtt_waits_for_any_packet_size(plain_amqtt: RunningBroker, topics: Topics) -> None:
    """The defect: amqtt keeps a connection that announced a 100 MB packet, reading on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_amqtt.port)
    try:
        writer.write(connect_packet(f"big-{uuid.uuid4().hex[:8]}", 30, topics.node("big", "state"), b"x"))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
        topic = f"{topics.prefix}/big".encode()
        header = bytes([0x30]) + remaining_length(100 * 1024 * 1024)
        writer.write(header + struct.pack("!H", len(topic)) + topic)
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()
