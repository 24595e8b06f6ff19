"""The fault-injection suite's harness: real hub and agent processes, a freezable proxy, trials, seeds.

- ``fault`` marker: every test under ``tests/fault`` carries it (``-m fault`` runs
  the suite alone, ``-m "not fault"`` leaves it out).
- ``FLEET_FAULT_TRIALS=N``: every trial-based scenario runs N trials instead of
  its small default (a long run: 50 for the hub kills, 100 for the torn-file
  test); hypothesis examples scale with it too.
- ``FLEET_FAULT_SEED=S``: the random moments of a run come from one seed, printed
  with every failure ("rerun with FLEET_FAULT_SEED=S") so it can be replayed.

``Fleet`` starts real ``fleet hub`` and ``fleet agent`` processes (pid tracked,
killed with SIGKILL by pid, never by name) under a topic prefix of the test's
own; ``Observer`` follows every message under that prefix and asks the hub
through ``hub/request``; ``FreezableProxy`` is a loopback TCP proxy that can
stop forwarding without closing anything (a half-open partition) and heal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bus.errors import BusError, InvalidInput
from bus.messages import (
    Event,
    HubState,
    JobSnapshot,
    NodeState,
    Reply,
    RequestOp,
    RolloutSummary,
    StepStatus,
    decode,
)
from bus.mqtt import MqttClient
from bus.rpc import HubClient
from bus.signing import generate_keypair
from bus.topics import Topics

# Read at import: the autouse fixture of tests/conftest.py clears FLEET_* for every test.
_TRIALS = os.environ.get("FLEET_FAULT_TRIALS", "").strip()
_SEED = os.environ.get("FLEET_FAULT_SEED", "").strip()
BASE_SEED = int(_SEED) if _SEED else random.SystemRandom().randrange(1, 2**31)

DEADLINE = 60.0  # generous: 2 shared cores; figures are measured apart from assertions
FINAL_ROLLOUT = frozenset({"succeeded", "halted", "rolled_back", "rollback_failed", "aborted"})
FINAL_JOB = frozenset({"succeeded", "failed", "rolled_back", "rollback_failed"})

T = TypeVar("T")


def trials(default: int, cap: int | None = None) -> int:
    """How many trials a scenario runs: ``FLEET_FAULT_TRIALS`` (at most ``cap``), else ``default``."""
    if not _TRIALS:
        return default
    wanted = max(1, int(_TRIALS))
    return wanted if cap is None else max(default, min(wanted, cap))


def is_long_run() -> bool:
    """True when ``FLEET_FAULT_TRIALS`` asks for a long run."""
    return bool(_TRIALS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.fault)


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _log_figures(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    """The figures a scenario logs at INFO (``_LOGGER`` of its module) are captured and shown."""
    caplog.set_level(logging.INFO, logger=request.module.__name__)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """This test's seeded RNG (the seed is printed if the test fails)."""
    request.node.stash[_SEED_KEY] = BASE_SEED
    return random.Random(f"{BASE_SEED}:{request.node.nodeid}")  # noqa: S311 - fault moments, not secrets


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(("fault seed", f"rerun with FLEET_FAULT_SEED={seed}"))
    return report


# ------------------------------------------------------------------ processes


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no FLEET_* of the developer's, no config discovery."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**environ, "FLEET_NO_CONFIG_DISCOVERY": "1", "FLEET_LOG_LEVEL": "INFO", **extra}


