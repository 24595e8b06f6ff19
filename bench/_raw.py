"""The raw MQTT limit: a bare paho fan-out/fan-in, no fleetbus code on the message path.

One retained QoS 1 message to each of N clients, one QoS 1 reply from each,
timed from the first publish to the last reply. The N responders run in a
child process (``python bench/_raw.py URL N PREFIX``), all on one epoll
selector through paho's external-loop API, like the simulated fleet; the
publisher runs in the caller's process, like the hub. Every socket gets
TCP_NODELAY, as fleetbus's clients do.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["SelectorLoop", "raw_fanout"]


class SelectorLoop:
    """Many paho clients served by one epoll selector (paho's external-loop API)."""

    def __init__(self) -> None:
        self.selector = selectors.EpollSelector()
        self.clients: list[paho.Client] = []

    def add(self, client: paho.Client) -> None:
        def opened(c: paho.Client, _u: Any, sock: Any) -> None:
            self.selector.register(sock, selectors.EVENT_READ, c)

        def closed(_c: paho.Client, _u: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)

        def want_write(c: paho.Client, _u: Any, sock: Any) -> None:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

        def wrote(c: paho.Client, _u: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.modify(sock, selectors.EVENT_READ, c)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = wrote
        self.clients.append(client)

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        next_misc = time.monotonic() + 1.0
        while not done():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("raw fan-out did not finish in time")
            for key, mask in self.selector.select(0.05):
                if not isinstance(key.data, paho.Client):
                    key.data()  # another file of the caller's (a pipe)
                    continue
                client: paho.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read(100)
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            if now > next_misc:
                next_misc = now + 1.0
                for client in self.clients:
                    client.loop_misc()

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_write()
        self.selector.close()


def _client(client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(65000)
    return client


def _more_than(items: set[int], count: int) -> bool:
    return len(items) > count


def _nodelay(client: paho.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect(loop: SelectorLoop, clients: list[paho.Client], host: str, port: int, timeout: float) -> None:
    connected: set[int] = set()

    def on_connect(c: paho.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        connected.add(id(c))
        _nodelay(c)

    for index, client in enumerate(clients):
        client.on_connect = on_connect
        loop.add(client)
        client.connect(host, port, keepalive=60)
        if index % 50 == 49:  # a gentle ramp: amqtt drops sessions in connect storms (FINDINGS.md)
            loop.run_until(functools.partial(_more_than, connected, index - 25), timeout)
    loop.run_until(lambda: len(connected) == len(clients), timeout)


def responders(url: str, count: int, prefix: str) -> None:
    """Child process: ``count`` clients, each answering the message on its own topic."""
    parts = urlsplit(url)
    loop = SelectorLoop()
    clients = [_client(f"raw-r-{prefix.rsplit('/', 1)[-1]}-{i}") for i in range(count)]
    _connect(loop, clients, parts.hostname or "127.0.0.1", parts.port or 1883, 120)
    acked: set[int] = set()
    for index, client in enumerate(clients):

        def answer(c: paho.Client, _u: Any, msg: paho.MQTTMessage, i: int = index) -> None:
            if msg.payload:
                c.publish(f"{prefix}/{i}/reply", msg.payload, qos=1)

        client.on_message = answer
        client.on_subscribe = lambda _c, _u, _m, _r, _p, i=index: acked.add(i)
        client.subscribe(f"{prefix}/{index}/cmd", qos=_sub_qos(url))
    loop.run_until(lambda: len(acked) == count, 120)
    print("ready", flush=True)
    # Serve until the parent closes our stdin.
    stdin_gone = [False]

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            stdin_gone[0] = True
            loop.selector.unregister(sys.stdin.fileno())

    loop.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, on_stdin)
    loop.run_until(lambda: stdin_gone[0], 3600)
    loop.close()


def _sub_qos(url: str) -> int:
    """QoS 0 subscriptions at a NATS server (``?kind=nats``), as fleetbus's clients there; else 1."""
    return 0 if "kind=nats" in urlsplit(url).query else 1


def raw_fanout(url: str, count: int, repeats: int = 3, timeout: float = 120.0) -> list[float]:
    """Seconds of each of ``repeats`` fan-out/fan-in rounds over ``count`` responders."""
    parts = urlsplit(url)
    prefix = f"raw-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), url, str(count), prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    loop = SelectorLoop()
    try:
        line = child.stdout.readline() if child.stdout is not None else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"raw responders did not start: {line!r}")
        publisher = _client(f"raw-p-{prefix}")
        _connect(loop, [publisher], parts.hostname or "127.0.0.1", parts.port or 1883, timeout)
        replies: set[str] = set()
        publisher.on_message = lambda _c, _u, msg: replies.add(msg.topic)
        subscribed = [False]
        publisher.on_subscribe = lambda *_a: subscribed.__setitem__(0, True)
        publisher.subscribe(f"{prefix}/+/reply", qos=_sub_qos(url))
        loop.run_until(lambda: subscribed[0], timeout)
        rounds = []
        for round_no in range(repeats):
            replies.clear()
            payload = f"round {round_no} " + "x" * 600  # about the size of a signed command
            started = time.perf_counter()
            for index in range(count):
                publisher.publish(f"{prefix}/{index}/cmd", payload, qos=1, retain=True)
            loop.run_until(lambda: len(replies) == count, timeout)
            rounds.append(time.perf_counter() - started)
        for index in range(count):  # leave no retained message behind
            publisher.publish(f"{prefix}/{index}/cmd", b"", qos=1, retain=True)
        loop.run_until(lambda: not publisher.want_write(), timeout)
        return rounds
    finally:
        loop.close()
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


if __name__ == "__main__":
    responders(sys.argv[1], int(sys.argv[2]), sys.argv[3])
