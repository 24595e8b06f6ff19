"""The TUI's view of the fleet: a pure model fed by bus messages, unit-testable.

``FleetModel.apply(update, now)`` folds one parsed bus message (DESIGN section 2)
into per-node and per-rollout views and returns a ``Changes`` record naming what
moved, so widgets update only those cells. ``now`` is the local clock at receipt:
heartbeat ages are measured on this machine's clock, never against an agent's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from pydantic import ValidationError

from bus.messages import (
    PLAN_PREFIX,
    Event,
    Heartbeat,
    HubState,
    Inventory,
    JobRef,
    JobSnapshot,
    LogLine,
    NodeState,
    NodeSummary,
    RolloutNodes,
    RolloutSummary,
    StepStatus,
)

__all__ = [
    "SORT_COLUMNS",
    "AuditEntry",
    "BusUpdate",
    "Changes",
    "Cleared",
    "FleetModel",
    "JobView",
    "NodeFilter",
    "NodeView",
    "Presence",
    "RolloutView",
    "StepCell",
    "parse_filter",
    "versions_text",
]

_LOGGER = logging.getLogger(__name__)

#: Heartbeat period assumed for nodes that do not announce theirs (NodeState.heartbeat_s).
DEFAULT_HEARTBEAT_S = 5.0
#: A node is "stale" after this many missed heartbeats (DESIGN section 3.7).
MISSED_HEARTBEATS = 3
LOG_LINES = 200
LOAD_SAMPLES = 60
RECENT_JOBS = 10
EVENTS = 100

Presence = Literal["online", "stale", "offline"]
SortColumn = Literal["node", "state", "seen", "load", "mem", "disk", "job"]
#: The columns `s` cycles through on the fleet screen, in order.
SORT_COLUMNS: tuple[SortColumn, ...] = ("node", "state", "seen", "load", "mem", "disk", "job")


#: Node phases after which a node has nothing left to do in its rollout.
_FINISHED_PHASES = frozenset(
    {"succeeded", "failed", "rolled_back", "rollback_failed", "rejected", "timed_out", "not_started"}
)


@dataclass(frozen=True)
class Cleared:
    """An empty retained payload: the topic's node or rollout was removed."""

    kind: Literal["node", "rollout"]
    key: str


BusUpdate: TypeAlias = (
    NodeState
    | Heartbeat
    | StepStatus
    | JobSnapshot
    | LogLine
    | HubState
    | RolloutSummary
    | RolloutNodes
    | Event
    | Cleared
)


@dataclass
class Changes:
    """What one or more updates changed; widgets refresh only these."""

    nodes: set[str] = field(default_factory=set)
    added_nodes: set[str] = field(default_factory=set)
    removed_nodes: set[str] = field(default_factory=set)
    rollouts: set[str] = field(default_factory=set)
    removed_rollouts: set[str] = field(default_factory=set)
    logs: set[str] = field(default_factory=set)
    hub: bool = False
    events: list[Event] = field(default_factory=list)

    def merge(self, other: Changes) -> None:
        """Add ``other``'s changes to these."""
        self.nodes |= other.nodes
        self.added_nodes |= other.added_nodes
        self.removed_nodes |= other.removed_nodes
        self.rollouts |= other.rollouts
        self.removed_rollouts |= other.removed_rollouts
        self.logs |= other.logs
        self.hub = self.hub or other.hub
        self.events.extend(other.events)

    def __bool__(self) -> bool:
        return bool(
            self.nodes
            or self.added_nodes
            or self.removed_nodes
            or self.rollouts
            or self.removed_rollouts
            or self.logs
            or self.hub
            or self.events
        )


@dataclass
class JobView:
    """One job (command) a node ran or runs, newest state."""

    command: str
    rollout: str
    action: str
    phase: str
    updated_at: float
    steps: dict[int, StepCell] = field(default_factory=dict)


@dataclass(frozen=True)
class StepCell:
    """One step of one node in a rollout's grid."""

    type: str
    state: str
    detail: str = ""


