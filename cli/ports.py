"""Loopback ports for the processes the demo, the benchmarks and the tests start."""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "wait_port"]


def free_port(preferred: int = 0) -> int:
    """A TCP port free on 127.0.0.1 right now: ``preferred`` if it is, else any."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
