"""Loopback ports for the processes the demo, the benchmarks and the tests start."""

from __future__ import annotations

import random
import socket
import time

__all__ = ["free_port", "service_port", "wait_port"]

#: Ports a long-lived service may own: below Linux's ephemeral range (32768-60999), so
#: an outgoing connection never takes a service's port while the service restarts.
_SERVICE_PORTS = range(20000, 32000)


def free_port(preferred: int = 0) -> int:
    """A TCP port free on 127.0.0.1 right now: ``preferred`` if it is, else any."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_port() -> int:
    """A free port for a service that stops and starts again (outside the ephemeral range)."""
    first = random.randrange(len(_SERVICE_PORTS))  # noqa: S311 - spreading, not secrecy
    for offset in range(len(_SERVICE_PORTS)):
        port = _SERVICE_PORTS[(first + offset) % len(_SERVICE_PORTS)]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port. Blocking.

    Raises:
        TimeoutError: nothing did within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
