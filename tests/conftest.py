"""Shared fixtures: real brokers on free loopback ports, a topic prefix per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.broker import BrokerThread, load_config
from bus.topics import Topics
from cli.ports import free_port as free_port  # re-exported for the tests
from cli.ports import wait_port as wait_port
from tests.webfiles import Web


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
    with (directory / "mosquitto.log").open("ab") as log:  # the child keeps its own copy
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


class RestartableBroker(RunningBroker):
    """A broker of this test's own on a fixed port that the test may stop and start again.

    amqtt runs as a new BrokerThread on the same port (retained messages live
    in memory, so they are gone after a restart); mosquitto as a child process
    with persistence in its own directory (retained messages survive).
    """

    def __init__(self, kind: str, port: int, directory: Path) -> None:
        super().__init__(kind, port)
        self.directory = directory
        self._thread: BrokerThread | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None or self._proc is not None

    def start(self) -> None:
        """Start (again) on the same port; blocking."""
        if self.running:
            return
        if self.kind == "amqtt":
            thread = BrokerThread(load_config(None, "127.0.0.1", self.port))
            thread.start()
            self._thread = thread
        else:
            self._proc = start_mosquitto(self.directory, self.port, persistence=True)

    def stop(self) -> None:
        """Stop; connected clients see their connection drop. Blocking."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None


@pytest.fixture(params=["amqtt", "mosquitto"])
def restartable_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RestartableBroker]:
    """A function-scoped broker (each kind in turn) that the test can stop and restart."""
    broker = RestartableBroker(request.param, free_port(), tmp_path / f"{request.param}-broker")
    broker.start()
    yield broker
    broker.stop()


class AgentProcess(subprocess.Popen[bytes]):
    """A real ``fleet agent`` child process; its stdout and stderr go to ``log_path``."""

    node: str
    log_path: Path

    def log(self) -> str:
        """What the agent wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


AgentStarter = Callable[..., AgentProcess]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[AgentStarter]:
    """Start real agent processes: ``start_agent(broker_url, node, topics, heartbeat_s="0.5", label=[...])``.

    Keyword flags become ``--flag-name value`` (a list repeats the flag; ``True``
    passes the bare flag); ``env={...}`` adds environment variables. The topic
    prefix goes in as FLEET_PREFIX, the state dir defaults to ``tmp_path/state-NODE``.
    Every process still running at teardown is killed (SIGCONT first, in case a
    test froze it).
    """
    started: list[AgentProcess] = []

    def start(
        broker_url: str, node: str, topics: Topics, *, env: dict[str, str] | None = None, **flags: Any
    ) -> AgentProcess:
        flags.setdefault("state_dir", str(tmp_path / f"state-{node}"))
        argv = [sys.executable, "-m", "cli.main", "agent", "--broker", broker_url, "--node-id", node]
        for name, value in flags.items():
            option = "--" + name.replace("_", "-")
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in values:
                argv += [option] if item is True else [option, str(item)]
        environ = {**os.environ, "FLEET_PREFIX": topics.prefix, "FLEET_LOG_LEVEL": "INFO", **(env or {})}
        log_path = tmp_path / f"agent-{node}-{len(started)}.log"
        with log_path.open("ab") as log:
            proc = AgentProcess(argv, stdout=log, stderr=log, env=environ, cwd=tmp_path)
        proc.node = node
        proc.log_path = log_path
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@pytest.fixture
def web() -> Iterator[Web]:
    """A real HTTP server on 127.0.0.1 serving the test's files (downloads, health checks)."""
    server = Web()
    yield server
    server.close()
