"""Queued MQTT packets are joined for one send() without changing what paho must do per packet."""

from __future__ import annotations

import collections
from typing import Any

from bus.mqtt import _coalesce

PUBLISH, PUBACK, DISCONNECT = 0x30, 0x40, 0xE0


def packet(command: int, data: bytes, qos: int = 1, pos: int = 0, info: Any = None) -> dict[str, Any]:
    return {
        "command": command,
        "mid": 7,
        "qos": qos,
        "pos": pos,
        "to_process": len(data) - pos,
        "packet": data,
        "info": info,
    }


def wire(queue: collections.deque[Any]) -> bytes:
    return b"".join(bytes(p["packet"][p["pos"] :]) for p in queue)


def test_plain_packets_become_one_and_keep_their_order() -> None:
    queue: collections.deque[Any] = collections.deque(
        [packet(PUBACK, b"A1"), packet(PUBLISH | 2, b"P1", qos=1), packet(PUBACK, b"A2")]
    )
    before = wire(queue)
    _coalesce(queue)
    assert len(queue) == 1
    assert wire(queue) == before
    (joined,) = queue
    assert joined["to_process"] == len(before)
    # Nothing for paho to do once written.
    assert joined["info"] is None
    assert joined["qos"] == 1


def test_qos0_publishes_and_disconnect_stay_alone_with_their_info() -> None:
    info = object()
    queue: collections.deque[Any] = collections.deque(
        [
            packet(PUBACK, b"A1"),
            packet(PUBACK, b"A2"),
            packet(PUBLISH, b"H", qos=0, info=info),  # a heartbeat: on_publish once written
            packet(PUBACK, b"A3"),
            packet(DISCONNECT, b"D"),
        ]
    )
    before = wire(queue)
    _coalesce(queue)
    assert [p["packet"] for p in queue] == [b"A1A2", b"H", b"A3", b"D"]
    assert queue[1]["info"] is info
    assert wire(queue) == before


def test_a_partly_sent_head_continues_where_it_stopped() -> None:
    queue: collections.deque[Any] = collections.deque(
        [packet(PUBLISH | 2, b"xxHEAD", pos=2), packet(PUBACK, b"A")]
    )
    _coalesce(queue)
    assert wire(queue) == b"HEADA"
    assert queue[0]["pos"] == 0


def test_runs_are_capped_in_size() -> None:
    queue: collections.deque[Any] = collections.deque(packet(PUBACK, b"x" * 1000) for _ in range(200))
    _coalesce(queue)
    assert 2 <= len(queue) <= 4
    assert all(p["to_process"] <= 64 * 1024 for p in queue)
    assert wire(queue) == b"x" * 200_000
