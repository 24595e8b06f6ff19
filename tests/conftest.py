"""Shared fixtures: real brokers on free loopback ports, a topic prefix per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.broker import BrokerThread, load_config
from bus.topics import Topics


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FLEET_* variable and no config file from the developer's machine leaks in."""
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLEET_NO_CONFIG_DISCOVERY", "1")


class RunningBroker:
    """A broker a test can talk to (and, for fault tests, restart)."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        self.port = port

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def _start_amqtt() -> tuple[RunningBroker, BrokerThread]:
    port = free_port()
    thread = BrokerThread(load_config(None, "127.0.0.1", port))
    thread.start()
    return RunningBroker("amqtt", port), thread


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[RunningBroker]:
    """The embedded amqtt broker (our guarded FleetBroker) in a thread."""
    broker, thread = _start_amqtt()
    yield broker
    thread.stop()


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def start_mosquitto(directory: Path, port: int, persistence: bool = False) -> subprocess.Popen[bytes]:
    """Start Debian's mosquitto on 127.0.0.1:port with fleetbus's transport settings."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (.ci/run installs it)")
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
        "max_keepalive 65535",
    ]
    if persistence:
        lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 1"]
    else:
        lines.append("persistence false")
    conf.write_text("\n".join(lines) + "\n")
    log = (directory / "mosquitto.log").open("ab")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """Debian's mosquitto as a child process."""
    port = free_port()
    proc = start_mosquitto(tmp_path_factory.mktemp("mosquitto"), port)
    yield RunningBroker("mosquitto", port)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    """Each test that takes it runs once on each broker."""
    fixture: RunningBroker = request.getfixturevalue(f"{request.param}_broker")
    return fixture


@pytest.fixture
def topics() -> Topics:
    """A topic prefix of this test's own, so retained messages never leak between tests."""
    return Topics(f"fleet-t-{uuid.uuid4().hex[:10]}/v1")