@dataclass
class NodeView:
    """Everything the TUI knows about one node."""

    node: str
    state: Literal["online", "offline"] = "offline"
    reason: str = ""
    session: str = ""
    agent_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    inventory: Inventory = field(default_factory=Inventory)
    heartbeat_s: float | None = None
    seen_at: float | None = None
    load1: float | None = None
    mem_used_pct: float | None = None
    disk_free_pct: float | None = None
    uptime_s: float | None = None
    job: JobRef | None = None
    loads: deque[float] = field(default_factory=lambda: deque(maxlen=LOAD_SAMPLES))
    jobs: OrderedDict[str, JobView] = field(default_factory=OrderedDict)
    log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    log_total: int = 0

    def presence(self, now: float) -> Presence:
        """online, stale (missed heartbeats) or offline, as of ``now``."""
        if self.state != "online":
            return "offline"
        if self.seen_at is None:
            return "online"
        period = self.heartbeat_s or DEFAULT_HEARTBEAT_S
        return "stale" if now - self.seen_at > MISSED_HEARTBEATS * period else "online"

    def age(self, now: float) -> float | None:
        """Seconds since the last message from the node (local clock), or None."""
        return None if self.seen_at is None else max(0.0, now - self.seen_at)

    @property
    def latest_job(self) -> JobView | None:
        """The most recently updated job, if any."""
        return next(reversed(self.jobs.values()), None)


@dataclass(frozen=True)
class AuditEntry:
    """One line of a rollout's audit trail (from the hub's ``show`` reply)."""

    ts: float
    message: str
    evidence: Any = None


@dataclass
class RolloutView:
    """A rollout: the hub's summary plus per-node step states from the agents."""

    id: str
    summary: RolloutSummary | None = None
    steps: dict[str, dict[int, StepCell]] = field(default_factory=dict)
    step_types: dict[int, str] = field(default_factory=dict)
    audit: list[AuditEntry] | None = None
    #: per-node changes (``RolloutNodes``) heard before any summary
    early_nodes: dict[str, NodeSummary] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The rollout's name, or its id before the summary arrived."""
        return self.summary.name if self.summary else self.id

    @property
    def step_count(self) -> int:
        """Number of plan steps known from the plan, snapshots and status reports."""
        indexes = set(self.step_types)
        for cells in self.steps.values():
            indexes.update(cells)
        return max(indexes) + 1 if indexes else 0

    @property
    def node_ids(self) -> list[str]:
        """Target nodes: the summary's, then any node that reported steps, sorted."""
        nodes = set(self.summary.nodes) if self.summary else set()
        nodes.update(self.steps)
        return sorted(nodes)

    def progress(self) -> tuple[int, int]:
        """(finished nodes, target nodes), from the nodes' phases.

        Not from the counts: they overlap (a failed node that was restored is in
        both ``failed`` and ``rolled_back``).
        """
        if self.summary is None:
            return 0, 0
        phases = [node.phase for node in self.summary.nodes.values()]
        return sum(phase in _FINISHED_PHASES for phase in phases), len(phases)

    def node_line(self, node: str) -> str:
        """One line on a node's steps, 1-based: its failed step and reason, else its latest step."""
        cells = self.steps.get(node, {})
        summary = self.summary.nodes.get(node) if self.summary else None
        failed = [i for i, c in sorted(cells.items()) if c.state in ("failed", "rejected")]
        heard = [i for i, c in sorted(cells.items()) if c.state != "pending"]
        index = failed[0] if failed else (heard[-1] if heard else None)
        if index is None:
            phase = summary.phase if summary else "no step reported"
            reason = _last_line(summary.detail) if summary and summary.detail else ""
            return f"{node}: {phase}" + (f": {reason}" if reason else "")
        cell = cells[index]
        kind = cell.type or self.step_types.get(index, "step")
        reason = _last_line(cell.detail) or (_last_line(summary.detail) if failed and summary else "")
        return f"{node}: step {index + 1} ({kind}) {cell.state.replace('_', ' ')}" + (
            f": {reason}" if reason else ""
        )

    def cell(self, node: str, index: int) -> StepCell:
        """The state of step ``index`` on ``node`` (pending when nothing was heard)."""
        known = self.steps.get(node, {}).get(index)
        if known is not None:
            return known
        return StepCell(self.step_types.get(index, ""), "pending")


@dataclass(frozen=True)
class NodeFilter:
    """A parsed filter: every word must match; ``key=value`` words match labels exactly."""

    words: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.words or self.labels)


