"""What every benchmark shares: brokers, hub and simulator processes, an observer, /proc figures.

Each benchmark starts its own broker on a free loopback port (mosquitto with
the settings of tests/conftest.py ``start_mosquitto``, or the embedded amqtt
broker as a ``fleet broker`` child process), its own ``fleet hub`` and
``fleet simulate`` processes, and ends every process it started. Figures come
from /proc (CPU seconds, RSS) and from what a separate observer client sees on
the bus; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.messages import Event, Reply, RequestOp, RolloutSummary, StepStatus, decode
from bus.mqtt import MqttClient
from bus.rpc import HubClient
from bus.signing import generate_keypair
from bus.topics import Topics
from cli.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FINAL_STATES = {"succeeded", "halted", "rolled_back", "rollback_failed", "aborted"}
#: The two-step plan of the rollout benchmarks: every step type is simulated the same way.
PLAN: list[dict[str, Any]] = [
    {"type": "package", "manager": "apt", "name": "app", "version": "2.0"},
    {"type": "service", "action": "restart", "name": "app"},
]


# ----------------------------------------------------------------------------- processes


def child_env(**extra: str) -> dict[str, str]:
    """The environment of fleet child processes: no FLEET_* of the caller's, no config discovery."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_NO_CONFIG_DISCOVERY": "1", "FLEET_LOG_LEVEL": "WARNING", **extra})
    return env


@dataclass
class Child:
    """A process this benchmark started; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return rss_mib(self.pid)


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env or child_env(), cwd=workdir)
    return Child(name, proc, log)


def fleet(name: str, workdir: Path, *args: str, env: dict[str, str] | None = None) -> Child:
    """Start ``fleet ARGS`` (this checkout's) as a child process.

    With BENCH_PROFILE=DIR in the environment, hub and simulator run under
    cProfile and leave DIR/NAME.prof when they stop.
    """
    profile = os.environ.get("BENCH_PROFILE")
    profiled = profile and name in ("hub", "simulate")
    wrap = ["-m", "cProfile", "-o", f"{profile}/{name}.prof"] if profiled else []
    return spawn(name, [sys.executable, *wrap, "-m", "cli.main", *args], workdir, env)


def wait_log(child: Child, text: str, timeout: float) -> str:
    """Wait until ``text`` shows up in the child's log; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in child.log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if not child.alive():
            raise RuntimeError(f"{child.name} exited {child.proc.returncode}:\n{child.tail()}")
        time.sleep(0.05)
    raise TimeoutError(f"{child.name}: no {text!r} within {timeout:g} s:\n{child.tail()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        raise SystemExit("mosquitto is not installed: apt-get install -y mosquitto")
    return binary


@dataclass
class Broker:
    kind: str
    port: int
    child: Child
    #: every server's process (a cluster), the first being ``child``
    children: list[Child] = field(default_factory=list)
    #: the URL list of a cluster (``?kind=nats``), else None
    urls: str | None = None

    @property
    def url(self) -> str:
        return self.urls or f"mqtt://127.0.0.1:{self.port}"


def start_broker(kind: str, workdir: Path) -> Broker:
    """mosquitto (tests/conftest.py settings) or the embedded amqtt broker (``fleet broker``)."""
    port = free_port()
    if kind == "mosquitto":
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {port} 127.0.0.1",
                    "allow_anonymous true",
                    "set_tcp_nodelay true",
                    "max_queued_messages 100000",
                    "max_inflight_messages 1000",
                    "max_keepalive 65535",
                    "persistence false",
                ]
            )
            + "\n"
        )
        child = spawn("mosquitto", [mosquitto_binary(), "-c", str(conf)], workdir)
    elif kind == "amqtt":
        child = fleet("broker", workdir, "broker", "--host", "127.0.0.1", "--port", str(port))
    elif kind == "nats":
        return _start_nats(workdir)
    else:
        raise SystemExit(f"unknown broker {kind!r}: mosquitto, amqtt or nats")
    try:
        wait_port(port, timeout=60.0)  # a loaded machine may take long to import a broker
    except TimeoutError:
        child.stop()
        raise
    return Broker(kind, port, child)


