"""Births, last wills and heartbeats of one agent (DESIGN sections 1, 2 and 3.7).

Every MQTT connection is its own *session*: a fresh uuid chosen just before the
connect, carried by the last will set on that connect and by the birth that
follows it, so a will from an old connection can never mark a newer one
offline (Sparkplug's bdSeq idea). ``Presence`` holds that state and builds the
messages; it does no I/O except ``sample_system``, which reads /proc and
statvfs (call it through asyncio.to_thread).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bus.messages import Heartbeat, Inventory, JobRef, NodeState, new_id
from bus.topics import Topics, check_node_id

__all__ = ["AGENT_VERSION", "Presence", "SystemSample", "parse_meminfo", "sample_system"]

_LOGGER = logging.getLogger(__name__)


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetbus")
    except PackageNotFoundError:
        return "0+unknown"


#: The version of fleetbus this agent runs (reported in every birth).
AGENT_VERSION = _agent_version()


@dataclass(frozen=True)
class SystemSample:
    """Load figures of the node for one heartbeat."""

    load1: float = 0.0
    mem_used_pct: float = 0.0
    disk_free_pct: float = 0.0


def parse_meminfo(text: str) -> float:
    """Percentage of memory in use from /proc/meminfo text (MemTotal - MemAvailable); 0 if unknown."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree"))
    if total <= 0 or available is None:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (total - available) / total))


#: Load and memory are the machine's, not the agent's: read them at most this often
#: per process (a thousand simulated agents in one process, ``fleet simulate``,
#: would otherwise parse /proc/meminfo a thousand times a second).
_MACHINE_TTL_S = 0.25
_machine_cache: dict[Path, tuple[float, float, float]] = {}


def _machine_sample(proc: Path) -> tuple[float, float]:
    """(load1, mem_used_pct), at most ``_MACHINE_TTL_S`` old."""
    now = time.monotonic()
    cached = _machine_cache.get(proc)
    if cached is not None and now - cached[0] < _MACHINE_TTL_S:
        return cached[1], cached[2]
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    try:
        mem = parse_meminfo((proc / "meminfo").read_text(encoding="ascii", errors="replace"))
    except OSError:
        mem = 0.0
    _machine_cache[proc] = (now, load1, mem)
    return load1, mem


def sample_system(state_dir: Path, proc: Path = Path("/proc")) -> SystemSample:
    """Load average, memory use and free space of the state dir's file system.

    Blocking (statvfs can hang on a network file system); call through
    asyncio.to_thread. A figure that cannot be read is reported as 0.
    """
    load1, mem = _machine_sample(proc)
    disk = 0.0
    path = state_dir
    # The state dir may not exist yet: measure the nearest existing parent.
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        st = os.statvfs(path)
        if st.f_blocks:
            disk = 100.0 * st.f_bavail / st.f_blocks
    except OSError:
        pass
    return SystemSample(round(load1, 2), round(mem, 1), round(disk, 1))


class Presence:
    """Session, birth, will, shutdown and heartbeat messages of one agent process.

    Args:
        node: the node id (checked).
        topics: the fleet's topics.
        labels: the node's labels, reported in every birth.
        heartbeat_s: the heartbeat period, reported in every birth.
        started_at: wall-clock time the agent started.
        agent_version: reported in every birth.
    """

    def __init__(
        self,
        node: str,
        topics: Topics,
        *,
        labels: dict[str, str] | None = None,
        heartbeat_s: float | None = None,
        started_at: float = 0.0,
        agent_version: str = AGENT_VERSION,
    ) -> None:
        self.node = check_node_id(node)
        self.topics = topics
        self.labels = dict(labels or {})
        self.heartbeat_s = heartbeat_s
        self.started_at = started_at
        self.agent_version = agent_version
        self._session = new_id()
        self._seq = 0

    @property
    def session(self) -> str:
        """The session of the current (or next) connection."""
        return self._session

    @property
    def state_topic(self) -> str:
        """Retained birth/will topic of this node."""
        return self.topics.node(self.node, "state")

    @property
    def heartbeat_topic(self) -> str:
        """Heartbeat topic of this node."""
        return self.topics.node(self.node, "heartbeat")

    @property
    def cmd_topic(self) -> str:
        """The only topic this node takes commands from."""
        return self.topics.node(self.node, "cmd")

    def new_session(self) -> str:
        """Start a new session (call right before each connect attempt) and return it."""
        self._session = new_id()
        return self._session

    def will(self) -> NodeState:
        """The last will of the current session: offline, reason ``lost``."""
        return self._state("offline", "lost", Inventory())

    def birth(self, inventory: Inventory) -> NodeState:
        """The birth of the current session: online, labels and inventory."""
        return self._state("online", "birth", inventory)

    def shutdown(self) -> NodeState:
        """What a clean stop publishes: offline, reason ``shutdown``, the current session."""
        return self._state("offline", "shutdown", Inventory())

    def heartbeat(
        self, *, now: float, uptime_s: float, sample: SystemSample, job: JobRef | None
    ) -> Heartbeat:
        """The next heartbeat (``seq`` counts up over the whole process life)."""
        beat = Heartbeat(
            node=self.node,
            session=self._session,
            seq=self._seq,
            ts=round(now, 3),
            uptime_s=round(uptime_s, 1),
            load1=sample.load1,
            mem_used_pct=sample.mem_used_pct,
            disk_free_pct=sample.disk_free_pct,
            job=job,
        )
        self._seq += 1
        return beat

    def _state(
        self,
        state: Literal["online", "offline"],
        reason: Literal["birth", "shutdown", "lost"],
        inventory: Inventory,
    ) -> NodeState:
        return NodeState(
            node=self.node,
            state=state,
            session=self._session,
            reason=reason,
            agent_version=self.agent_version,
            started_at=self.started_at,
            labels=self.labels,
            inventory=inventory,
            heartbeat_s=self.heartbeat_s,
        )
