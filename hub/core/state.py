"""A rollout's state as the engine keeps it: rollouts, their nodes, each node's stage, the record.

A node's part of a rollout (``Node``) is persisted field by field; its
*stage* (``NodeStage``) is what its fields say about its lifecycle, read in
one place (``stage_of``), and the moves a stage may make are one table
(``TRANSITIONS``): the engine checks every move of a node against it.
``encode_record``/``decode_record`` are the store's codec.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from bus.errors import InvalidInput
from bus.messages import NodePhase, RolloutSpec, Step, describe
from hub.core.windows import Schedule

__all__ = [
    "FINAL_STATES",
    "NODE_FIELDS",
    "RECORD_VERSION",
    "STALE_RECORD",
    "STALE_ROW",
    "STATES",
    "TRANSITIONS",
    "CommandAction",
    "DeadlineKind",
    "Node",
    "NodeStage",
    "Restore",
    "Rollout",
    "all_nodes",
    "check_record",
    "decode_record",
    "encode_record",
    "filled_plan",
    "is_allowed",
    "not_waiting",
    "stage_of",
    "wave_done",
]

#: States in which a rollout takes no decision of its own any more.
FINAL_STATES = frozenset({"succeeded", "halted", "rolled_back", "rollback_failed", "aborted"})
STATES = FINAL_STATES | {"pending", "running", "paused", "rolling_back", "aborting"}
RECORD_VERSION = 1

Restore = Literal["waiting", "restored", "unrestored"]
DeadlineKind = Literal["node", "expiry", "restore", "defer", "start"]
CommandAction = Literal["apply", "rollback", "abort"]


#: ``Node.stale`` bits: which views of a node are older than its fields.
STALE_RECORD = 1  # its entry in the encoded record (``RecordEncoder``)
STALE_ROW = 2  # its summary row (``RolloutEngine.summary_rows``)
_STALE_ALL = STALE_RECORD | STALE_ROW
_set = object.__setattr__


@dataclass(slots=True)  # a thousand per rollout, every rollout kept: no __dict__ each
class Node:
    """One target's part of a rollout (persisted field by field).

    Every assignment to a field marks the node ``stale``, so the views made of
    it each round (its record entry, its summary row) are made again only for
    the nodes that changed: 10,000 nodes a round, a few hundred changed. A
    field is therefore assigned, never changed in place (``grid`` included).
    """

    name: str
    wave: int
    phase: NodePhase = "pending"
    step: int | None = None
    detail: str = ""
    touched: bool = False  # it may have changed something: it started, or got its apply while online
    applied: bool = False  # its apply succeeded
    failed: bool = False  # counts against failure.max_failed
    restore: Restore | None = None
    queued: bool = False  # its apply waits on the broker for an offline node
    withdrawn: bool = False  # its queued apply was cleared before it started
    cleared: bool = False  # the retained command is gone (or was replaced by another rollout)
    apply_id: str | None = None
    command_id: str | None = None
    action: CommandAction | None = None
    issued_at: float | None = None
    expires_at: float | None = None
    deadline: float | None = None
    deadline_kind: DeadlineKind | None = None
    done_at: float | None = None
    tz: str | None = None  # its time zone for maintenance windows (the tz label when created)
    window_seen: bool = False  # its window was open while its wave waited to send it (finish mode)
    grid: list[list[str]] = field(default_factory=list)  # per plan step: [state, detail] ([] = all pending)
    offline_since: float | None = None  # went offline while the hub waited for it (lost, or a restore)
    lost_from: NodePhase | None = None  # its phase before it was lost (applying, or succeeded in soak)
    stale: int = field(default=_STALE_ALL, repr=False, compare=False)  # not persisted: see above

    def __setattr__(self, name: str, value: Any) -> None:
        _set(self, name, value)
        _set(self, "stale", _STALE_ALL)

    def fresh(self, view: int) -> None:
        """The ``view`` (a ``STALE_*`` bit) of this node was just made from its fields."""
        _set(self, "stale", self.stale & ~view)

    @property
    def is_open(self) -> bool:
        """An apply in flight or a restore the hub waits for."""
        return self.queued or self.phase in ("applying", "deferred", "lost") or self.restore == "waiting"


NODE_FIELDS = tuple(f.name for f in dataclasses.fields(Node) if f.name != "stale")


@dataclass
class Rollout:
    """One rollout: its spec, waves and nodes (``encode_record`` persists it)."""

    id: str
    spec: RolloutSpec
    plan: list[Step]
    state: str
    created_at: float
    updated_at: float
    waves: list[list[str]]
    nodes: dict[str, Node]
    wave: int = 0
    wave_done_at: float | None = None
    detail: str = ""
    failures: list[str] = field(default_factory=list)
    hold_until: float = 0.0  # after a restart: no time-driven decision before this
    reason: str = ""  # why its rollback started (the detail while it waits for nobody)
    outage_since: float | None = None  # a broker or network event: no new commands (not persisted)
    outage_note: str = ""
    # Not persisted; they only spare the hot path from rescanning every node per event.
    names: list[str] = field(init=False, repr=False)  # the nodes, in order
    dispatched: int = -1  # every node of this wave has its command (or failed): nothing to send
    cursors: dict[str, int] = field(default_factory=dict, repr=False)  # see all_nodes
    schedule: Schedule | None = field(default=None, repr=False)  # compiled spec.windows
    window_at: float | None = None  # when a window opens for a node that waits for one
    window_note: str = ""  # the last window audit (said once)

    def __post_init__(self) -> None:
        self.names = list(self.nodes)

    @property
    def is_final(self) -> bool:
        """The rollout takes no decision of its own any more."""
        return self.state in FINAL_STATES


class NodeStage(enum.Enum):
    """Where a node is in its rollout (``stage_of`` reads it from the node's fields)."""

    PENDING = "pending"  # no apply sent yet (its wave has not come, or a window is closed)
    QUEUED = "queued"  # its apply waits retained on the broker: the node is offline
    WITHDRAWN = "withdrawn"  # its queued apply was cleared before it started
    DEFERRED = "deferred"  # its update lock holds the apply back (edge_agent.deferral)
    APPLYING = "applying"  # the apply is in flight
    LOST = "lost"  # offline mid-job (or while soaking) for less than offline_grace_s
    SUCCEEDED = "succeeded"  # its apply succeeded
    NOT_STARTED = "not_started"  # it gave up waiting, or never started in time: final, not a failure
    FAILED = "failed"  # failed with no restore awaited (expired before it started; lost while soaking)
    RESTORING = "restoring"  # an abort or rollback (or its own restore after a failure) is awaited
    RESTORED = "restored"  # restored and verified
    UNRESTORED = "unrestored"  # its restore failed or never came


_S = NodeStage
#: The moves a node may make (staying is always allowed and not listed). A move missing here is
#: a bug in the engine: a strict engine raises it, the hub audits it (``stage_unexpected``).
TRANSITIONS: Mapping[NodeStage, frozenset[NodeStage]] = {
    _S.PENDING: frozenset({_S.QUEUED, _S.APPLYING}),
    # Its reports may overtake its presence: deferred, done or failed before it is seen online.
    _S.QUEUED: frozenset(
        {
            _S.APPLYING,
            _S.WITHDRAWN,
            _S.DEFERRED,
            _S.SUCCEEDED,
            _S.NOT_STARTED,
            _S.FAILED,
            _S.RESTORING,
            _S.RESTORED,
        }
    ),
    _S.WITHDRAWN: frozenset({_S.RESTORING}),  # it started after all: an abort
    _S.DEFERRED: frozenset({_S.APPLYING, _S.SUCCEEDED, _S.NOT_STARTED, _S.RESTORING}),
    _S.APPLYING: frozenset({_S.DEFERRED, _S.LOST, _S.SUCCEEDED, _S.NOT_STARTED, _S.RESTORING, _S.RESTORED}),
    _S.LOST: frozenset({_S.APPLYING, _S.SUCCEEDED, _S.FAILED, _S.RESTORING}),  # back, or gone too long
    _S.SUCCEEDED: frozenset({_S.LOST, _S.RESTORING}),  # lost while soaking; rolled back
    _S.NOT_STARTED: frozenset({_S.RESTORING}),  # it started after all: an abort
    _S.FAILED: frozenset({_S.RESTORING}),  # failed with nothing awaited (lost while soaking): rolled back
    _S.RESTORING: frozenset({_S.RESTORED, _S.UNRESTORED}),
    _S.RESTORED: frozenset(),
    _S.UNRESTORED: frozenset({_S.RESTORED, _S.RESTORING}),  # restored late; a rollback retried
}


def stage_of(n: Node) -> NodeStage:
    """The node's stage, from its fields (the one place they are read as a lifecycle)."""
    if n.restore is not None:
        return {"waiting": _S.RESTORING, "restored": _S.RESTORED, "unrestored": _S.UNRESTORED}[n.restore]
    if n.phase == "lost":
        return _S.LOST
    if n.failed:
        return _S.FAILED
    if n.applied:
        return _S.SUCCEEDED
    if n.phase == "not_started":
        return _S.NOT_STARTED
    if n.queued:
        return _S.QUEUED
    if n.withdrawn:
        return _S.WITHDRAWN
    if n.phase == "deferred":
        return _S.DEFERRED
    return _S.APPLYING if n.phase == "applying" else _S.PENDING


def is_allowed(before: NodeStage, after: NodeStage) -> bool:
    """Whether a node may move from ``before`` to ``after`` (staying is always allowed)."""
    return before is after or after in TRANSITIONS[before]


def all_nodes(r: Rollout, key: str, names: Sequence[str], holds: Callable[[Node], bool]) -> bool:
    """Whether ``holds`` is true of every node in ``names``, in amortised O(1) per call.

    A cursor per ``key`` remembers how far ``holds`` was true, so while the
    nodes of a rollout turn done one report at a time each call only looks
    at the nodes not yet seen done. The answer "all" is only given after a
    full check, so a node that stops holding (a retried restore) is never
    missed; the cursor then starts over.
    """
    nodes = r.nodes
    index = r.cursors.get(key, 0)
    while index < len(names) and holds(nodes[names[index]]):
        index += 1
    if index < len(names):
        r.cursors[key] = index
        return False
    if all(holds(nodes[name]) for name in names):
        r.cursors[key] = index
        return True
    r.cursors[key] = 0
    return False


def wave_done(n: Node) -> bool:
    """Its part of its wave is over: applied, failed or not started, and nothing in flight."""
    done = n.applied or n.failed or n.phase == "not_started"
    return done and not n.queued and n.phase not in ("applying", "lost")


def not_waiting(n: Node) -> bool:
    """No restore of it is awaited."""
    return n.restore != "waiting"


def filled_plan(spec: RolloutSpec) -> list[Step]:
    """The plan with every missing step timeout set to the rollout's ``step_timeout_s``."""
    return [
        step if step.timeout_s is not None else step.model_copy(update={"timeout_s": spec.step_timeout_s})
        for step in spec.plan
    ]


def encode_record(r: Rollout, *, nodes: bool = True) -> dict[str, Any]:
    """The JSON-able record of a rollout that the store keeps (``decode_record`` reads it).

    ``nodes=False``: without the ``nodes`` key (``RecordEncoder`` adds them).
    """
    record = {
        "v": RECORD_VERSION,
        "id": r.id,
        "spec": r.spec.model_dump(mode="json"),
        "state": r.state,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "waves": [list(w) for w in r.waves],
        "wave": r.wave,
        "wave_done_at": r.wave_done_at,
        "detail": r.detail,
        "failures": list(r.failures),
        "reason": r.reason,
    }
    if nodes:
        # (The grid is copied: the store may encode the record while the engine goes on.)
        record["nodes"] = {
            name: {
                f: ([list(c) for c in node.grid] if f == "grid" else getattr(node, f)) for f in NODE_FIELDS
            }
            for name, node in r.nodes.items()
        }
    return record


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_node_values = operator.attrgetter(*NODE_FIELDS)


@dataclass(frozen=True)
class EncodedRecord:
    """A rollout's record as JSON: ``head`` without its nodes, then each node's entry.

    ``nodes`` maps a node to its ``"name":{...}`` text, in the rollout's order;
    ``text`` is the whole record, equal to ``encode_record`` as JSON.
    """

    head: dict[str, Any]
    nodes: dict[str, str]

    @functools.cached_property
    def text(self) -> str:
        """The whole record (the document the store keeps; the standby's when it fits one payload)."""
        return _json(self.head)[:-1] + ',"nodes":{' + ",".join(self.nodes.values()) + "}}"


class RecordEncoder:
    """Rollout records as JSON, node by node: a node's entry is encoded again only when it changed.

    At 10,000 nodes a record is about 5 MB of JSON and the hub writes it every
    summary round (the store, a standby's retained parts); most nodes did not
    change since the round before. A node whose fields were assigned since its
    entry was made (``Node.stale``) is encoded again; the others keep theirs.
    """

    def __init__(self) -> None:
        # rollout -> node -> (the Node the text is of, its "name":{...} text)
        self._cache: dict[str, dict[str, tuple[Node, str]]] = {}

    def encode(self, r: Rollout) -> EncodedRecord:
        """The record of ``r`` now."""
        cache = self._cache.setdefault(r.id, {})
        nodes: dict[str, str] = {}
        for name, node in r.nodes.items():
            hit = cache.get(name)
            if hit is None or hit[0] is not node or node.stale & STALE_RECORD:
                values = _node_values(node)
                doc = dict(zip(NODE_FIELDS, values, strict=True))
                doc["grid"] = [list(cell) for cell in node.grid]
                hit = (node, f"{_json(name)}:{_json(doc)}")
                cache[name] = hit
                node.fresh(STALE_RECORD)
            nodes[name] = hit[1]
        head = encode_record(r, nodes=False)
        return EncodedRecord(head, nodes)

    def forget(self, rollout: str) -> None:
        """``rollout`` is gone: drop what is kept of it."""
        self._cache.pop(rollout, None)


def decode_record(record: Mapping[str, Any]) -> Rollout:
    """A rollout from its stored record.

    Raises:
        InvalidInput: the record is unreadable (naming the rollout and why).
    """
    rid = str(record.get("id", "?"))[:80]
    try:
        if record.get("v") != RECORD_VERSION:
            raise InvalidInput(f"rollout record {rid}: unsupported version {record.get('v')!r}")
        spec = RolloutSpec.model_validate(record["spec"])
        nodes = {
            str(name): Node(**{k: v for k, v in doc.items() if k in NODE_FIELDS})
            for name, doc in dict(record["nodes"]).items()
        }
        for n in nodes.values():
            if not isinstance(n.grid, list) or not all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in n.grid
            ):
                raise InvalidInput(f"rollout record {rid}: node {n.name[:64]}'s steps are unreadable")
        waves = [[str(n) for n in wave] for wave in record["waves"]]
        state = str(record["state"])
        if state not in STATES:
            raise InvalidInput(f"rollout record {rid}: unknown state {state[:40]!r}")
        if sorted(n for wave in waves for n in wave) != sorted(nodes) or not 0 <= int(record["wave"]) < len(
            waves
        ):
            raise InvalidInput(f"rollout record {rid}: its waves do not match its nodes")
        return Rollout(
            id=str(record["id"]),
            spec=spec,
            plan=filled_plan(spec),
            state=state,
            created_at=float(record["created_at"]),
            updated_at=float(record["updated_at"]),
            waves=waves,
            nodes=nodes,
            wave=int(record["wave"]),
            wave_done_at=record.get("wave_done_at"),
            detail=str(record.get("detail", "")),
            failures=[str(n) for n in record.get("failures", [])],
            reason=str(record.get("reason", "")),
        )
    except ValidationError as exc:
        raise InvalidInput(f"rollout record {rid}: {describe(exc)}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInput(f"rollout record {rid} is unreadable: {exc!r}") from exc


def check_record(record: Mapping[str, Any]) -> str | None:
    """Why a stored rollout record cannot be loaded, or None when it can."""
    try:
        decode_record(record)
    except InvalidInput as exc:
        return exc.reason
    return None