def _start_nats(workdir: Path) -> Broker:
    """A 3-server NATS cluster (tests/nats_cluster.py, no users) on free loopback ports."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.nats_cluster import NatsCluster, nats_binary

    if nats_binary() is None:
        raise SystemExit("nats-server is not installed: apt-get install -y nats-server")
    cluster = NatsCluster(workdir / "nats", ["bench"], prefix="bench/v1", anonymous=True)
    try:
        asyncio.run(cluster.start())
    except BaseException:
        cluster.stop()
        raise
    children = [
        Child(f"broker-{index}", proc, workdir / "nats" / f"nats-{index}.log")
        for index, proc in sorted(cluster.procs.items())
    ]
    return Broker("nats", cluster.mqtt_port(1), children[0], children, cluster.url("hub"))


# ----------------------------------------------------------------------------- one bench run


@dataclass
class Bench:
    """The processes of one benchmark run; ``with Bench(...) as bench:`` ends them all."""

    broker_kind: str
    prefix: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}/v1")
    keep: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fleet-bench-")))
    children: list[Child] = field(default_factory=list)
    broker: Broker | None = None
    hub: Child | None = None
    http_port: int | None = None
    journal: str = "file"
    #: the QoS of every client's subscriptions (``?subqos=``), None: the URL's default
    sub_qos: int | None = None

    def __enter__(self) -> Bench:
        self.key, self.pub = generate_keypair(self.workdir / "keys")
        self.broker = start_broker(self.broker_kind, self.workdir)
        self.children.extend(self.broker.children or [self.broker.child])
        return self

    def __exit__(self, *_exc: object) -> None:
        for child in reversed(self.children):
            child.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def url(self) -> str:
        if self.broker is None:
            raise RuntimeError("no broker started")
        if self.sub_qos is None:
            return self.broker.url
        return ",".join(
            f"{url}{'&' if '?' in url else '?'}subqos={self.sub_qos}" for url in self.broker.url.split(",")
        )

    def child(self, name: str) -> Child:
        """The child process started under ``name`` (hub, simulate, broker, mosquitto...)."""
        for child in self.children:
            if child.name == name:
                return child
        raise RuntimeError(f"no {name} process started")

    @property
    def broker_port(self) -> int:
        if self.broker is None:
            raise RuntimeError("no broker started")
        return self.broker.port

    @property
    def broker_child(self) -> Child:
        if self.broker is None:
            raise RuntimeError("no broker started")
        return self.broker.child

    @property
    def broker_children(self) -> list[Child]:
        """Every server process of the broker (one, or a cluster's)."""
        if self.broker is None:
            raise RuntimeError("no broker started")
        return self.broker.children or [self.broker.child]

    @property
    def single_url(self) -> str:
        """One server's URL (the raw paho measurement takes one)."""
        return self.url.split(",")[0]

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def start_hub(self, *extra: str) -> Child:
        self.http_port = free_port()
        self.hub = fleet(
            "hub",
            self.workdir,
            "hub",
            "--broker",
            self.url,
            "--prefix",
            self.prefix,
            "--db",
            str(self.workdir / "hub.json"),
            "--signing-key",
            str(self.key),
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--client-id",
            f"hub-{uuid.uuid4().hex[:6]}",
            *extra,
        )
        self.children.append(self.hub)
        wait_log(self.hub, "fleet hub: connected", 60)
        return self.hub

    def start_simulator(
        self,
        nodes: int,
        *,
        step_ms: float = 0,
        heartbeat_s: float = 5,
        fail: tuple[str, ...] = (),
        name: str = "simulate",
        node_prefix: str = "sim-",
        timeout: float = 300,
    ) -> Child:
        args = [
            "simulate",
            "--broker",
            self.url,
            "--prefix",
            self.prefix,
            "--nodes",
            str(nodes),
            "--trust",
            str(self.pub),
            "--step-ms",
            str(step_ms),
            "--heartbeat-s",
            str(heartbeat_s),
            "--node-prefix",
            node_prefix,
            "--journal",
            self.journal,
            "--start-timeout-s",
            str(timeout),
        ]
        for item in fail:
            args += ["--fail", item]
        child = fleet(name, self.workdir, *args)
        self.children.append(child)
        wait_log(child, "nodes online", timeout)
        return child

    def start_simulators(self, nodes: int, count: int, *, lettered: bool = True, **options: Any) -> None:
        """``nodes`` over ``count`` simulators, ``simulate``, ``simulate-2``..., of nodes ``sim-a-*``,
        ``sim-b-*``... (one simulator without ``lettered``: ``sim-*``); ``options`` as ``start_simulator``."""
        for index in range(count):
            share = nodes // count + (index < nodes % count)
            self.start_simulator(
                share,
                name="simulate" if index == 0 else f"simulate-{index + 1}",
                node_prefix=f"sim-{chr(ord('a') + index)}-" if lettered or count > 1 else "sim-",
                **options,
            )

    def start_agent(self, node: str, *extra: str, optimized: bool = False) -> Child:
        """A real ``fleet agent``; ``optimized``: as deploy/fleet-agent.service runs it (PYTHONOPTIMIZE=2)."""
        child = fleet(
            f"agent-{node}",
            self.workdir,
            "agent",
            "--broker",
            self.url,
            "--prefix",
            self.prefix,
            "--node-id",
            node,
            "--state-dir",
            str(self.workdir / f"state-{node}"),
            "--trust",
            str(self.pub),
            *extra,
            env=child_env(PYTHONOPTIMIZE="2") if optimized else None,
        )
        self.children.append(child)
        return child

    def metrics(self) -> dict[str, float]:
        """The hub's Prometheus samples (name{labels} -> value); empty if the bridge does not answer."""
        if self.http_port is None:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = float(value)
        return samples


class Observer:
    """A separate client that watches the bus and talks to the hub, as the TUI would.

    It records events, rollout summaries (count and bytes) and step reports.
    """

    def __init__(self, url: str, topics: Topics, *, statuses: bool = True) -> None:
        self.topics = topics
        self.client = MqttClient(url, client_id=f"bench-{uuid.uuid4().hex[:8]}", keepalive=30)
        self.hub = HubClient(self.client, topics)
        self.events: list[tuple[float, Event]] = []
        self.summaries: dict[str, list[tuple[float, int, RolloutSummary | None]]] = {}
        self.statuses: list[tuple[float, StepStatus]] = []
        #: bytes of each per-node change message (``rollout/{id}/nodes``) per rollout
        self.node_changes: dict[str, list[int]] = {}
        #: per rollout: the sizes of its retained record's publishes (head and parts), and the parts seen
        self.record_bytes: dict[str, list[int]] = {}
        self.record_parts: dict[str, set[int]] = {}
        self._watch_statuses = statuses
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Observer:
        await self.client.start()
        await self.hub.subscribe()
        await self.client.subscribe(self.topics.events, qos=0)
        await self.client.subscribe(self.topics.rollout_filter, qos=1)
        await self.client.subscribe(self.topics.rollout_nodes_filter, qos=1)
        await self.client.subscribe(self.topics.rollout_record_filter, qos=1)
        await self.client.subscribe(self.topics.rollout_record_part_filter, qos=1)
        if self._watch_statuses:
            await self.client.subscribe(self.topics.node_filter("status"), qos=1)
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def _pump(self) -> None:
        async for message in self.client.messages():
            now = time.perf_counter()
            if self.hub.feed(message.topic, message.payload):
                continue
            if message.topic == self.topics.events:
                self.events.append((now, decode(Event, message.payload)))
            elif (rollout := self.topics.parse_rollout_nodes(message.topic)) is not None:
                self.node_changes.setdefault(rollout, []).append(len(message.payload))
            elif (rollout := self.topics.parse_rollout_record(message.topic)) is not None:
                self.record_bytes.setdefault(rollout, []).append(len(message.payload))
            elif (part := self.topics.parse_rollout_record_part(message.topic)) is not None:
                self.record_bytes.setdefault(part[0], []).append(len(message.payload))
                self.record_parts.setdefault(part[0], set()).add(part[1])
            elif (rollout := self.topics.parse_rollout(message.topic)) is not None:
                summary = decode(RolloutSummary, message.payload) if message.payload else None
                self.summaries.setdefault(rollout, []).append((now, len(message.payload), summary))
            elif message.topic.endswith("/status"):
                self.statuses.append((now, decode(StepStatus, message.payload)))
            self._changed.set()

    async def until(self, condition: Callable[[], Any], what: str, timeout: float) -> Any:
        """Wait until ``condition()`` is truthy (re-checked on every message and every 50 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(0.05, remaining))

    async def call(self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        reply: Reply = await self.hub.call(op, body, timeout=timeout)
        if not reply.ok:
            raise RuntimeError(f"{op} refused: {reply.error}")
        return reply.body

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node the hub knows, a page at a time (replies are size-bounded)."""
        rows: list[dict[str, Any]] = []
        for _ in range(1000):
            page = await self.call("nodes", {"offset": len(rows), "limit": 200})
            rows += page
            if len(page) < 200:
                break
        return rows

    async def wait_online(self, count: int, timeout: float, prefix: str = "") -> list[str]:
        """Wait until the hub has ``count`` online nodes (whose ids start with ``prefix``)."""
        deadline = time.monotonic() + timeout
        while True:
            online = [r["node"] for r in await self.nodes() if r["online"] and r["node"].startswith(prefix)]
            if len(online) >= count:
                return sorted(online)
            if time.monotonic() > deadline:
                raise TimeoutError(f"hub sees {len(online)} of {count} nodes online after {timeout:g} s")
            await asyncio.sleep(0.25)

    def event(self, kind: str, *, rollout: str | None = None, node: str | None = None) -> float | None:
        """When the first such event arrived (perf_counter), or None."""
        for at, event in self.events:
            if (
                event.kind == kind
                and (rollout is None or event.rollout == rollout)
                and (node is None or event.node == node)
            ):
                return at
        return None

    def final(self, rollout: str) -> tuple[float, str] | None:
        """(when, state) of the rollout's first final state: its event or its summary, whichever first."""
        found: list[tuple[float, str]] = []
        for at, event in self.events:
            if event.rollout == rollout and event.kind in FINAL_STATES:
                found.append((at, event.kind))
                break
        for at, _size, summary in self.summaries.get(rollout, []):
            if summary is not None and summary.state in FINAL_STATES:
                found.append((at, summary.state))
                break
        return min(found) if found else None


# ----------------------------------------------------------------------------- output


def arguments(description: str, **defaults: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--broker",
        choices=["mosquitto", "amqtt", "nats"],
        default="mosquitto",
        help="nats: a 3-server NATS cluster on loopback (MQTT gateway, JetStream)",
    )
    parser.add_argument("--nodes", type=int, default=defaults.get("nodes", 100))
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--sub-qos",
        type=int,
        choices=[0, 1],
        default=None,
        help="QoS of every client's subscriptions (default: 0 at NATS, else 1)",
    )
    parser.add_argument(
        "--journal",
        choices=["file", "memory"],
        default="file",
        help="the simulated nodes' journal (fleet simulate --journal)",
    )
    return parser


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the one JSON object of this run (and write it to ``out``)."""
    result = {
        **result,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load1_after": round(os.getloadavg()[0], 2),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(result, sort_keys=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(text, flush=True)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@contextlib.contextmanager
def cpu_window(*children: Child) -> Iterator[dict[str, float]]:
    """CPU seconds each child used inside the ``with`` block (filled in on exit), plus wall time."""
    before = {c.name: c.cpu_s() for c in children}
    started = time.perf_counter()
    used: dict[str, float] = {}
    yield used
    used["wall"] = time.perf_counter() - started
    for c in children:
        used[c.name] = c.cpu_s() - before[c.name]