def parse_filter(text: str) -> NodeFilter:
    """Split the filter box's text into words and ``key=value`` label terms."""
    words: list[str] = []
    labels: list[tuple[str, str]] = []
    for token in text.split()[:32]:
        key, sep, value = token.partition("=")
        if sep and key:
            labels.append((key, value))
        else:
            words.append(token.lower())
    return NodeFilter(tuple(words), tuple(labels))


def versions_text(inventory: Inventory) -> str:
    """Every reported version as ``name=version`` words: services, packages, drivers.

    A version its health check contradicts says so: ``demo-app=1.0(health-saw:2.0)``.
    """
    parts: list[str] = []
    saw = inventory.health_saw
    for group in (inventory.services, inventory.packages, inventory.drivers):
        parts.extend(
            f"{name}={version}" + (f"(health-saw:{saw[name]})" if name in saw else "")
            for name, version in sorted(group.items())
        )
    return " ".join(parts)


def _last_line(text: str) -> str:
    """The last non-blank line of a step's output (the meaningful one: the final error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _merge_cell(cells: dict[int, StepCell], index: int, cell: StepCell) -> bool:
    """Set a step's cell; a pending report never hides a known state. True when it changed."""
    old = cells.get(index)
    if cell.state == "pending" and old is not None:
        return False
    if not cell.type and old is not None:
        cell = StepCell(old.type, cell.state, cell.detail)
    if old == cell:
        return False
    cells[index] = cell
    return True


def _fold_recorded_steps(view: RolloutView, steps: Any) -> None:
    """The hub's record of every node's steps (``show`` reply, ``steps`` field) into the grid.

    Shape: ``{node: [{"index": 0-based, "type", "state", "detail"}, ...]}``. A
    recorded state replaces what live reports said, except that a recorded
    "pending" never hides a state already heard (the record may lag a live report).
    """
    if not isinstance(steps, Mapping):
        return
    for node, cells in steps.items():
        if not isinstance(node, str) or not isinstance(cells, list):
            continue
        known = view.steps.setdefault(node, {})
        for item in cells:
            if not isinstance(item, Mapping):
                continue
            index, state = item.get("index"), item.get("state")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1000:
                continue
            if not isinstance(state, str) or not state:
                continue
            kind = item.get("type") if isinstance(item.get("type"), str) else ""
            detail = item.get("detail") if isinstance(item.get("detail"), str) else ""
            if kind:
                view.step_types.setdefault(index, str(kind))
            _merge_cell(known, index, StepCell(str(kind), state, str(detail)))