class Proc:
    """One child process of the test; its output goes to ``log_path``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid (SIGCONT first, in case the test froze it) and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not go."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]


# Scripts the fleet's nodes run: each node's "version" is made of parts that steps
# change one by one, so a node left between versions (mixed) shows.
SCRIPTS = {
    "part.sh": (
        "#!/bin/sh\n"
        "# part.sh PART VERSION [SECONDS]: apply sets parts/PART to VERSION (the old value is kept\n"
        "# per command first); rollback puts the kept value back. Every run is recorded.\n"
        "set -e\n"
        "part=$1; version=$2; pause=${3:-0}\n"
        'dir="$FLEET_STATE_DIR/parts"; mkdir -p "$dir"\n'
        'keep="$dir/.$part.before-$FLEET_COMMAND"\n'
        'echo "$FLEET_PHASE $FLEET_ROLLOUT $part $version" >> "$FLEET_STATE_DIR/record.log"\n'
        'if [ "$FLEET_PHASE" = apply ]; then\n'
        '  if [ ! -e "$keep" ]; then cp "$dir/$part" "$keep.tmp" && mv "$keep.tmp" "$keep"; fi\n'
        '  sleep "$pause"\n'
        '  echo "$version" > "$dir/$part.tmp" && mv "$dir/$part.tmp" "$dir/$part"\n'
        "else\n"
        '  sleep "$pause"\n'
        '  if [ -e "$keep" ]; then cp "$keep" "$dir/$part.tmp" && mv "$dir/$part.tmp" "$dir/$part"; fi\n'
        "fi\n"
    ),
    "gate.sh": (
        "#!/bin/sh\n"
        "# gate.sh [SECONDS]: fails when $FLEET_STATE_DIR/broken exists (a node the update breaks);\n"
        "# the old version, checked once the node is restored (FLEET_PHASE=verify), is fine.\n"
        'sleep "${1:-0}"\n'
        'if [ "$FLEET_PHASE" != verify ] && [ -e "$FLEET_STATE_DIR/broken" ]; then\n'
        '  echo "broken on purpose" >&2; exit 1\n'
        "fi\n"
        "echo ok\n"
    ),
    "fill.sh": (
        "#!/bin/sh\n"
        "# fill.sh: apply writes $FLEET_STATE_DIR/blob until the disk is full (and fails);\n"
        "# rollback removes it.\n"
        'if [ "$FLEET_PHASE" = apply ]; then exec dd if=/dev/zero of="$FLEET_STATE_DIR/blob" bs=64k; fi\n'
        'rm -f "$FLEET_STATE_DIR/blob"\n'
    ),
    "slow.sh": (
        "#!/bin/sh\n"
        "# slow.sh SECONDS: sleeps (a long step to be interrupted); recorded like part.sh.\n"
        'echo "$FLEET_PHASE $FLEET_ROLLOUT slow $1" >> "$FLEET_STATE_DIR/record.log"\n'
        'if [ "$FLEET_PHASE" = apply ]; then sleep "$1"; fi\n'
    ),
}


class Fleet:
    """Real ``fleet hub`` and ``fleet agent`` processes of one test (see the module docstring)."""

    def __init__(self, broker_url: str, root: Path, topics: Topics) -> None:
        self.broker_url = broker_url
        self.root = root
        self.topics = topics
        self.prefix = topics.prefix
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self.key, self.pub = generate_keypair(root / "keys")
        self.scripts = root / "scripts"
        self.scripts.mkdir(exist_ok=True)
        for name, text in SCRIPTS.items():
            (self.scripts / name).write_text(text)
            (self.scripts / name).chmod(0o755)
        self.db = root / "hub.json"
        self.hub_id = f"hub-{uuid.uuid4().hex[:8]}"
        self.procs: list[Proc] = []
        self.hub: Proc | None = None
        self.members: dict[str, Proc] = {}  # every hub process by hub id (standby hubs)
        self.agents: dict[str, Proc] = {}

    # -------------------------------------------------------------- starting

    def _spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        count = sum(1 for p in self.procs if p.name == name)
        log = self.root / "logs" / f"{name}-{count}.log"
        proc = Proc(name, [sys.executable, "-m", "cli.main", *argv], log, self.root, clean_env(**env))
        self.procs.append(proc)
        return proc

    def start_hub(self, *extra: str, broker_url: str | None = None) -> Proc:
        """Start (or restart) the hub on the same database."""
        self.hub = self.start_member(self.hub_id, *extra, broker_url=broker_url)
        return self.hub

    def start_member(self, hub_id: str, *extra: str, broker_url: str | None = None) -> Proc:
        """Start (or restart) one hub of several (DESIGN 3.9): its own id and database, one key."""
        db = self.db if hub_id == self.hub_id else self.root / f"{hub_id}.json"
        proc = self._spawn(
            hub_id,
            [
                "hub", "--broker", broker_url or self.broker_url, "--prefix", self.prefix,
                "--db", str(db), "--signing-key", str(self.key), "--client-id", hub_id,
                "--heartbeat-s", "1", *extra,
            ],
        )  # fmt: skip
        self.members[hub_id] = proc
        return proc

    def state_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def prepare_node(self, node: str, parts: dict[str, str] | None = None) -> Path:
        """The node's state dir with its initial parts (version ``v0``)."""
        state = self.state_dir(node)
        (state / "parts").mkdir(parents=True, exist_ok=True)
        for part, value in (parts or {"a": "v0", "b": "v0"}).items():
            path = state / "parts" / part
            if not path.exists():
                path.write_text(value + "\n")
        return state

    def start_agent(
        self,
        node: str,
        *extra: str,
        broker_url: str | None = None,
        heartbeat_s: float = 0.5,
        keepalive_s: int = 5,
        wrapper: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start (or restart) a node's agent on its state dir."""
        state = self.prepare_node(node)
        argv = [
            "agent", "--broker", broker_url or self.broker_url, "--prefix", self.prefix, "--node-id", node,
            "--state-dir", str(state), "--scripts-dir", str(self.scripts), "--trust", str(self.pub),
            "--heartbeat-s", str(heartbeat_s), "--keepalive-s", str(keepalive_s), *extra,
        ]  # fmt: skip
        if wrapper:
            count = sum(1 for p in self.procs if p.name == node)
            log = self.root / "logs" / f"{node}-{count}.log"
            proc = Proc(
                node,
                [*wrapper, sys.executable, "-m", "cli.main", *argv],
                log,
                self.root,
                clean_env(**(env or {})),
            )
            self.procs.append(proc)
        else:
            proc = self._spawn(node, argv, **(env or {}))
        self.agents[node] = proc
        return proc

    # -------------------------------------------------------------- looking

    def records(self, node: str, rollout: str | None = None) -> list[tuple[str, ...]]:
        """The node's record.log as (phase, rollout, part, version) rows."""
        path = self.state_dir(node) / "record.log"
        rows = [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []
        return [row for row in rows if rollout is None or (len(row) > 1 and row[1] == rollout)]

    def parts(self, node: str) -> dict[str, str]:
        directory = self.state_dir(node) / "parts"
        return {
            p.name: p.read_text().strip() for p in sorted(directory.iterdir()) if not p.name.startswith(".")
        }

    def logs(self, tail: int = 3000) -> str:
        """The tails of every process's log (for failure messages)."""
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.log(tail)}" for p in self.procs[-12:])

    # -------------------------------------------------------------- stopping

    def close(self) -> None:
        """Kill every process this fleet started, and the services and scripts they left."""
        for proc in self.procs:
            proc.kill()
        for node in self.agents:
            state = self.state_dir(node)
            for pidfile in [*(state / "services").glob("*.pid"), state / "sleepy.pid"]:
                with contextlib.suppress(OSError, ValueError):
                    os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``make_fleet(broker_url, topics)``: a Fleet rooted in tmp_path, torn down after the test."""
    made: list[Fleet] = []

    def make(broker_url: str, topics: Topics, name: str = "fleet") -> Fleet:
        fleet = Fleet(broker_url, tmp_path / name, topics)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


# ------------------------------------------------------------------ watching


class Observer:
    """Every message under the fleet's prefix, the latest of each retained kind, and requests to the hub."""

    def __init__(self, broker_url: str, topics: Topics) -> None:
        self.topics = topics
        self.client = MqttClient(broker_url, client_id=f"watch-{uuid.uuid4().hex[:8]}", keepalive=5)
        self.rpc = HubClient(self.client, topics)
        self.summaries: dict[str, RolloutSummary] = {}
        self.jobs: dict[str, JobSnapshot] = {}
        self.states: dict[str, NodeState] = {}
        self.cmds: dict[str, bytes] = {}
        self.statuses: list[StepStatus] = []
        self.events: list[tuple[float, Event]] = []
        self.hub_state: HubState | None = None
        self.hub_births = 0
        self.members: dict[str, HubState] = {}  # every hub's membership record (DESIGN 3.9)
        #: Replies seen per request id on this observer's reply topic (exactly one each).
        self.replies: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        await self.client.start()
        await self.client.subscribe(f"{self.topics.prefix}/#", qos=1)
        self._task = asyncio.create_task(self._pump(), name="observer")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def _pump(self) -> None:
        async for message in self.client.messages():
            if message.topic == self.rpc.reply_topic:
                with contextlib.suppress(InvalidInput):
                    request = decode(Reply, message.payload).request
                    self.replies[request] = self.replies.get(request, 0) + 1
            if self.rpc.feed(message.topic, message.payload):
                continue
            with contextlib.suppress(InvalidInput):
                self._take(message.topic, message.payload)
            self._changed.set()

    def _take(self, topic: str, payload: bytes) -> None:
        rollout = self.topics.parse_rollout(topic)
        if rollout is not None:
            if payload:
                self.summaries[rollout] = decode(RolloutSummary, payload)
            return
        if topic == self.topics.events:
            self.events.append((time.monotonic(), decode(Event, payload)))
            return
        member = self.topics.parse_hub_member(topic)
        if member is not None:
            if payload:
                self.members[member] = decode(HubState, payload)
            return
        if topic == self.topics.hub_state:
            if payload:
                self.hub_state = decode(HubState, payload)
                self.hub_births += self.hub_state.state in ("online", "active")
            return
        parsed = self.topics.parse_node(topic)
        if parsed is None:
            return
        node, channel = parsed.node, parsed.channel
        if channel == "cmd":
            self.cmds[node] = payload
        elif not payload:
            return
        elif channel == "job":
            self.jobs[node] = decode(JobSnapshot, payload)
        elif channel == "state":
            self.states[node] = decode(NodeState, payload)
        elif channel == "status":
            self.statuses.append(decode(StepStatus, payload))

    async def wait(self, get: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
        """Until ``get()`` returns something other than None (checked on every message and every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            value = get()
            if value is not None:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    async def retained_cmds(self) -> dict[str, bytes]:
        """The commands a client subscribing now finds retained on the broker, by node.

        A fresh client subscribes to every ``cmd`` topic, then sends itself a probe
        (the broker hands out retained messages before it handles the probe).
        """
        found: dict[str, bytes] = {}
        probe = f"{self.topics.prefix}/probe/{uuid.uuid4().hex[:8]}"
        async with MqttClient(self.client.url, keepalive=5) as client:
            await client.subscribe(self.topics.node_filter("cmd"), qos=1)
            await client.subscribe(probe, qos=1)
            await client.publish(probe, b"probe", qos=1)

            async def read() -> None:
                async for message in client.messages():
                    if message.topic == probe:
                        return
                    parsed = self.topics.parse_node(message.topic)
                    if parsed is not None and message.payload:
                        found[parsed.node] = message.payload

            await asyncio.wait_for(read(), DEADLINE)
        return found

    async def status(
        self, rollout: str, state: str, *, index: int | None = None, after: int = 0, timeout: float = DEADLINE
    ) -> StepStatus:
        """The first ``StepStatus`` (from the ``after``-th on) of ``rollout`` in ``state`` (at ``index``)."""

        def find() -> StepStatus | None:
            for status in self.statuses[after:]:
                if status.rollout == rollout and status.state == state and index in (None, status.index):
                    return status
            return None

        return await self.wait(find, f"a {state} status of {rollout} (step {index})", timeout)

    async def call(
        self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = DEADLINE
    ) -> Reply:
        """A request to the hub, asked again while no hub answers (it may be restarting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.rpc.call(op, body, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            except BusError:
                if time.monotonic() > deadline:
                    raise
                # "hub offline" (its retained state) is said at once: ask again shortly.
                await asyncio.sleep(0.2)

    async def ok(self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = DEADLINE) -> Any:
        reply = await self.call(op, body, timeout)
        assert reply.ok, f"{op} refused: {reply.error}"
        return reply.body

    async def hub_ready(self, births_before: int, timeout: float = DEADLINE) -> None:
        """A hub birth newer than ``births_before`` was seen (a restarted hub is up)."""
        await self.wait(
            lambda: (
                (
                    self.hub_births > births_before
                    and self.hub_state is not None
                    and self.hub_state.state in ("online", "active")
                )
                or None
            ),
            "the hub's birth",
            timeout,
        )

    def active_hub(self) -> str | None:
        """The hub the retained ``hub/state`` names active (DESIGN 3.9), or None."""
        state = self.hub_state
        return state.hub if state is not None and state.state == "active" else None

    def is_standing_by(self, hub: str) -> bool:
        """True when ``hub``'s membership record says it stands by."""
        member = self.members.get(hub)
        return member is not None and member.state == "standby"

    async def job_end(
        self, node: str, rollout: str, *, undo: bool = False, timeout: float = DEADLINE
    ) -> tuple[JobSnapshot, float]:
        """The node's final job snapshot of ``rollout`` and when it was seen (monotonic).

        ``undo``: of its abort or rollback, else of its apply.
        """

        def ended() -> tuple[JobSnapshot, float] | None:
            snap = self.jobs.get(node)
            if snap is None or snap.rollout != rollout or snap.phase not in FINAL_JOB:
                return None
            if (snap.action != "apply") != undo:
                return None
            return snap, time.monotonic()

        what = f"{node}'s {'undo' if undo else 'apply'} of {rollout} to end"
        found: tuple[JobSnapshot, float] = await self.wait(ended, what, timeout)
        return found

    async def online(self, nodes: list[str], timeout: float = DEADLINE) -> None:
        """The hub's registry has every one of ``nodes`` online."""
        deadline = time.monotonic() + timeout
        while True:
            table = await self.ok("nodes", {"nodes": nodes}, timeout=max(1.0, deadline - time.monotonic()))
            up = {row["node"] for row in table if row.get("online")}
            if up >= set(nodes):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes not online at the hub: {sorted(set(nodes) - up)}")
            await asyncio.sleep(0.2)

    async def final(self, rollout: str, timeout: float = DEADLINE) -> RolloutSummary:
        """The rollout's retained summary once it is in a final state with no node still open."""

        def done() -> RolloutSummary | None:
            summary = self.summaries.get(rollout)
            if summary is None or summary.state not in FINAL_ROLLOUT:
                return None
            if any(n.phase in ("applying", "rolling_back") for n in summary.nodes.values()):
                return None
            return summary

        # The retained summary, and the hub's own answer every few seconds (a restarted
        # embedded broker has no retained summary to give).
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(AssertionError):
                return await self.wait(done, f"rollout {rollout} to end", min(3.0, timeout))
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rollout {rollout} did not end within {timeout:g} s: {self.summaries.get(rollout)}"
                )
            with contextlib.suppress(BusError):
                reply = await self.rpc.call("show", {"rollout": rollout}, timeout=3.0)
                if reply.ok:
                    self.summaries[rollout] = RolloutSummary.model_validate(reply.body)


# ------------------------------------------------------------------ the promise


def parts_spec(name: str, version: str, nodes: list[str], pause: str = "0.3", **extra: Any) -> dict[str, Any]:
    """A rollout that moves parts ``a`` then ``b`` of every node to ``version``, then checks the node."""
    return {
        "name": name,
        "targets": nodes,
        "plan": [
            {"type": "script", "name": "part.sh", "args": ["a", version, pause], "rollback": "part.sh"},
            {"type": "script", "name": "part.sh", "args": ["b", version, pause], "rollback": "part.sh"},
            {"type": "script", "name": "gate.sh", "args": ["0.1"]},
        ],
        "strategy": {"waves": [1, "100%"]},
        "node_timeout_s": 120,
        **extra,
    }


async def start_fleet(fleet: Fleet, observer: Observer, nodes: list[str], *extra: str, **agent: Any) -> None:
    """Start the hub and an agent per node (``extra``: its flags); return once the hub has them all online."""
    births = observer.hub_births
    fleet.start_hub()
    for node in nodes:
        fleet.start_agent(node, *extra, **agent)
    await observer.hub_ready(births)
    await observer.online(nodes)


async def start_agents(
    fleet: Fleet, observer: Observer, nodes: list[str], *, timeout: float = DEADLINE, **agent: Any
) -> None:
    """Start an agent per node (a hub runs already); return once the hub has them all online."""
    for node in nodes:
        fleet.start_agent(node, **agent)
    await observer.online(nodes, timeout=timeout)


def http_answer(port: int) -> str:
    """What a node's service on ``127.0.0.1:port`` answers (stripped), or why it does not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return str(response.read().decode().strip())
    except OSError as exc:
        return f"no answer ({exc})"


async def check_outcome(
    fleet: Fleet,
    observer: Observer,
    rollout: str,
    nodes: list[str],
    expected: frozenset[str],
    old: str,
    new: str,
    timeout: float = DEADLINE,
) -> str:
    """The promise: a final state among ``expected``, known to the hub; every node wholly on the
    old or the new version as that state says; no step run twice; no command left retained.

    Returns:
        The final state.
    """
    summary = await observer.final(rollout, timeout)
    context = f"rollout {rollout}: {summary}\n{fleet.logs()}"
    shown = await observer.ok("show", {"rollout": rollout})
    assert summary.state in expected, context
    assert shown["state"] == summary.state, context
    succeeded = summary.state == "succeeded"
    version = new if succeeded else old
    for node in nodes:
        phase = shown["nodes"][node]["phase"]
        # A node the rollout never reached is not_started, on the old version.
        untouched = not succeeded and phase in ("pending", "not_started") and not fleet.records(node, rollout)
        wanted = "succeeded" if succeeded else "rolled_back"
        assert untouched or phase == wanted, f"{node}: {phase}; {context}"
        assert fleet.parts(node) == {"a": version, "b": version}, f"{node} is mixed; {context}"
        runs: dict[tuple[str, str], int] = {}
        for row in fleet.records(node, rollout):
            runs[(row[0], row[2])] = runs.get((row[0], row[2]), 0) + 1
        assert all(count == 1 for count in runs.values()), f"{node} ran a step twice: {runs}; {context}"
        applied = {part for phase, part in runs if phase == "apply"}
        undone = {part for phase, part in runs if phase == "rollback"}
        # (Steps that change no part, such as a slow step, may be recorded too.)
        parts = {"a", "b"}
        if succeeded:
            assert applied & parts == parts, f"{node}: {runs}; {context}"
            assert not undone, f"{node}: {runs}; {context}"
        else:
            assert applied == undone, f"{node}: {runs}; {context}"
        assert fleet.agents[node].alive(), fleet.agents[node].log()
    # Nothing stale waits on the broker (DESIGN 3.2).
    deadline = time.monotonic() + DEADLINE
    while left := await observer.retained_cmds():
        assert time.monotonic() < deadline, f"commands left retained for {sorted(left)}; {context}"
        await asyncio.sleep(0.5)
    return summary.state


@contextlib.asynccontextmanager
async def observing(broker_url: str, topics: Topics) -> AsyncIterator[Observer]:
    async with Observer(broker_url, topics) as observer:
        yield observer


# ------------------------------------------------------------------ partition


class FreezableProxy:
    """A loopback TCP proxy to ``127.0.0.1:target``; ``freeze()`` stops all forwarding without
    closing anything (no FIN, no RST: a half-open partition), ``heal()`` resumes it.

    While frozen, new connections are accepted by the kernel but never forwarded
    (like SYNs into a black hole that a middlebox answers).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    def _keep(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._open.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            self._writers.add(up_writer)
            self.connections += 1
            self._keep(self._pump(reader, up_writer))
            self._keep(self._pump(up_reader, writer))
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await source.read(65536)
                if not data:
                    break
                await self._open.wait()  # data read just before a freeze is held, not sent
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()
            self._writers.discard(sink)


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[[int], Any]]:
    made: list[FreezableProxy] = []

    async def make(target_port: int) -> FreezableProxy:
        proxy = FreezableProxy(target_port)
        await proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.heal()
        await proxy.close()


# ------------------------------------------------------------------ artifacts


class SlowWeb:
    """A loopback HTTP server (in a thread) serving bodies in chunks, ``delay_s`` between chunks."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, float]] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = files.get(self.path)
                if found is None:
                    self.send_error(404)
                    return
                body, delay = found
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    for start in range(0, len(body), 64 * 1024):
                        self.wfile.write(body[start : start + 64 * 1024])
                        self.wfile.flush()
                        time.sleep(delay)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, delay_s: float = 0.0) -> tuple[str, str]:
        """Serve ``body`` at ``path``; return (url, sha256)."""
        self.files[path] = (body, delay_s)
        url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        return url, hashlib.sha256(body).hexdigest()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def slow_web() -> Iterator[SlowWeb]:
    server = SlowWeb()
    yield server
    server.close()
