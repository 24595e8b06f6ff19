"""A simulated fleet: N real agents in one process, their step work simulated (``fleet simulate``).

Every simulated node is an ``edge_agent.service.Agent``, the same code as
``fleet agent``: presence (a fresh session per connection, retained birth and
last will, heartbeats), command intake (own topic, own node, signature,
expiry, replay and policy checks), the journal, ``StepStatus`` and retained
``JobSnapshot`` publishing, recovery. Only the work of a step is simulated:
its ``CommandRunner`` gets a handler for every step type whose apply and undo
sleep ``step_ms`` (and whose apply fails on the nodes named in ``fail``), and
its inventory is a fixed one instead of probing the machine 1000 times.

Every client lives on the process's one asyncio loop: ``bus.mqtt`` serves each
socket through paho's external-loop API on the loop's epoll selector, so a
thousand nodes need no thread per client (paho's ``loop_start`` stops at about
338 clients per process, FINDINGS.md).

State directories (journals) go under a RAM-backed temporary directory
(``/dev/shm`` when there is one), so the journal's fsyncs cost no disk I/O;
pass ``state_root`` to keep them elsewhere. A temporary root is removed on
``stop``.

File I/O inline: every agent writes its journal (atomic write + fsync) in a
worker thread several times per job. With a thousand agents in one process
the hand-offs cost far more than the writes themselves, which on a
RAM-backed directory take microseconds. ``fleet simulate`` therefore runs
them on the loop when the state dirs are RAM-backed (``is_ram_backed``):
``edge_agent.blocking`` for the runner's own calls, an ``InlineExecutor`` as
the loop's default executor for every other ``asyncio.to_thread``. The same
code, the same writes and fsyncs, done at once.

``journal="memory"`` (``fleet simulate --journal memory``) keeps each node's
journal state in memory only: the runner computes and "saves" the same
states (replay and ordering checks keep working) but writes no file. It
saves about a fifth of the simulator's CPU per job; the default keeps the
files, as a real agent does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bus.errors import BusError, ConfigError, FleetError, StepError
from bus.messages import Inventory, Label, LabelValue, Step
from bus.topics import DEFAULT_PREFIX, Topics, check_node_id
from edge_agent import blocking
from edge_agent.config import AgentConfig
from edge_agent.executor import JournalState
from edge_agent.inventory import probe_os
from edge_agent.journal import Journal
from edge_agent.runner import CommandRunner, Publish
from edge_agent.service import Agent, CommandHandler
from edge_agent.settings import ExecutorSettings
from edge_agent.steps.base import StepContext, StepHandler

__all__ = [
    "STEP_TYPES",
    "InlineExecutor",
    "SimulatedWork",
    "SimulationConfig",
    "Simulator",
    "is_ram_backed",
    "node_ids",
    "parse_fail",
    "ram_dir",
]

_LOGGER = logging.getLogger(__name__)

#: Every step type of the wire protocol (the ``type`` tags of ``bus.messages.Step``).
STEP_TYPES: tuple[str, ...] = tuple(
    get_args(cls.model_fields["type"].annotation)[0] for cls in get_args(get_args(Step)[0])
)
#: How long ``stop`` waits for the agents' clean shutdown (offline state, DISCONNECT).
_STOP_TIMEOUT_S = 30.0


def ram_dir() -> Path | None:
    """A RAM-backed directory for temporary state (``/dev/shm``), or None when there is none."""
    shm = Path("/dev/shm")  # noqa: S108 - only the parent of a private mkdtemp directory
    return shm if shm.is_dir() and _is_writable(shm) else None


def _is_writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def is_ram_backed(path: Path, mounts: str | None = None) -> bool:
    """Whether ``path`` (or its nearest existing parent) lies on a tmpfs or ramfs mount.

    ``mounts`` is the text of /proc/self/mounts (read when not given).
    """
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    target = Path(os.path.abspath(path))
    best, best_type = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == Path(point) or Path(point) in target.parents
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type in ("tmpfs", "ramfs")


_P = ParamSpec("_P")
_T = TypeVar("_T")


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """An executor that runs each call at once, in the calling thread (it starts no thread).

    For a process whose blocking calls are all quick (file writes to a
    RAM-backed directory): ``loop.set_default_executor(InlineExecutor())``
    turns ``asyncio.to_thread`` into a direct call, without the thread hand-off.
    (A ThreadPoolExecutor by type only: asyncio accepts no other default executor.)
    """

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Run ``fn`` now; its result or exception is in the returned future."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future


def node_ids(count: int, prefix: str = "sim-", first: int = 0) -> list[str]:
    """The ids of ``count`` simulated nodes: ``sim-0000``, ``sim-0001``, ... (at least 4 digits)."""
    width = max(4, len(str(first + count - 1)))
    return [check_node_id(f"{prefix}{i:0{width}d}") for i in range(first, first + count)]


def parse_fail(values: list[str]) -> dict[str, int]:
    """``NODE`` or ``NODE:STEP`` items as {node: index of the step whose apply fails} (default 0).

    Raises:
        ConfigError: a malformed item (bad node id, step not a non-negative integer).
    """
    failing: dict[str, int] = {}
    for value in values:
        node, sep, step = value.partition(":")
        try:
            check_node_id(node)
        except FleetError as exc:
            raise ConfigError(f"--fail {value!r}: {exc.reason}") from exc
        if not sep:
            failing[node] = 0
        elif step.isdigit():
            failing[node] = int(step)
        else:
            raise ConfigError(f"--fail {value!r}: STEP must be a step index (0, 1, ...)")
    return failing


class SimulationConfig(BaseModel):
    """What ``fleet simulate`` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(description="Broker URL every simulated agent connects to.")
    nodes: int = Field(ge=1, le=10_000, description="How many nodes to simulate.")
    prefix: str = Field(default=DEFAULT_PREFIX, description="Topic prefix shared by the whole fleet.")
    node_prefix: str = Field(default="sim-", description="Node ids are this plus a zero-padded number.")
    first: int = Field(default=0, ge=0, description="Number of the first node (several simulators).")
    trust: list[Path] = Field(
        default_factory=list, description="PEM public keys whose signed commands the nodes run."
    )
    labels: dict[Label, LabelValue] = Field(
        default_factory=dict, description="Labels of every simulated node (each also gets sim=1)."
    )
    heartbeat_s: float = Field(default=5.0, gt=0, le=3600, description="Seconds between heartbeats.")
    keepalive_s: int = Field(default=10, ge=1, le=65535, description="MQTT keepalive of each node.")
    step_ms: float = Field(default=100.0, ge=0, le=3_600_000, description="Duration of every apply/undo.")
    fail: dict[str, int] = Field(
        default_factory=dict, description="Node -> index of the step whose apply fails there."
    )
    state_root: Path | None = Field(
        default=None, description="Parent of the nodes' state dirs (default: a temp dir in /dev/shm)."
    )
    start_batch: int = Field(
        default=100, ge=1, le=10_000, description="Nodes connecting at once while the fleet starts."
    )
    start_timeout_s: float = Field(
        default=120.0, gt=0, description="How long the whole fleet may take to come online."
    )
    threaded_io: bool = Field(
        default=False,
        description="File I/O (journal writes) through worker threads even on a RAM-backed state dir.",
    )
    journal: Literal["file", "memory"] = Field(
        default="file",
        description="file: each node's journal.json, as a real agent keeps it; memory: the same "
        "journal state kept in memory only (no file writes; for the largest simulations).",
    )

    @field_validator("fail")
    @classmethod
    def _valid_fail(cls, value: dict[str, int]) -> dict[str, int]:
        for node, step in value.items():
            check_node_id(node)
            if step < 0:
                raise ValueError(f"fail: step index of {node} must be >= 0")
        return value

    @property
    def node_ids(self) -> list[str]:
        """The simulated nodes' ids, in order."""
        return node_ids(self.nodes, self.node_prefix, self.first)

    def is_ram_backed(self) -> bool:
        """Whether the nodes' state dirs will be RAM-backed (then file I/O may run inline)."""
        if self.state_root is None:
            return ram_dir() is not None
        return is_ram_backed(self.state_root)

    def inline_io(self) -> bool:
        """Whether file I/O runs on the loop itself: RAM-backed state dirs, ``threaded_io`` off."""
        return not self.threaded_io and self.is_ram_backed()