class FleetModel:
    """Nodes, rollouts, hub presence and the event feed, folded from bus messages."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.rollouts: dict[str, RolloutView] = {}
        self.hub: HubState | None = None
        self.events: deque[Event] = deque(maxlen=EVENTS)
        #: Grows whenever a node's reported versions or the set of nodes may have changed
        #: (births, removals), so views derived from versions are recomputed only then.
        self.versions_epoch = 0

    # ------------------------------------------------------------------ folding

    def apply_all(self, updates: Iterable[BusUpdate], now: float) -> Changes:
        """Apply updates in order; the union of their changes."""
        changes = Changes()
        for update in updates:
            changes.merge(self.apply(update, now))
        return changes

    def apply(self, update: BusUpdate, now: float) -> Changes:
        """Fold one bus message received at local time ``now`` into the model."""
        if isinstance(update, NodeState):
            return self._node_state(update, now)
        if isinstance(update, Heartbeat):
            return self._heartbeat(update, now)
        if isinstance(update, StepStatus):
            return self._step_status(update)
        if isinstance(update, JobSnapshot):
            return self._job_snapshot(update)
        if isinstance(update, LogLine):
            return self._log_line(update)
        if isinstance(update, RolloutSummary):
            return self._rollout_summary(update)
        if isinstance(update, RolloutNodes):
            return self._rollout_nodes(update)
        if isinstance(update, HubState):
            self.hub = update
            return Changes(hub=True)
        if isinstance(update, Event):
            self.events.append(update)
            return Changes(events=[update])
        return self._cleared(update)

    def _rollout_summary(self, update: RolloutSummary) -> Changes:
        """A summary; a bounded one (``nodes_total``) adds its nodes to the table known so far."""
        view = self._rollout(update.id)
        if update.nodes_total is not None:
            known = view.summary.nodes if view.summary is not None else view.early_nodes
            update = update.model_copy(update={"nodes": {**known, **update.nodes}})
        view.summary = update
        view.early_nodes = {}
        return Changes(rollouts={update.id})

    def _rollout_nodes(self, update: RolloutNodes) -> Changes:
        """Per-node changes of a rollout: folded into its node table."""
        view = self._rollout(update.rollout)
        if view.summary is None:
            view.early_nodes.update(update.nodes)
            return Changes()
        view.summary = view.summary.model_copy(update={"nodes": {**view.summary.nodes, **update.nodes}})
        return Changes(rollouts={update.rollout})

    def _node(self, node: str, changes: Changes) -> NodeView:
        view = self.nodes.get(node)
        if view is None:
            view = self.nodes[node] = NodeView(node)
            changes.added_nodes.add(node)
        changes.nodes.add(node)
        return view

    def _rollout(self, rollout: str) -> RolloutView:
        view = self.rollouts.get(rollout)
        if view is None:
            view = self.rollouts[rollout] = RolloutView(rollout)
        return view

    def _node_state(self, state: NodeState, now: float) -> Changes:
        known = self.nodes.get(state.node)
        if (
            known is not None
            and state.state == "offline"
            and known.session
            and state.session != known.session
        ):
            # A will from an older connection never marks a newer one offline (DESIGN section 2).
            return Changes()
        changes = Changes()
        view = self._node(state.node, changes)
        view.state = state.state
        view.reason = state.reason
        view.session = state.session
        view.labels = dict(state.labels)
        if view.inventory != state.inventory or view.agent_version != state.agent_version:
            self.versions_epoch += 1
        view.inventory = state.inventory
        view.agent_version = state.agent_version
        view.heartbeat_s = state.heartbeat_s
        if state.state == "online":
            view.seen_at = now
        else:
            view.job = None
        return changes

    def _heartbeat(self, beat: Heartbeat, now: float) -> Changes:
        changes = Changes()
        view = self._node(beat.node, changes)
        if view.session != beat.session:
            # A heartbeat of a session we have no birth for: the node is up all the same.
            view.session = beat.session
            view.state = "online"
        elif view.state != "online":
            view.state = "online"
        view.seen_at = now
        view.load1 = beat.load1
        view.mem_used_pct = beat.mem_used_pct
        view.disk_free_pct = beat.disk_free_pct
        view.uptime_s = beat.uptime_s
        view.job = beat.job
        view.loads.append(beat.load1)
        return changes

    def _job(self, view: NodeView, command: str, rollout: str, action: str, phase: str, ts: float) -> JobView:
        job = view.jobs.get(command)
        if job is None:
            job = view.jobs[command] = JobView(command, rollout, action, phase, ts)
            while len(view.jobs) > RECENT_JOBS:
                view.jobs.popitem(last=False)
        else:
            view.jobs.move_to_end(command)
        return job

    def _step_status(self, status: StepStatus) -> Changes:
        changes = Changes()
        if status.rollout.startswith(PLAN_PREFIX):
            return changes  # a plan's pre-flight report: no rollout, no job
        view = self._node(status.node, changes)
        job = self._job(view, status.command, status.rollout, "apply", "applying", status.ts)
        job.updated_at = max(job.updated_at, status.ts)
        if status.index < 0:
            # A command-level report (e.g. rejected before any step ran).
            if status.state in ("rejected", "failed"):
                job.phase = status.state
            return changes
        cell = StepCell(status.type, status.state, status.detail)
        _merge_cell(job.steps, status.index, cell)
        if status.state == "failed":
            job.phase = "failed"
        elif status.state == "rolled_back":
            job.phase = "rolling_back"
        rollout = self._rollout(status.rollout)
        if status.type:
            rollout.step_types.setdefault(status.index, status.type)
        if _merge_cell(rollout.steps.setdefault(status.node, {}), status.index, cell):
            changes.rollouts.add(status.rollout)
        return changes

    def _job_snapshot(self, snap: JobSnapshot) -> Changes:
        changes = Changes()
        view = self._node(snap.node, changes)
        job = self._job(view, snap.id, snap.rollout, snap.action, snap.phase, snap.updated_at)
        job.phase = snap.phase
        job.action = snap.action
        job.updated_at = max(job.updated_at, snap.updated_at)
        rollout = self._rollout(snap.rollout)
        cells = rollout.steps.setdefault(snap.node, {})
        for step in snap.steps:
            cell = StepCell(step.type, step.state, step.detail)
            _merge_cell(job.steps, step.index, cell)
            if step.type:
                rollout.step_types.setdefault(step.index, step.type)
            if _merge_cell(cells, step.index, cell):
                changes.rollouts.add(snap.rollout)
        return changes

    def _log_line(self, line: LogLine) -> Changes:
        changes = Changes()
        view = self._node(line.node, changes)
        changes.nodes.discard(line.node)  # a log line changes no table cell
        view.log.append(line)
        view.log_total += 1
        changes.logs.add(line.node)
        return changes

    def _cleared(self, cleared: Cleared) -> Changes:
        if cleared.kind == "node":
            if self.nodes.pop(cleared.key, None) is None:
                return Changes()
            self.versions_epoch += 1
            return Changes(removed_nodes={cleared.key})
        if self.rollouts.pop(cleared.key, None) is None:
            return Changes()
        return Changes(removed_rollouts={cleared.key})

    def set_detail(self, rollout: str, body: Mapping[str, Any]) -> Changes:
        """Fold the hub's ``show`` reply (summary, audit, recorded steps, maybe the plan) into a rollout."""
        view = self._rollout(rollout)
        try:
            view.summary = RolloutSummary.model_validate(body)
        except ValidationError as exc:
            _LOGGER.debug("show reply for %s has no valid summary: %s", rollout, exc)
        audit: list[AuditEntry] = []
        raw_audit = body.get("audit")
        for item in raw_audit if isinstance(raw_audit, list) else []:
            if isinstance(item, Mapping):
                ts = item.get("ts")
                audit.append(
                    AuditEntry(
                        float(ts) if isinstance(ts, int | float) else 0.0,
                        str(item.get("message", "")),
                        item.get("evidence"),
                    )
                )
        view.audit = audit
        _fold_recorded_steps(view, body.get("steps"))
        plan = body.get("plan")
        if isinstance(plan, list):
            for index, step in enumerate(plan):
                if isinstance(step, Mapping) and isinstance(step.get("type"), str):
                    view.step_types[index] = step["type"]
        return Changes(rollouts={rollout})

    # ------------------------------------------------------------------ queries

    def job_label(self, view: NodeView) -> str:
        """The node's current job in words: rollout name and step, or its last job's phase."""
        if view.job is not None:
            rollout = self.rollouts.get(view.job.rollout)
            name = rollout.name if rollout else view.job.rollout[:8]
            step = "" if view.job.step is None else f" step {view.job.step + 1}"
            return f"{name}{step}"
        latest = view.latest_job
        if latest is None:
            return ""
        rollout = self.rollouts.get(latest.rollout)
        name = rollout.name if rollout else latest.rollout[:8]
        return f"{name} {latest.phase}"

    def matches(self, view: NodeView, wanted: NodeFilter) -> bool:
        """Whether a node passes the filter (words match id, labels, versions, job)."""
        for key, value in wanted.labels:
            if view.labels.get(key) != value:
                return False
        if not wanted.words:
            return True
        haystack = " ".join(
            [
                view.node,
                view.state,
                " ".join(f"{k}={v}" for k, v in view.labels.items()),
                versions_text(view.inventory),
                self.job_label(view),
            ]
        ).lower()
        return all(word in haystack for word in wanted.words)

    def sort_key(self, view: NodeView, column: SortColumn, now: float) -> tuple[Any, ...]:
        """A key ordering nodes by ``column`` (ties by node id); unknown values sort last."""
        missing = float("inf")
        if column == "state":
            rank = {"offline": 0, "stale": 1, "online": 2}[view.presence(now)]
            return (rank, view.node)
        if column == "seen":
            age = view.age(now)
            return (missing if age is None else age, view.node)
        if column == "load":
            return (-(view.load1 if view.load1 is not None else -missing), view.node)
        if column == "mem":
            return (-(view.mem_used_pct if view.mem_used_pct is not None else -missing), view.node)
        if column == "disk":
            return (view.disk_free_pct if view.disk_free_pct is not None else missing, view.node)
        if column == "job":
            label = self.job_label(view)
            return (label == "", label, view.node)
        return (view.node,)

    def rollouts_newest_first(self) -> list[RolloutView]:
        """Rollouts that have a summary, newest first."""
        known = [r for r in self.rollouts.values() if r.summary is not None]
        return sorted(known, key=lambda r: (-(r.summary.created_at if r.summary else 0.0), r.id))
