"""The hub's MQTT reader (``bus.mqtt._Paho``): whole packets taken from the buffer without paho's
reader, anything else left to paho, over a real socket pair, bytes cut at every boundary."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bus.mqtt import _Paho


def remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int = 0, mid: int = 0, retain: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | qos << 1 | retain]) + remaining(len(body)) + body


def puback(mid: int) -> bytes:
    return b"\x40\x02" + mid.to_bytes(2, "big")


class Reader:
    """A 3.1.1 ``_Paho`` reading one end of a socket pair, as ``MqttClient._read`` drives it."""

    def __init__(self) -> None:
        self.peer, ours = socket.socketpair()
        ours.setblocking(False)
        self.client = _Paho(CallbackAPIVersion.VERSION2, client_id="reader", protocol=paho.MQTTv311)
        self.ours = ours
        self.client._sock = ours
        self.got: list[tuple[str, bytes, int, bool]] = []
        self.client.deliver = lambda *message: self.got.append(message)
        self.paho_read = 0
        original = self.client._packet_read

        def counted() -> Any:
            self.paho_read += 1
            return original()

        self.client._packet_read = counted  # type: ignore[method-assign]

    def read(self) -> None:
        """One wake-up of the reader: paho's loop_read, then what is buffered."""
        while True:
            self.client.loop_read()
            self.client.take_buffered(1000)
            if not self.client.buffered():
                return

    def acks(self) -> list[int]:
        """The packet ids of the PUBACKs the client sent back (paho writes them at once)."""
        self.client.loop_write()
        self.peer.setblocking(False)
        sent = b""
        try:
            while chunk := self.peer.recv(65536):
                sent += chunk
        except BlockingIOError:
            pass
        assert len(sent) % 4 == 0
        assert all(sent[i : i + 2] == b"\x40\x02" for i in range(0, len(sent), 4))
        return [int.from_bytes(sent[i + 2 : i + 4], "big") for i in range(0, len(sent), 4)]

    def close(self) -> None:
        self.peer.close()
        self.ours.close()


@pytest.fixture
def reader() -> Iterator[Reader]:
    made = Reader()
    yield made
    made.close()


STREAM = [
    (publish(b"fleet/v1/node/n1/heartbeat", b"{}"), ("fleet/v1/node/n1/heartbeat", b"{}", 0, False)),
    (
        publish(b"fleet/v1/node/n2/status", b"x" * 300, qos=1, mid=7),
        ("fleet/v1/node/n2/status", b"x" * 300, 1, False),
    ),
    (publish(b"t/empty", b"", qos=1, mid=8, retain=True), ("t/empty", b"", 1, True)),
    (publish("t/é".encode(), b"\x00\xff" * 20_000, qos=1, mid=9), ("t/é", b"\x00\xff" * 20_000, 1, False)),
    (puback(1), None),
    (publish(b"t/last", b"end"), ("t/last", b"end", 0, False)),
]


def test_a_stream_of_publishes_and_acks_is_taken_whole_mostly_without_paho(reader: Reader) -> None:
    wire = b"".join(packet for packet, _ in STREAM)
    reader.peer.sendall(wire)
    reader.read()
    assert reader.got == [seen for _, seen in STREAM if seen is not None]
    assert reader.acks() == [7, 8, 9]
    assert reader.paho_read == 1  # the first packet of the wake-up (it reads the socket); the rest here


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 29, 31, 60, 300, 340, 40_000])
def test_packets_cut_anywhere_come_out_whole_and_in_order(reader: Reader, cut: int) -> None:
    wire = b"".join(packet for packet, _ in STREAM)
    for start in range(0, len(wire), cut):
        reader.peer.sendall(wire[start : start + cut])
        reader.read()
    assert reader.got == [seen for _, seen in STREAM if seen is not None]
    assert reader.acks() == [7, 8, 9]


def test_anything_else_is_left_to_paho_and_reading_goes_on(reader: Reader) -> None:
    """A topic that is not UTF-8 and a QoS 2 publish are paho's; a PINGRESP too."""
    bad_topic = publish(b"t/\xff", b"no", qos=1, mid=3)
    qos2 = publish(b"t/two", b"2", qos=2, mid=4)
    pingresp = b"\xd0\x00"
    after = publish(b"t/after", b"ok")
    reader.peer.sendall(publish(b"t/first", b"1") + bad_topic + qos2 + pingresp + after)
    reader.read()
    topics = [topic for topic, *_ in reader.got]
    assert topics[0] == "t/first"
    assert topics[-1] == "t/after"
    assert "t/two" not in topics  # (paho's own path: on_message, not the light one)
    assert reader.paho_read >= 4  # each odd packet went through paho