class SimulatedWork:
    """The step handlers of the simulated nodes: apply and undo just take ``step_s``.

    Args:
        step_s: seconds every apply and every undo takes.
        fail: node -> index of the step whose apply fails on that node.
    """

    def __init__(self, step_s: float, fail: Mapping[str, int] | None = None) -> None:
        self.step_s = step_s
        self.fail = dict(fail or {})
        #: Applies that succeeded, applies that failed, undos done (every node together).
        self.applied = 0
        self.failed = 0
        self.undone = 0

    async def apply(self, step: Any, ctx: StepContext) -> dict[str, Any]:
        """Take ``step_s``; fail when this node and step are named in ``fail``."""
        await asyncio.sleep(self.step_s)
        if self.fail.get(ctx.node) == ctx.index:
            self.failed += 1
            raise StepError(f"simulated failure of step {ctx.index} ({step.type})")
        self.applied += 1
        return {"simulated": step.type}

    async def undo(self, _step: Any, _ctx: StepContext, _record: dict[str, Any] | None) -> None:
        """Take ``step_s``."""
        await asyncio.sleep(self.step_s)
        self.undone += 1

    def handlers(self) -> dict[str, StepHandler]:
        """A handler for every step type of the protocol."""
        handler = StepHandler(apply=self.apply, undo=self.undo)
        return dict.fromkeys(STEP_TYPES, handler)


class _MemoryJournal(Journal):
    """The journal state kept in memory only (``journal="memory"``): no file is written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._state = JournalState()

    def load(self) -> JournalState:
        return self._state

    def save(self, state: JournalState) -> None:
        self._state = state

    async def write(self, state: JournalState) -> None:
        self._state = state


class _Once(logging.Filter):
    """Lets each distinct message through once per ``window_s`` (a thousand agents say the same)."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self._window_s = window_s
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        now = time.monotonic()
        last = self._seen.get(text)
        if last is not None and now - last < self._window_s:
            return False
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[text] = now
        return True


class Simulator:
    """Run ``config.nodes`` simulated agents; ``async with Simulator(config) as sim:``.

    Args:
        config: what to simulate.
        clock: wall-clock time of the agents (timestamps, command expiry).
    """

    def __init__(self, config: SimulationConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.work = SimulatedWork(config.step_ms / 1000.0, config.fail)
        self.agents: dict[str, Agent] = {}
        self.state_root: Path | None = None
        #: Seconds the whole fleet took to come online.
        self.start_s = 0.0
        self._clock = clock
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._temporary = False
        self._quiet = _Once()
        unknown = sorted(set(config.fail) - set(config.node_ids))
        if unknown:
            raise ConfigError(f"--fail names nodes that are not simulated: {', '.join(unknown[:5])}")

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    @property
    def node_ids(self) -> list[str]:
        """Every simulated node, in order."""
        return self.config.node_ids

    def ready_count(self) -> int:
        """How many agents are connected and taking commands."""
        return sum(1 for agent in self.agents.values() if agent.ready.is_set())

    async def start(self) -> None:
        """Start every agent, ``start_batch`` at a time, and return once all are online.

        Raises:
            BusError: the fleet was not online within ``start_timeout_s``, or an agent
                stopped while starting (its error is named).
            ConfigError: a trust file cannot be used.
        """
        config = self.config
        self._quiet_logs(True)
        self.state_root = await asyncio.to_thread(self._make_root)
        inventory = Inventory(os=await probe_os(), services={"simulated": "1"})

        async def fixed_inventory() -> Inventory:  # probing the machine once per node is pointless
            return inventory

        labels = {"sim": "1", **config.labels}

        blocking.set_inline(config.inline_io())

        def runner(settings: ExecutorSettings, topics: Topics, publish: Publish) -> CommandHandler:
            journal = (
                _MemoryJournal(settings.journal_path)
                if config.journal == "memory"
                else Journal(settings.journal_path)
            )
            return CommandRunner(
                settings, topics, publish, clock=self._clock, handlers=self.work.handlers(), journal=journal
            )

        started = time.monotonic()
        deadline = started + config.start_timeout_s
        ids = config.node_ids
        try:
            for offset in range(0, len(ids), config.start_batch):
                batch = ids[offset : offset + config.start_batch]
                for node in batch:
                    agent_config = AgentConfig(
                        broker=config.broker,
                        node_id=node,
                        prefix=config.prefix,
                        state_dir=self.state_root / node,
                        scripts_dir=self.state_root / f"{node}-scripts",  # beside its state dir (issue 16)
                        trust=list(config.trust),
                        labels=labels,
                        heartbeat_s=config.heartbeat_s,
                        keepalive_s=config.keepalive_s,
                    )
                    agent = Agent(
                        agent_config, runner_factory=runner, clock=self._clock, inventory=fixed_inventory
                    )
                    self.agents[node] = agent
                    self._tasks[node] = asyncio.create_task(agent.run(self._stop), name=f"sim-{node}")
                await self._wait_ready(batch, deadline)
        except BaseException:
            await self.stop()
            raise
        self.start_s = time.monotonic() - started
        _LOGGER.info("%d simulated nodes online in %.2f s", len(ids), self.start_s)

    async def _wait_ready(self, batch: list[str], deadline: float) -> None:
        waiters = {asyncio.ensure_future(self.agents[node].ready.wait()): node for node in batch}
        tasks = {self._tasks[node]: node for node in batch}
        pending: set[asyncio.Future[Any]] = set(waiters)
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusError(
                        f"{len(self.node_ids) - self.ready_count()} simulated nodes not online within "
                        f"{self.config.start_timeout_s:g} s (broker {self.config.broker})"
                    )
                done, _ = await asyncio.wait(
                    pending | set(tasks), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for future in done:
                    if future in tasks:
                        raise _agent_error(tasks[future], future)  # a run() that ended while starting
                    pending.discard(future)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def stop(self) -> None:
        """Stop every agent cleanly (offline state, DISCONNECT) and remove a temporary state root."""
        self._stop.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
            for task in late:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks.clear()
        if self._temporary and self.state_root is not None:
            await asyncio.to_thread(shutil.rmtree, self.state_root, True)
            self._temporary = False
        self._quiet_logs(False)
        blocking.set_inline(False)

    def _make_root(self) -> Path:
        if self.config.state_root is not None:
            self.config.state_root.mkdir(parents=True, exist_ok=True)
            return self.config.state_root.absolute()
        self._temporary = True
        return Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=ram_dir()))

    def _quiet_logs(self, on: bool) -> None:
        for name in ("edge_agent.config", "edge_agent.service", "bus.mqtt"):
            logger = logging.getLogger(name)
            if on:
                logger.addFilter(self._quiet)
            else:
                logger.removeFilter(self._quiet)


def _agent_error(node: str, task: asyncio.Future[Any]) -> FleetError:
    if task.cancelled():
        return BusError(f"simulated node {node} was cancelled while starting")
    exc = task.exception()
    if isinstance(exc, FleetError):
        return exc
    return BusError(f"simulated node {node} stopped while starting: {exc!r}")
