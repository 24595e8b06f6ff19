"""The hub's rollout state machine (DESIGN section 3): pure, events in, actions out.

``RolloutEngine.handle(event, now)`` applies one event and returns what the
runner (``hub.rollouts.RolloutManager``) must do, in order. Nothing here reads
a clock, a socket or a file: ``now`` is an input, commands come out unsigned
(the runner signs them), and persistence is a ``RolloutChanged`` marker that
the runner answers with ``record(rollout)``.

Rollout states (DESIGN 3): ``pending -> running -> succeeded``; ``running <->
paused``; ``running -> rolling_back -> rolled_back | rollback_failed``;
``running -> halted``; any non-final state ``-> aborting -> rolled_back |
aborted``; ``succeeded``/``halted`` ``-> rolling_back`` on request.

A node's part of a rollout (``hub.core.state.Node``) is tracked separately
from the rollout's state; its stage (``NodeStage``) moves only as
``TRANSITIONS`` allows, checked on every move (``_moves``), and what a step
report or a job snapshot means for it is decided in one place
(``hub.core.reports.decide``). A halted rollout still follows the nodes that
were running when it halted, and a node that failed restores itself (the agent
does that, DESIGN 3.4) while the rollout goes on. A node is *open* while it has an apply
in flight or a restore the hub waits for; a node open in any rollout, or a
target of any non-final rollout, is busy and cannot be targeted again.

Transient faults (DESIGN 3.4, 3.7): a node offline mid-job is ``lost`` for
``offline_grace_s``, then a failure; back in time it carries on from what it
reports. Many running nodes lost within ``MASS_WINDOW_S``, or the hub's own
connection lost (``BrokerChanged``), is a broker event (``Rollout.outage_since``):
no new commands and no timeouts until the nodes are back; past ``outage_limit_s``
a running rollout halts for the operator. A restore awaited from an offline
node is bounded by ``restore_timeout_s`` and shown in the rollout's detail; a
restore verified after the rollout ended amends it (``_amend``).

Truth in what people read (DESIGN 3.11): steps are numbered from 1 in every
text (``step_name``), a failure reason is its meaningful line (``meaningful``),
counts keep a failed node failed once restored (``_counted_as``), and each
node's per-step grid (``_mark``) is kept in the record (``hub.core.state.encode_record``).

Commands: ``issued_at`` strictly increases per node across every rollout
(agents refuse a command not later than the last they ran); the retained
command of a node is cleared only when the last command the hub sent to that
node is the one being cleared (a newer rollout may have published since).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Concatenate, Literal, ParamSpec

from bus.errors import Conflict, InvalidInput, NotFound
from bus.messages import (
    Command,
    JobSnapshot,
    NodePhase,
    NodeSummary,
    RolloutCounts,
    RolloutSpec,
    RolloutSummary,
    StepStatus,
    new_id,
)
from bus.pace import initial_waves, next_pace, resplit
from bus.waves import dispatchable
from hub.core.events import (
    AbortRequested,
    Action,
    Audit,
    BrokerChanged,
    ClearCommand,
    EngineEvent,
    PauseRequested,
    PresenceChanged,
    PublishCommand,
    ResumeRequested,
    RollbackRequested,
    RolloutChanged,
    RolloutCreated,
    RolloutsLoaded,
    SnapshotReported,
    StepReported,
    Tick,
)
from hub.core.reports import (
    Move,
    Report,
    Verdict,
    decide,
    meaningful,
    report_of_snapshot,
    report_of_status,
)
from hub.core.state import (
    FINAL_STATES,
    STALE_ROW,
    CommandAction,
    EncodedRecord,
    Node,
    NodeStage,
    RecordEncoder,
    Restore,
    Rollout,
    all_nodes,
    check_record,
    decode_record,
    encode_record,
    filled_plan,
    is_allowed,
    not_waiting,
    stage_of,
    wave_done,
)
from hub.core.windows import schedule_of

__all__ = [
    "FINAL_STATES",
    "AbortRequested",
    "Action",
    "Audit",
    "BrokerChanged",
    "ClearCommand",
    "EngineEvent",
    "PauseRequested",
    "PresenceChanged",
    "PublishCommand",
    "ResumeRequested",
    "RollbackRequested",
    "RolloutChanged",
    "RolloutCreated",
    "RolloutEngine",
    "RolloutsLoaded",
    "SnapshotReported",
    "StageError",
    "StepReported",
    "Tick",
    "check_record",
]

#: Smallest step between two ``issued_at`` of one node (floats of epoch seconds keep 1 ms exactly).
ISSUE_STEP_S = 0.001
#: A deferring node that has not started this long after its ``defer_until`` is not_started.
DEFER_GRACE_S = 15.0
#: Nodes lost within this many seconds of each other count as lost at once (a broker event).
MASS_WINDOW_S = 2.0
#: ... when they are at least this many and more than this share of the running nodes.
MASS_MIN_NODES = 2
MASS_SHARE = 0.5

_WAIT_PREFIX = "rolling back: waiting for "


def _clock(when: float) -> str:
    """A wall-clock time as people read it in texts (UTC, to the second)."""
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%H:%M:%S UTC")


def _restore_timeout_text(r: Rollout, n: Node) -> str:
    """Why a restore the hub waited for did not come: offline past restore_timeout_s, or silent."""
    if n.offline_since is not None and (n.deadline or 0.0) >= n.offline_since + r.spec.restore_timeout_s:
        return (
            f"not restored: offline since {_clock(n.offline_since)}, no restore within "
            f"restore_timeout_s ({_seconds(r.spec.restore_timeout_s)})"
        )
    return f"not restored: no report within {_seconds(r.spec.node_timeout_s)} of the {n.action}"


class _Out:
    """Actions of one ``handle`` call, with the rollouts it changed."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.changed: dict[str, None] = {}

    def add(self, action: Action) -> None:
        self.actions.append(action)

    def touch(self, rollout: Rollout, now: float) -> None:
        rollout.updated_at = max(rollout.updated_at, now)
        self.changed[rollout.id] = None

    def finish(self) -> list[Action]:
        return [*self.actions, *(RolloutChanged(rid) for rid in self.changed)]


def _defer_window(spec: RolloutSpec) -> float:
    """How long after its command a node may wait for its update lock (within start_deadline_s)."""
    if spec.start_deadline_s is None:
        return spec.max_defer_s
    return min(spec.max_defer_s, spec.start_deadline_s)


def _seconds(value: float) -> str:
    return f"{value:g} s"


class StageError(AssertionError):
    """A node made a move the stage table does not allow: a bug in the engine (strict engines raise it)."""


_P = ParamSpec("_P")
_NodeMethod = Callable[Concatenate["RolloutEngine", Rollout, Node, _P], None]


def _moves(method: _NodeMethod[_P]) -> _NodeMethod[_P]:
    """Mark a method that moves a node: its move is checked against ``TRANSITIONS``.

    Only the outermost of nested moves is checked (``_late_start`` sends an
    abort: the node goes from withdrawn to restoring, whatever happens inside).
    """

    @functools.wraps(method)
    def checked(self: RolloutEngine, r: Rollout, n: Node, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        if self._moving:
            method(self, r, n, *args, **kwargs)
            return
        before = stage_of(n)
        self._moving = True
        try:
            method(self, r, n, *args, **kwargs)
        finally:
            self._moving = False
        after = stage_of(n)
        if not is_allowed(before, after):
            self._bad_moves.append((r.id, n.name, before, after, method.__name__.lstrip("_")))

    return checked


class RolloutEngine:
    """Every rollout of one hub, driven by events (see the module docstring).

    Args:
        new_id: id factory for commands (uuid4 by default; tests pass a counter).
        resume_grace_s: after ``RolloutsLoaded``, how long time-driven decisions
            (timeouts, expiry, soak) wait so the retained job snapshots can
            arrive first (DESIGN 3.6).
        offline_grace_s: how long a node offline mid-job is ``lost`` before it
            is a failure, for specs that leave ``offline_grace_s`` unset (the
            runner passes 3 heartbeats plus the keepalive).
        outage_limit_s: how long a broker or network event (the hub's own
            connection lost, or many nodes lost at once) may hold a rollout
            before it halts for the operator.
        strict: raise ``StageError`` when a node makes a move ``TRANSITIONS``
            does not list (tests); otherwise the move is audited as
            ``stage_unexpected`` and the rollout goes on.
    """

    def __init__(
        self,
        *,
        new_id: Callable[[], str] = new_id,
        resume_grace_s: float = 5.0,
        offline_grace_s: float = 25.0,
        outage_limit_s: float = 300.0,
        strict: bool = False,
    ) -> None:
        self._new_id = new_id
        self._grace = resume_grace_s
        self._offline_grace = offline_grace_s
        self._outage_limit = outage_limit_s
        self._connected = True
        self._settle_until = 0.0  # after the hub reconnects: retained wills may still arrive
        self._drops: list[tuple[float, str]] = []  # recent (time, node) losses of running nodes
        self._offline_at: dict[str, float] = {}  # per node: when it went offline
        self._rollouts: dict[str, Rollout] = {}
        self._by_node: dict[str, set[str]] = {}
        self._issued: dict[str, float] = {}  # per node: the latest issued_at sent
        self._last: dict[str, str] = {}  # per node: id of the latest command sent
        self._online: dict[str, bool] = {}
        self._active: set[str] = set()
        self._strict = strict
        self._moving = False  # inside a node move (see _moves)
        self._bad_moves: list[tuple[str, str, NodeStage, NodeStage, str]] = []
        self._encoder = RecordEncoder()
        self._rows: dict[str, _RowTable] = {}  # per rollout: its summary rows, made again as nodes change

    # ------------------------------------------------------------------ queries

    def has(self, rollout: str) -> bool:
        """Whether the engine knows ``rollout``."""
        return rollout in self._rollouts

    def is_issued(self, rollout: str, node: str, command: str) -> bool:
        """Whether ``command`` is one this engine sent ``node`` for ``rollout`` (its apply or latest)."""
        r = self._rollouts.get(rollout)
        n = r.nodes.get(node) if r is not None else None
        return n is not None and command in (n.apply_id, n.command_id)

    def state(self, rollout: str) -> str:
        """The state of ``rollout``; NotFound if unknown."""
        return self._get(rollout).state

    def rollout_ids(self) -> list[str]:
        """Every known rollout id, oldest first."""
        return [r.id for r in sorted(self._rollouts.values(), key=lambda r: (r.created_at, r.id))]

    def resolve(self, rollout: str) -> str:
        """The full id of ``rollout``: its id or any unique prefix of one (the CLI prints 8 characters).

        Raises:
            NotFound: no rollout id starts with it.
            InvalidInput: several do (the message names them).
        """
        if rollout in self._rollouts:
            return rollout
        matches = sorted(rid for rid in self._rollouts if rid.startswith(rollout))
        if not matches:
            raise NotFound(f"unknown rollout {rollout[:80]!r}")
        if len(matches) > 1:
            shown = ", ".join(matches[:10]) + (f" (+{len(matches) - 10} more)" if len(matches) > 10 else "")
            raise InvalidInput(f"rollout id prefix {rollout[:80]!r} is ambiguous: it matches {shown}")
        return matches[0]

    def plan(self, rollout: str) -> list[dict[str, Any]]:
        """The plan the nodes of ``rollout`` get (step timeouts filled in), as JSON values."""
        return [step.model_dump(mode="json") for step in self._get(rollout).plan]

    def busy(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` that another rollout still holds."""
        return [node for node in nodes if self._is_busy(node)]

    def last_command(self, node: str) -> str | None:
        """Id of the latest command sent to ``node``."""
        return self._last.get(node)

    def issued_high_water(self, node: str) -> float | None:
        """The latest ``issued_at`` sent to ``node``."""
        return self._issued.get(node)

    def summary(self, rollout: str) -> RolloutSummary:
        """The ``RolloutSummary`` of ``rollout``; NotFound if unknown."""
        r = self._get(rollout)
        counts = dict.fromkeys(RolloutCounts.model_fields, 0)
        final = r.is_final
        nodes: dict[str, NodeSummary] = {}
        for node in r.nodes.values():
            phase = _shown_phase(node, final)
            for key in _counted_as(node, phase):
                counts[key] += 1
            # Built from the engine's own state: no need to validate a thousand times.
            nodes[node.name] = NodeSummary.model_construct(phase=phase, step=node.step, detail=node.detail)
        return RolloutSummary.model_validate(
            {
                "id": r.id,
                "name": r.spec.name,
                "state": r.state,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "counts": RolloutCounts(**counts),
                "nodes": nodes,
                "wave": min(r.wave + 1, len(r.waves)),
                "waves": len(r.waves),
                "detail": r.detail,
            }
        )

    def summary_rows(
        self, rollout: str
    ) -> tuple[RolloutSummary, dict[str, tuple[NodePhase, int | None, str, bool]]]:
        """The summary with an empty ``nodes``, and every node's ``(phase, step, detail, failed)``.

        One pass; ``failed``: the node failed or could not be restored. What the hub
        publishes bounded (a part of the nodes, and per-node changes); NotFound if unknown.
        """
        r = self._get(rollout)
        table = self._rows.get(r.id)
        if table is None or table.final != r.is_final or len(table.rows) != len(r.nodes):
            table = self._rows[r.id] = _RowTable(r.is_final)  # (a finished rollout shows no pending node)
        rows, counts = table.update(r)
        head = RolloutSummary.model_validate(
            {
                "id": r.id,
                "name": r.spec.name,
                "state": r.state,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "counts": RolloutCounts(**counts),
                "wave": min(r.wave + 1, len(r.waves)),
                "waves": len(r.waves),
                "detail": r.detail,
            }
        )
        return head, rows

    def steps(self, rollout: str, limit: int = 5000) -> dict[str, list[dict[str, Any]]]:
        """Every node's step grid (state and failure reason per plan step), as the ``show`` reply's ``steps``.

        Each step is ``{"index": i, "type", "state", "detail"}`` with ``i`` 0-based as
        ``StepStatus.index`` on the wire and ``state`` a ``StepStatus`` state, ``pending``,
        or ``not_started`` (a step a finished rollout never ran). When the rollout has more than ``limit``
        cells, nodes whose every step is still pending are left out (replies are
        size-bounded); NotFound if unknown.
        """
        r = self._get(rollout)
        types = [step.type for step in r.plan]
        many = len(r.nodes) * len(types) > limit
        idle = "not_started" if r.is_final else "pending"  # a finished rollout has nothing pending
        grids: dict[str, list[dict[str, Any]]] = {}
        for name, n in r.nodes.items():
            if many and not n.grid:
                continue
            cells = n.grid or [["pending", ""]] * len(types)
            grids[name] = [
                {"index": i, "type": kind, "state": idle if state == "pending" else state, "detail": detail}
                for i, (kind, (state, detail)) in enumerate(zip(types, cells, strict=False))
            ]
        return grids

    def record(self, rollout: str) -> dict[str, Any]:
        """The JSON-able record of ``rollout`` that the store keeps (``RolloutsLoaded`` reads it)."""
        return encode_record(self._get(rollout))

    def encoded_record(self, rollout: str) -> EncodedRecord:
        """``record`` as JSON, each node encoded again only when it changed (10,000 nodes a round)."""
        return self._encoder.encode(self._get(rollout))

    def finished(self) -> list[str]:
        """Rollouts that are over for good (final, no node still at work), oldest first."""
        return [rid for rid in self.rollout_ids() if self._rollouts[rid].is_final and rid not in self._active]

    def forget(self, rollout: str) -> None:
        """Drop a finished rollout (retention). What each node was last sent is kept.

        Raises:
            NotFound: an unknown rollout.
            Conflict: a rollout that is not over (``finished`` lists those that are).
        """
        r = self._get(rollout)
        if not r.is_final or r.id in self._active:
            raise Conflict(f"rollout {rollout[:80]!r} is not finished: it cannot be archived")
        del self._rollouts[r.id]
        self._encoder.forget(r.id)
        self._rows.pop(r.id, None)
        for name in r.nodes:
            held = self._by_node.get(name)
            if held is not None:
                held.discard(r.id)
                if not held:
                    del self._by_node[name]

    def next_deadline(self) -> float | None:
        """The earliest time at which a ``Tick`` may change something, or None."""
        best: float | None = self._settle_until if self._settle_until > 0 else None
        for rid in self._active:
            r = self._rollouts[rid]
            # (A lost node's own deadline is its grace, below.)
            times = [n.deadline for n in r.nodes.values() if n.is_open and n.deadline and n.phase != "lost"]
            if r.outage_since is not None:
                times = [r.outage_since + self._outage_limit]
            elif r.state in ("running", "paused"):  # (a halted rollout leaves its lost nodes be)
                grace = self._grace_of(r)
                times += [
                    n.offline_since + grace for n in r.nodes.values() if n.phase == "lost" and n.offline_since
                ]
            if r.state == "running" and r.wave_done_at is not None:
                times.append(r.wave_done_at + r.spec.strategy.soak_s)
            if r.state == "running" and r.window_at is not None:
                times.append(r.window_at)
            if not times:
                continue
            when = max(min(times), r.hold_until)
            best = when if best is None else min(best, when)
        return best

    # ------------------------------------------------------------------ events

    def handle(self, event: EngineEvent, now: float) -> list[Action]:
        """Apply one event; return what the runner must do, in order.

        Raises:
            NotFound: a request names an unknown rollout.
            Conflict: a request that the rollout's state does not allow, or
                targets that another rollout holds (``exc.nodes``).
            InvalidInput: a loaded record that cannot be read.
        """
        out = _Out()
        if isinstance(event, RolloutCreated):
            self._create(event, now, out)
        elif isinstance(event, RolloutsLoaded):
            self._load(event.records, now, out)
        elif isinstance(event, AbortRequested):
            self._abort(self._get(event.rollout), now, out)
        elif isinstance(event, RollbackRequested):
            self._rollback(self._get(event.rollout), now, out)
        elif isinstance(event, PauseRequested):
            self._pause(self._get(event.rollout), now, out)
        elif isinstance(event, ResumeRequested):
            self._resume(self._get(event.rollout), now, out)
        elif isinstance(event, StepReported):
            self._on_status(event.node, event.status, now, out)
            self._end_outages(now, out)
        elif isinstance(event, SnapshotReported):
            self._on_snapshot(event.node, event.snapshot, now, out)
            self._end_outages(now, out)
        elif isinstance(event, PresenceChanged):
            self._on_presence(event.node, event.online, now, out)
        elif isinstance(event, BrokerChanged):
            self._on_broker(event.connected, now, out)
        else:
            self._tick(now, out)
        self._report_bad_moves(out)
        for rid in out.changed:
            r = self._rollouts[rid]
            if r.is_final:
                r.outage_since = None  # over for this rollout: a later rollback request starts clean
            self._refresh_active(r)
        return out.finish()

    # ------------------------------------------------------------------ helpers

    def _report_bad_moves(self, out: _Out) -> None:
        """Moves the stage table does not allow: raised in a strict engine, else audited."""
        bad, self._bad_moves = self._bad_moves, []
        for rid, node, before, after, how in bad:
            message = f"{node} moved from {before.value} to {after.value} ({how}): not in the stage table"
            if self._strict:
                raise StageError(f"rollout {rid}: {message}")
            out.add(Audit(rid, "stage_unexpected", message, {"from": before.value, "to": after.value}, node))

    def _get(self, rollout: str) -> Rollout:
        r = self._rollouts.get(rollout)
        if r is None:
            raise NotFound(f"unknown rollout {rollout[:80]!r}")
        return r

    def _is_busy(self, node: str) -> bool:
        for rid in self._by_node.get(node, ()):
            r = self._rollouts[rid]
            if not r.is_final or r.nodes[node].is_open:
                return True
        return False

    def _refresh_active(self, r: Rollout) -> None:
        if not r.is_final or any(n.is_open for n in r.nodes.values()):
            self._active.add(r.id)
        else:
            self._active.discard(r.id)

    def _audit(
        self,
        r: Rollout,
        kind: str,
        message: str,
        out: _Out,
        node: str | None = None,
        **evidence: Any,
    ) -> None:
        out.add(Audit(rollout=r.id, kind=kind, message=message, evidence=evidence, node=node))

    # ------------------------------------------------------------------ creation and loading

    def _create(self, event: RolloutCreated, now: float, out: _Out) -> None:
        if event.rollout in self._rollouts:
            raise Conflict(f"rollout {event.rollout} exists already")
        nodes = list(event.nodes)
        if not nodes:
            raise Conflict("the targets match no node")
        if len(set(nodes)) != len(nodes):
            raise InvalidInput("targets name a node more than once")
        busy = self.busy(nodes)
        if busy:
            raise Conflict(
                f"busy in another rollout: {', '.join(busy[:20])}" + (" ..." if len(busy) > 20 else ""),
                nodes=busy,
            )
        waves = initial_waves(nodes, event.spec.strategy)
        wave_of = {node: i for i, wave in enumerate(waves) for node in wave}
        r = Rollout(
            id=event.rollout,
            spec=event.spec,
            plan=filled_plan(event.spec),
            state="pending",
            created_at=now,
            updated_at=now,
            waves=waves,
            nodes={node: Node(name=node, wave=wave_of[node], tz=event.zones.get(node)) for node in nodes},
            schedule=schedule_of(event.spec),
        )
        self._rollouts[r.id] = r
        for node in nodes:
            self._by_node.setdefault(node, set()).add(r.id)
            self._online[node] = node in event.online
        offline = [node for node in nodes if node not in event.online]
        self._audit(
            r,
            "created",
            f"rollout {event.spec.name!r} created: {len(nodes)} nodes in {len(waves)} waves"
            + (f", {len(offline)} offline (queued)" if offline else ""),
            out,
            targets=len(nodes),
            waves=[len(w) for w in waves],
            offline=offline[:50],
        )
        r.state = "running"
        self._audit(
            r,
            "wave_started",
            f"wave 1 of {len(waves)} started ({len(waves[0])} nodes)",
            out,
            wave=1,
            nodes=waves[0][:50],
        )
        out.touch(r, now)
        self._progress(r, now, out)

    def _load(self, records: Sequence[Mapping[str, Any]], now: float, out: _Out) -> None:
        loaded = [decode_record(record) for record in records]
        for r in loaded:
            if r.id in self._rollouts:
                raise Conflict(f"rollout {r.id} is loaded already")
        for r in loaded:
            self._rollouts[r.id] = r
            for node in r.nodes.values():
                self._by_node.setdefault(node.name, set()).add(r.id)
                issued, command = node.issued_at, node.command_id
                if issued is not None and command is not None and issued > self._issued.get(node.name, -1.0):
                    self._issued[node.name] = issued
                    self._last[node.name] = command
        for r in loaded:
            self._refresh_active(r)
            if r.id not in self._active:
                continue
            r.hold_until = now + self._grace
            # A command recorded (the store is flushed before every command is
            # published) may have missed the broker when the hub died: publish the
            # same command again. Agents ignore a replay of an id they ran.
            for node in r.nodes.values():
                if self._is_resendable(node, now):
                    out.add(PublishCommand(node.name, self._rebuild_command(r, node)))
            self._audit(
                r, "resumed_after_restart", f"hub restarted: resuming rollout in state {r.state}", out
            )
            out.touch(r, r.updated_at)
            # Safe right away: a node with no recorded command never got one, and
            # time-driven decisions wait for hold_until.
            self._progress(r, now, out)

    def _is_resendable(self, n: Node, now: float) -> bool:
        """Its latest command is still awaited, retained and unexpired: publishing it again is safe."""
        if n.action == "apply":
            in_flight = n.queued or n.phase in ("applying", "deferred")
        else:
            in_flight = n.restore == "waiting"
        return (
            in_flight
            and not n.cleared
            and n.command_id is not None
            and self._last.get(n.name) == n.command_id
            and n.expires_at is not None
            and n.expires_at > now
        )

    # ------------------------------------------------------------------ requests

    def _abort(self, r: Rollout, now: float, out: _Out) -> None:
        if r.is_final:
            raise Conflict(f"rollout {r.id} is {r.state} already; nothing to abort (rollback undoes it)")
        if r.state in ("aborting", "rolling_back"):
            return  # already on its way back: an abort is a no-op
        self._start_restore(r, "aborting", "abort requested", now, out, retry=False)

    def _rollback(self, r: Rollout, now: float, out: _Out) -> None:
        if r.state in ("aborting", "rolling_back"):
            return
        if r.state in ("succeeded", "halted"):
            self._start_restore(r, "rolling_back", "rollback requested", now, out, retry=False)
            return
        if r.state in ("rollback_failed", "aborted"):
            if not any(n.touched and n.restore == "unrestored" for n in r.nodes.values()):
                raise Conflict(f"rollout {r.id} is {r.state}: no node is left to roll back")
            self._start_restore(
                r, "rolling_back", "rollback requested (retrying unrestored nodes)", now, out, retry=True
            )
            return
        if r.state == "rolled_back":
            raise Conflict(f"rollout {r.id} is rolled back already")
        raise Conflict(f"rollout {r.id} is {r.state}: abort it to roll it back")

    def _pause(self, r: Rollout, now: float, out: _Out) -> None:
        if r.state == "paused":
            return
        if r.state != "running":
            raise Conflict(f"rollout {r.id} is {r.state}: only a running rollout can be paused")
        r.state = "paused"
        self._audit(r, "paused", "paused: no new commands until resumed", out)
        out.touch(r, now)

    def _resume(self, r: Rollout, now: float, out: _Out) -> None:
        if r.state == "running":
            return
        if r.state != "paused":
            raise Conflict(f"rollout {r.id} is {r.state}: only a paused rollout can be resumed")
        r.state = "running"
        self._audit(r, "resumed", "resumed", out)
        out.touch(r, now)
        self._progress(r, now, out)

    # ------------------------------------------------------------------ reports

    def _node(self, rollout: str, node: str) -> tuple[Rollout, Node] | None:
        r = self._rollouts.get(rollout)
        if r is None:
            return None
        n = r.nodes.get(node)
        return None if n is None else (r, n)

    def _on_status(self, node: str, status: StepStatus, now: float, out: _Out) -> None:
        marks = [(status.index, status.state, status.detail)]
        self._on_report(node, status.rollout, status.command, report_of_status(status), marks, now, out)

    def _on_snapshot(self, node: str, snap: JobSnapshot, now: float, out: _Out) -> None:
        marks = [(s.index, s.state, s.detail) for s in snap.steps]
        self._on_report(node, snap.rollout, snap.id, report_of_snapshot(snap), marks, now, out)

    def _on_report(
        self,
        node: str,
        rollout: str,
        command: str,
        report: Report,
        marks: Sequence[tuple[int, str, str]],
        now: float,
        out: _Out,
    ) -> None:
        """A step report or a job snapshot of ``command``: the latest command decides (DESIGN 3.6)."""
        found = self._node(rollout, node)
        if found is None:
            return
        r, n = found
        if n.withdrawn and command == n.apply_id:
            if report.started:
                self._late_start(r, n, now, out)
            return
        if command != n.command_id:
            return  # an older command of this rollout, or one this hub never sent
        self._back(r, n, now, out)
        before = (n.phase, n.step, n.detail, n.restore)
        if any([_mark(r, n, index, state, detail) for index, state, detail in marks]):
            out.touch(r, now)
        self._fold(r, n, report, now, out)
        if (n.phase, n.step, n.detail, n.restore) != before:
            out.touch(r, now)
        self._progress(r, now, out)

    @_moves
    def _fold(self, r: Rollout, n: Node, report: Report, now: float, out: _Out) -> None:
        """Carry out the moves a report decides (``hub.core.reports.decide``), in order."""
        for verdict in decide(n, report):
            self._carry_out(r, n, verdict, now, out)

    def _carry_out(self, r: Rollout, n: Node, v: Verdict, now: float, out: _Out) -> None:
        move = v.move
        if move is Move.DEFER:
            self._deferred(r, n, v.reason, now, out)
        elif move is Move.NOT_START:
            self._not_started(r, n, v.reason, now, out)
        elif move is Move.START:
            self._started(r, n, now)
            n.step = v.step
        elif move is Move.SUCCEED:
            self._succeeded(r, n, now, out)
        elif move is Move.FAIL:
            n.step = v.step
            self._fail(r, n, v.phase or "failed", v.reason, now, out, restore=v.restore, step=v.audit_step)
            if v.clear:
                self._clear(n, out)
        elif move is Move.SHOW_ROLLING_BACK:
            n.phase = "rolling_back"
        elif move in (Move.AT_STEP, Move.UNDER_WAY):
            n.touched = n.touched or move is Move.UNDER_WAY
            n.step = n.step if v.step is None else v.step
        elif move is Move.RESTORED:
            self._restored(r, n, now, out)
        else:
            self._unrestored(r, n, f"{n.detail}; {v.reason}" if v.after_detail else v.reason, now, out)

    def _on_presence(self, node: str, online: bool, now: float, out: _Out) -> None:
        self._online[node] = online
        if online:
            self._offline_at.pop(node, None)
        else:
            self._offline_at.setdefault(node, now)
        lost = False
        for rid in sorted(self._by_node.get(node, ())):
            r = self._rollouts[rid]
            n = r.nodes[node]
            if online:
                self._back(r, n, now, out)
                if n.queued:
                    self._delivered(r, n, now, out)
                elif self._is_resendable(n, now):
                    # A new connection of the node: a broker restarted without persistence
                    # may have lost the retained command it waits for. A replay is ignored.
                    out.add(PublishCommand(n.name, self._rebuild_command(r, n)))
                self._progress(r, now, out)
                continue
            if n.phase == "applying" and not n.failed:
                self._lose(r, n, now, out)
                lost = True
            elif (
                n.applied and not n.failed and n.phase == "succeeded" and r.state in ("running", "paused")
                and n.wave == r.wave
            ):  # fmt: skip
                self._lose(r, n, now, out)  # in its wave (soaking): its wave waits for it
                lost = True
            elif n.restore == "waiting":
                self._restore_offline(r, n, now, out)
                self._progress(r, now, out)
        if lost:
            self._note_drop(node, now, out)
        self._end_outages(now, out)

    @_moves
    def _delivered(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """Its retained apply reaches it now (it came online): the node timeout starts."""
        n.queued = False
        if not n.touched or n.phase != "applying" or n.detail:  # (each report of a running step)
            n.touched, n.phase, n.detail = True, "applying", ""
        n.deadline, n.deadline_kind = now + r.spec.node_timeout_s, "node"
        out.touch(r, now)

    @_moves
    def _lose(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """Offline mid-job: ``lost``, not failed, for the grace (DESIGN 3.4); its agent goes on alone."""
        n.lost_from = n.phase
        n.phase = "lost"
        n.offline_since = self._offline_at.get(n.name, now)
        grace = self._grace_of(r)
        n.detail = f"lost: offline since {_clock(n.offline_since)}; a failure after {_seconds(grace)}"
        self._audit(r, "node_lost", f"{n.name} {n.detail}", out, node=n.name, grace_s=grace)
        out.touch(r, now)

    def _back(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A node is heard again (presence or a report): a lost one carries on where it is."""
        if n.phase == "lost":
            self._found(r, n, now, out)
        elif n.restore == "waiting" and n.offline_since is not None:
            if n.phase == "offline":
                n.phase = "rolling_back"
            if n.issued_at is not None:
                n.deadline, n.deadline_kind = n.issued_at + r.spec.node_timeout_s, "restore"
            out.touch(r, now)
        if n.offline_since is not None or n.lost_from is not None:  # (an assignment marks it changed)
            n.offline_since = n.lost_from = None

    @_moves
    def _found(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A lost node is back: it goes on from where it was (the time away does not count)."""
        n.phase = n.lost_from or "applying"
        n.detail = ""
        away = now - n.offline_since if n.offline_since is not None else 0.0
        if n.deadline is not None and n.deadline_kind == "node":
            n.deadline += away
        self._audit(r, "node_back", f"{n.name} back after {_seconds(round(away, 1))}", out, node=n.name)
        out.touch(r, now)

    def _grace_of(self, r: Rollout) -> float:
        grace = r.spec.offline_grace_s
        return self._offline_grace if grace is None else grace

    @_moves
    def _restore_offline(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A node whose restore the hub waits for is offline: wait up to ``restore_timeout_s``, visibly."""
        if n.offline_since is None:
            n.offline_since = self._offline_at.get(n.name, now)
        if not n.failed and n.phase == "rolling_back":
            n.phase = "offline"
        until = n.offline_since + r.spec.restore_timeout_s
        if n.deadline is None or until < n.deadline:
            n.deadline, n.deadline_kind = until, "restore"
        out.touch(r, now)

    # ------------------------------------------------------------------ broker events

    def _on_broker(self, connected: bool, now: float, out: _Out) -> None:
        """The hub's own connection: while it is down the hub is blind, not the nodes gone."""
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            # The broker replays what it retained (wills of nodes it lost included):
            # give that, and the nodes' reconnects, a moment before deciding anything.
            self._settle_until = now + self._grace
            return
        for rid in sorted(self._active):
            r = self._rollouts[rid]
            if r.state in ("running", "paused", "rolling_back", "aborting"):
                self._start_outage(r, "broker connection lost: the hub is disconnected", now, out)

    def _note_drop(self, node: str, now: float, out: _Out) -> None:
        """Many running nodes lost within ``MASS_WINDOW_S``: a broker or network event, not failures."""
        self._drops = [(t, n) for t, n in self._drops if now - t <= MASS_WINDOW_S and n != node]
        self._drops.append((now, node))
        dropped = {n for _, n in self._drops}
        hit: list[Rollout] = []
        running = 0
        for rid in sorted(self._active):
            r = self._rollouts[rid]
            # The nodes in play: at work, lost, or soaking in the current wave.
            open_nodes = [
                n
                for n in r.nodes.values()
                if n.phase in ("applying", "lost") or (n.phase == "succeeded" and n.wave == r.wave)
            ]
            running += len(open_nodes)
            if any(n.name in dropped for n in open_nodes):
                hit.append(r)
        if len(dropped) < MASS_MIN_NODES or len(dropped) <= MASS_SHARE * running:
            return
        for r in hit:
            if r.outage_since is None:
                self._start_outage(r, f"broker connection lost: {len(dropped)} nodes lost at once", now, out)
            else:
                r.outage_note = f"{r.outage_note.split(':')[0]}: {len(dropped)} nodes lost at once"

    def _start_outage(self, r: Rollout, why: str, now: float, out: _Out) -> None:
        if r.outage_since is not None:
            return
        r.outage_since = now
        r.outage_note = why
        until = now + self._outage_limit
        r.detail = f"{why}; waiting (new commands paused; halts at {_clock(until)} if the nodes stay away)"
        self._audit(r, "outage", f"{why}; waiting", out, since=now, limit_s=self._outage_limit)
        out.touch(r, now)

    def _end_outages(self, now: float, out: _Out) -> None:
        """Resume every rollout whose broker event is over: hub connected, settled, no node lost."""
        if not self._connected or now < self._settle_until:
            return
        self._settle_until = 0.0
        for rid in sorted(self._active):
            r = self._rollouts[rid]
            if r.outage_since is None or any(n.phase == "lost" for n in r.nodes.values()):
                continue
            took = now - r.outage_since
            r.outage_since = None
            for n in r.nodes.values():  # the time of the event does not count against the nodes
                if n.is_open and n.deadline is not None and n.deadline_kind in ("node", "restore"):
                    n.deadline += took
            r.detail = r.reason if r.state in ("rolling_back", "aborting") else ""
            self._audit(r, "outage_over", f"nodes back after {_seconds(round(took, 1))}: resuming", out)
            r.hold_until = max(r.hold_until, now)
            out.touch(r, now)
            self._progress(r, now, out)

    def _tick(self, now: float, out: _Out) -> None:
        self._end_outages(now, out)
        for rid in sorted(self._active):
            r = self._rollouts[rid]
            if now < r.hold_until:
                continue
            if r.outage_since is not None:
                self._outage_tick(r, now, out)
                continue  # a broker event: no node is failed for being away, no timeout runs
            for n in r.nodes.values():
                if n.phase == "lost":
                    self._lost_tick(r, n, now, out)
                    continue
                if not n.is_open or n.deadline is None or n.deadline > now:
                    continue
                if n.deadline_kind == "expiry":
                    self._expired(r, n, now, out)
                elif n.deadline_kind == "start":
                    within = f"within start_deadline_s ({_seconds(r.spec.start_deadline_s or 0)})"
                    self._not_started(r, n, f"not started {within}: {n.detail or 'node offline'}", now, out)
                elif n.deadline_kind == "defer":
                    waited = f"still deferred after {_seconds(r.spec.max_defer_s)}"
                    self._not_started(r, n, f"not started: {waited} ({n.detail})", now, out)
                elif n.deadline_kind == "restore":
                    why = _restore_timeout_text(r, n)
                    self._unrestored(r, n, f"{self._prefix(n)}{why}", now, out, keep_command=True)
                else:
                    self._timed_out(r, n, now, out)
            self._progress(r, now, out)

    @_moves
    def _expired(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A queued apply expired before the node came back to start it: a failure, nothing to restore."""
        n.queued = False
        self._fail(r, n, "timed_out", "did not start before its command expired", now, out)
        n.deadline = n.deadline_kind = None
        self._clear(n, out)

    @_moves
    def _timed_out(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """No final report within node_timeout_s: a failure, and an abort to undo what it did."""
        why = f"timed out: no final report within {_seconds(r.spec.node_timeout_s)}"
        self._fail(r, n, "timed_out", why, now, out)
        self._send_restore(r, n, "abort", now, out, phase="timed_out")

    @_moves
    def _lost_tick(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A lost node past its grace is a node failure (a halted rollout leaves it to the operator)."""
        grace = self._grace_of(r)
        if n.offline_since is None or now < n.offline_since + grace or r.state == "halted":
            return
        was_applying = n.lost_from != "succeeded"
        n.phase = n.lost_from or "applying"
        n.lost_from = None
        since = _clock(n.offline_since)
        when = "mid-job" if was_applying else "in its wave"
        within = f"offline_grace_s ({_seconds(grace)})"
        reason = f"went offline {when}: offline since {since}, not back within {within}"
        self._fail(r, n, "offline", reason, now, out)
        if was_applying:
            self._send_restore(r, n, "abort", now, out, phase="offline")

    def _outage_tick(self, r: Rollout, now: float, out: _Out) -> None:
        """Past ``outage_limit_s`` of a broker event the rollout halts for the operator: no blind rollback."""
        assert r.outage_since is not None  # noqa: S101 - the caller checked
        if now < r.outage_since + self._outage_limit:
            return
        lost = [n.name for n in r.nodes.values() if n.phase == "lost"]
        named = ", ".join(lost[:20]) + (f" (+{len(lost) - 20} more)" if len(lost) > 20 else "")
        note = (
            f"{r.outage_note} at {_clock(r.outage_since)}; after {_seconds(self._outage_limit)} "
            f"{len(lost)} node(s) still lost ({named}); waiting for the operator"
        )
        r.outage_since = None
        if r.state in ("running", "paused"):
            r.state = "halted"
            r.detail = f"halted: {note}"
            for n in r.nodes.values():
                if n.queued:
                    self._withdraw(r, n, now, out)
            self._audit(r, "halted", r.detail, out, lost=lost[:50])
        else:  # a rollback in progress goes on: its nodes' restores are awaited (restore_timeout_s)
            self._audit(r, "outage_long", note, out, lost=lost[:50])
        out.touch(r, now)

    # ------------------------------------------------------------------ node transitions

    @_moves
    def _started(self, r: Rollout, n: Node, now: float) -> None:
        if n.queued or n.phase == "deferred":
            n.queued = False
            n.deadline, n.deadline_kind = now + r.spec.node_timeout_s, "node"
        if not n.touched or n.phase != "applying" or n.detail:  # (each report of a running step)
            n.touched, n.phase, n.detail = True, "applying", ""

    @_moves
    def _succeeded(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        n.queued = False
        n.touched = n.applied = True
        n.phase, n.detail = "succeeded", ""
        n.done_at = now
        n.deadline = n.deadline_kind = None
        self._clear(n, out)
        out.touch(r, now)

    @_moves
    def _fail(
        self,
        r: Rollout,
        n: Node,
        phase: NodePhase,
        reason: str,
        now: float,
        out: _Out,
        restore: Restore | None = None,
        step: int | None = None,
    ) -> None:
        if n.failed:
            return
        n.failed = True
        n.phase, n.detail = phase, reason
        if phase != "timed_out" or n.deadline_kind != "expiry":
            n.touched = True
        n.queued = False
        n.restore = restore
        if restore == "waiting":
            n.deadline, n.deadline_kind = now + r.spec.node_timeout_s, "restore"
        else:
            n.deadline = n.deadline_kind = None
        r.failures.append(n.name)
        self._audit(
            r,
            "node_failed",
            f"{n.name} {reason}",
            out,
            node=n.name,
            reason=reason,
            phase=phase,
            step=step,
            command=n.command_id,
            failed=len(r.failures),
            max_failed=r.spec.failure.max_failed,
        )
        out.touch(r, now)

    @_moves
    def _restored(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        late = n.restore == "unrestored" and r.is_final
        was_unrestored = n.phase == "rollback_failed"
        n.restore = "restored"
        n.phase = "rolled_back"
        n.deadline = n.deadline_kind = None
        if was_unrestored:  # keep why it failed, drop why its restore was missing
            n.detail = f"{n.detail.partition('; ')[0]}; restored late" if n.failed else "restored late"
        elif not n.detail:
            n.detail = "restored"
        n.offline_since = None
        self._clear(n, out)
        out.touch(r, now)
        if late:
            self._amend(r, n, now, out)

    @staticmethod
    def _prefix(n: Node) -> str:
        """A failed node's reason, kept in front of what went wrong with its restore."""
        return f"{n.detail}; " if n.failed and n.detail else ""

    @_moves
    def _unrestored(
        self,
        r: Rollout,
        n: Node,
        reason: str,
        now: float,
        out: _Out,
        keep_command: bool = False,
    ) -> None:
        n.restore = "unrestored"
        n.phase, n.detail = "rollback_failed", reason
        n.deadline = n.deadline_kind = None
        if not keep_command:
            self._clear(n, out)
        # else: an offline node keeps its retained rollback; it still restores when it returns.
        self._audit(r, "node_not_restored", f"{n.name} {reason}", out, node=n.name, command=n.command_id)
        out.touch(r, now)

    @_moves
    def _deferred(self, r: Rollout, n: Node, reason: str, now: float, out: _Out) -> None:
        """The node's update lock holds its apply back (``edge_agent.deferral``): waiting, not failing."""
        if n.failed or n.applied or n.phase in ("not_started", "deferred"):
            if n.phase == "deferred" and reason:
                n.detail = reason
            return
        n.queued = False
        n.phase, n.detail = "deferred", reason or "deferred"
        until = (n.issued_at if n.issued_at is not None else now) + _defer_window(r.spec)
        n.deadline, n.deadline_kind = until + DEFER_GRACE_S, "defer"
        self._audit(r, "node_deferred", f"{n.name} {n.detail}", out, node=n.name, until=until)
        out.touch(r, now)

    @_moves
    def _not_started(self, r: Rollout, n: Node, reason: str, now: float, out: _Out) -> None:
        """The node never started its apply (gave up deferring): final, not a failure; its command goes."""
        if n.failed or n.applied or n.phase == "not_started":
            return
        n.queued = False
        n.touched = False  # it changed nothing: nothing to restore
        n.withdrawn = True  # should it start after all, it gets an abort (see _late_start)
        n.phase, n.detail = "not_started", reason
        n.deadline = n.deadline_kind = None
        n.done_at = now
        self._clear(n, out)
        self._audit(r, "node_not_started", f"{n.name} {reason}", out, node=n.name, command=n.command_id)
        out.touch(r, now)

    @_moves
    def _late_start(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A node started an apply that was withdrawn (cleared) before it could: undo it."""
        n.withdrawn = False
        n.touched = True
        self._audit(
            r,
            "late_start",
            f"{n.name} started its withdrawn apply: sending abort",
            out,
            node=n.name,
            command=n.apply_id,
        )
        self._send_restore(r, n, "abort", now, out)
        self._progress(r, now, out)

    # ------------------------------------------------------------------ commands

    def _next_issued(self, node: str, now: float) -> float:
        last = self._issued.get(node)
        issued = now if last is None or now > last else last + ISSUE_STEP_S
        self._issued[node] = issued
        return issued

    def _command(self, r: Rollout, n: Node, action: CommandAction, now: float) -> Command:
        issued = self._next_issued(n.name, now)
        command = Command(
            id=self._new_id(),
            node=n.name,
            rollout=r.id,
            action=action,
            issued_at=issued,
            expires_at=issued + r.spec.expires_after_s,
            plan=r.plan if action == "apply" else [],
            defer_until=issued + _defer_window(r.spec) if action == "apply" and r.spec.max_defer_s else None,
        )
        n.command_id, n.action = command.id, action
        n.issued_at, n.expires_at = command.issued_at, command.expires_at
        n.cleared = False
        self._last[n.name] = command.id
        return command

    def _rebuild_command(self, r: Rollout, n: Node) -> Command:
        if n.command_id is None or n.action is None or n.issued_at is None or n.expires_at is None:
            raise InvalidInput(f"rollout {r.id}: node {n.name} has no complete command to publish again")
        return Command(
            id=n.command_id,
            node=n.name,
            rollout=r.id,
            action=n.action,
            issued_at=n.issued_at,
            expires_at=n.expires_at,
            plan=r.plan if n.action == "apply" else [],
            defer_until=(
                n.issued_at + _defer_window(r.spec) if n.action == "apply" and r.spec.max_defer_s else None
            ),
        )

    @_moves
    def _send_apply(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        command = self._command(r, n, "apply", now)
        n.apply_id = command.id
        if self._online.get(n.name, True):
            n.phase, n.detail, n.touched = "applying", "", True
            n.deadline, n.deadline_kind = command.issued_at + r.spec.node_timeout_s, "node"
        else:
            # DESIGN 3.1: an offline target's retained command waits for it until it expires.
            n.phase, n.detail, n.queued = "pending", "queued: node offline", True
            n.deadline, n.deadline_kind = command.expires_at, "expiry"
            if r.spec.start_deadline_s is not None:
                start_by = command.issued_at + r.spec.start_deadline_s
                n.deadline, n.deadline_kind = min(command.expires_at, start_by), "start"
        out.add(PublishCommand(n.name, command))
        out.touch(r, now)

    @_moves
    def _send_restore(
        self,
        r: Rollout,
        n: Node,
        action: CommandAction,
        now: float,
        out: _Out,
        phase: NodePhase = "rolling_back",
    ) -> None:
        command = self._command(r, n, action, now)
        n.restore = "waiting"
        n.lost_from = None
        offline = self._online.get(n.name) is False
        # An offline node keeps its retained command; show why it does not answer.
        n.phase = "offline" if phase == "rolling_back" and offline else phase
        n.deadline, n.deadline_kind = command.issued_at + r.spec.node_timeout_s, "restore"
        if offline:
            self._restore_offline(r, n, now, out)
        out.add(PublishCommand(n.name, command))
        out.touch(r, now)

    def _clear(self, n: Node, out: _Out) -> None:
        if n.cleared or n.command_id is None:
            return
        n.cleared = True
        # Only the latest command this hub sent to the node may be cleared: a newer
        # rollout's command must stay retained (DESIGN 3.2).
        if self._last.get(n.name) == n.command_id:
            out.add(ClearCommand(n.name, n.command_id))

    @_moves
    def _withdraw(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """Clear the retained apply of a node that never started it."""
        self._clear(n, out)
        n.queued = False
        n.withdrawn = True
        n.phase, n.detail = "pending", "withdrawn before it started"
        n.deadline = n.deadline_kind = None
        out.touch(r, now)

    # ------------------------------------------------------------------ rollout decisions

    def _progress(self, r: Rollout, now: float, out: _Out) -> None:
        """Take every decision the rollout's current facts allow."""
        if r.state in ("pending", "running", "paused"):
            self._check_failures(r, now, out)
        if r.state == "running":
            self._advance(r, now, out)
        if r.state in ("rolling_back", "aborting"):
            self._finish_restore(r, now, out)

    def _failure_text(self, r: Rollout) -> str:
        parts = [f"{name} {r.nodes[name].detail}" for name in r.failures[:5]]
        more = len(r.failures) - 5
        return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")

    def _check_failures(self, r: Rollout, now: float, out: _Out) -> None:
        policy = r.spec.failure
        if len(r.failures) <= policy.max_failed:
            return
        count = f" ({len(r.failures)} failed, max_failed {policy.max_failed})" if policy.max_failed else ""
        evidence = {name: r.nodes[name].detail for name in r.failures[:50]}
        if policy.on_failure == "halt":
            r.state = "halted"
            r.detail = f"halted: {self._failure_text(r)}{count}"
            for n in r.nodes.values():
                if n.queued:
                    self._withdraw(r, n, now, out)
            self._audit(r, "halted", r.detail, out, failures=evidence)
            out.touch(r, now)
            return
        self._start_restore(
            r,
            "rolling_back",
            f"rollback started: {self._failure_text(r)}{count}",
            now,
            out,
            retry=False,
            evidence=evidence,
        )

    def _start_restore(
        self,
        r: Rollout,
        state: Literal["rolling_back", "aborting"],
        reason: str,
        now: float,
        out: _Out,
        *,
        retry: bool,
        evidence: Mapping[str, Any] | None = None,
    ) -> None:
        """Coordinated rollback (DESIGN 3.4/3.5): abort the running, roll back the applied."""
        r.state = state
        r.detail = r.reason = reason
        r.cursors.pop("restore", None)
        kind = "rollback_started" if state == "rolling_back" else "abort_started"
        self._audit(r, kind, reason, out, failures=dict(evidence or {}))
        sent = {"abort": 0, "rollback": 0, "withdrawn": 0}
        for n in r.nodes.values():
            if n.queued:
                self._withdraw(r, n, now, out)
                sent["withdrawn"] += 1
            elif n.phase == "lost" and not n.failed:
                # Its restore is awaited like any offline node's (restore_timeout_s).
                action: CommandAction = "rollback" if n.lost_from == "succeeded" else "abort"
                self._send_restore(r, n, action, now, out)
                sent[action] += 1
            elif n.phase in ("applying", "deferred") and not n.failed:
                self._send_restore(r, n, "abort", now, out)
                sent["abort"] += 1
            elif n.restore in ("waiting", "restored"):
                continue  # restoring itself (or done): wait for it
            elif (n.applied and n.restore is None) or (retry and n.touched and n.restore == "unrestored"):
                self._send_restore(r, n, "rollback", now, out)
                sent["rollback"] += 1
        if any(sent.values()):
            self._audit(
                r,
                "commands_sent",
                f"sent abort to {sent['abort']}, rollback to {sent['rollback']} nodes; "
                f"withdrew {sent['withdrawn']} queued commands",
                out,
                abort=sent["abort"],
                rollback=sent["rollback"],
                withdrawn=sent["withdrawn"],
            )
        out.touch(r, now)
        self._finish_restore(r, now, out)

    def _finish_restore(self, r: Rollout, now: float, out: _Out) -> None:
        if not all_nodes(r, "restore", r.names, not_waiting):
            self._show_restore_wait(r, now, out)
            return
        touched = [n for n in r.nodes.values() if n.touched]
        unrestored = [n for n in touched if n.restore != "restored"]
        if r.state == "aborting" and not touched:
            r.state, r.detail = "aborted", "aborted before any node started"
            self._audit(r, "aborted", r.detail, out)
        elif not unrestored:
            r.state = "rolled_back"
            r.detail = f"rolled back: every touched node restored and verified ({len(touched)})"
            self._audit(r, "rolled_back", r.detail, out, restored=len(touched))
        else:
            r.state = "rollback_failed" if r.state == "rolling_back" else "aborted"
            names = ", ".join(f"{n.name} ({n.detail})" for n in unrestored[:20])
            more = f", +{len(unrestored) - 20} more" if len(unrestored) > 20 else ""
            r.detail = f"not restored: {names}{more}"
            self._audit(r, r.state, r.detail, out, not_restored={n.name: n.detail for n in unrestored[:100]})
        out.touch(r, now)

    def _show_restore_wait(self, r: Rollout, now: float, out: _Out) -> None:
        """Say which offline nodes the rollback waits for, and until when (DESIGN 3.4)."""
        if r.outage_since is not None:
            return  # the outage note says why
        away = [n for n in r.nodes.values() if n.restore == "waiting" and n.offline_since is not None]
        if not away:
            if r.detail.startswith(_WAIT_PREFIX):
                r.detail = r.reason
                out.touch(r, now)
            return
        first = min(away, key=lambda n: (n.deadline or 0.0, n.name))
        until = first.deadline if first.deadline is not None else now
        since = first.offline_since if first.offline_since is not None else now
        more = f"; +{len(away) - 1} more offline" if len(away) > 1 else ""
        note = f"{_WAIT_PREFIX}{first.name} (offline since {_clock(since)}) to restore, until {_clock(until)}"
        note += more
        if note != r.detail:
            r.detail = note
            self._audit(r, "restore_wait", note, out, nodes=[n.name for n in away[:50]], until=until)
            out.touch(r, now)

    def _amend(self, r: Rollout, n: Node, now: float, out: _Out) -> None:
        """A node restored after its rollout ended without it: the record says so (audit, state)."""
        unrestored = [m for m in r.nodes.values() if m.touched and m.restore == "unrestored"]
        message = f"{n.name} restored after all (verified); record amended"
        if not unrestored and r.state == "rollback_failed":
            restored = sum(1 for m in r.nodes.values() if m.touched)
            r.state = "rolled_back"
            r.detail = f"rolled back: every touched node restored and verified ({restored}); {n.name} late"
            message += ": every touched node is restored now"
        elif unrestored:
            names = ", ".join(f"{m.name} ({m.detail})" for m in unrestored[:20])
            more = f", +{len(unrestored) - 20} more" if len(unrestored) > 20 else ""
            r.detail = f"not restored: {names}{more}"
        self._audit(r, "late_restore", message, out, node=n.name, command=n.command_id, state=r.state)
        out.touch(r, now)

    def _repace(self, r: Rollout, out: _Out) -> None:
        """Adaptive pace (``bus.pace``): size the waves left from how this one went; audit why."""
        adaptive = r.spec.strategy.adaptive
        assert adaptive is not None  # noqa: S101 - the caller checked
        names = r.waves[r.wave]
        failed = sum(1 for name in names if r.nodes[name].failed)
        done = sum(1 for name in names if r.nodes[name].applied and not r.nodes[name].failed)
        pace = next_pace(adaptive, len(r.nodes), len(names), r.wave + 1, done, failed)
        left = resplit([name for wave in r.waves[r.wave + 1 :] for name in wave], pace.size)
        r.waves[r.wave + 1 :] = left
        for number, wave in enumerate(left, r.wave + 1):
            for name in wave:
                r.nodes[name].wave = number
        kind = "pace_changed" if pace.change in ("grow", "shrink") else "pace_held"
        self._audit(
            r,
            kind,
            pace.reason,
            out,
            wave=r.wave + 1,
            change=pace.change,
            next_size=pace.size,
            failed=failed,
            waves_left=len(left),
        )

    def _window_ready(
        self, r: Rollout, names: Sequence[str], waiting: list[str], now: float, out: _Out
    ) -> list[str]:
        """Maintenance windows (``hub.core.windows``): which of ``waiting`` may start now, each in its zone.

        A node starts only inside its own window. When the window closes before
        its turn came (``max_parallel``), ``on_window_end: finish`` still sends it
        (the wave finishes) and ``pause`` holds it for its next window. A node
        whose window has not opened yet always waits. ``window_at`` is when the
        next one opens (the timer wakes the rollout then).
        """
        schedule = r.schedule if r.schedule is not None else schedule_of(r.spec)
        r.schedule = schedule
        if schedule is None:
            return waiting
        started = len(waiting) < len(names)  # a node of the wave has its command (or failed with it)
        finish = r.spec.on_window_end == "finish"
        ready: list[str] = []
        soonest: tuple[float, str | None] | None = None
        for name in waiting:
            n = r.nodes[name]
            is_open, when = schedule.state(n.tz, now)
            if is_open:
                if not n.window_seen:
                    n.window_seen = True
                    out.touch(r, now)
                ready.append(name)
            elif finish and n.window_seen:
                ready.append(name)
            elif when is not None and (soonest is None or when < soonest[0]):
                soonest = (when, n.tz)
        r.window_at = soonest[0] if soonest is not None else None
        if ready:
            if r.window_note and r.detail == r.window_note:
                r.detail = ""
            r.window_note = ""
            return ready
        opens = "no window opens"
        if soonest is not None:
            opens = f"the next opens {schedule.describe(soonest[1], soonest[0])}"
        if started:
            note = f"window closed: wave {r.wave + 1} paused with {len(waiting)} node(s) not started; {opens}"
        else:
            note = f"wave {r.wave + 1} waits for a maintenance window ({len(waiting)} node(s)); {opens}"
        if note != r.window_note:
            r.window_note = r.detail = note
            self._audit(r, "window_wait", note, out, wave=r.wave + 1, opens_at=r.window_at)
            out.touch(r, now)
        return ready

    def _advance(self, r: Rollout, now: float, out: _Out) -> None:
        """Dispatch within the current wave, and move on once it is done and soaked."""
        soak = r.spec.strategy.soak_s
        for _ in range(len(r.waves) + 1):
            names = r.waves[r.wave]
            if r.dispatched != r.wave and r.outage_since is None:
                # (A node never loses its command nor its failure: once none waits, none will.)
                nodes = r.nodes
                waiting = [n for n in names if nodes[n].command_id is None and not nodes[n].failed]
                sent = 0
                if waiting:
                    busy = sum(1 for n in r.nodes.values() if n.is_open)
                    ready = self._window_ready(r, names, waiting, now, out) if r.spec.windows else waiting
                    for name in dispatchable(ready, busy, r.spec.strategy.max_parallel):
                        self._send_apply(r, r.nodes[name], now, out)
                        sent += 1
                if sent == len(waiting):
                    r.dispatched = r.wave
                    r.window_at = None
            if not all_nodes(r, f"wave{r.wave}", names, wave_done):
                return
            if r.wave_done_at is None:
                r.wave_done_at = now
                out.touch(r, now)
                if soak > 0:
                    self._audit(
                        r,
                        "soak_started",
                        f"wave {r.wave + 1} done; soaking {_seconds(soak)}",
                        out,
                        wave=r.wave + 1,
                    )
            if soak > 0 and now < max(r.wave_done_at + soak, r.hold_until):
                return
            if r.spec.strategy.adaptive is not None and r.wave + 1 < len(r.waves):
                self._repace(r, out)
            if r.wave + 1 < len(r.waves):
                r.wave += 1
                r.wave_done_at = None
                self._audit(
                    r,
                    "wave_started",
                    f"wave {r.wave + 1} of {len(r.waves)} started ({len(r.waves[r.wave])} nodes)",
                    out,
                    wave=r.wave + 1,
                    nodes=r.waves[r.wave][:50],
                )
                out.touch(r, now)
                continue
            r.state = "succeeded"
            tolerated = len(r.failures)
            r.detail = (
                f"succeeded with {tolerated} failed nodes (max_failed {r.spec.failure.max_failed})"
                if tolerated
                else f"succeeded on {len(r.nodes)} nodes"
            )
            idle = sum(1 for n in r.nodes.values() if n.phase == "not_started")
            if idle:
                r.detail += f"; {idle} not started (deferred or offline: not failures)"
            self._audit(r, "succeeded", r.detail, out, failed=r.failures[:50])
            out.touch(r, now)
            return


#: How far a step got: a report never moves a step back (snapshots are coalesced and may
#: arrive after the step reports they cover), and a failure stays shown once undone.
_STEP_RANK = {"pending": 0, "deferred": 0, "running": 1, "succeeded": 2, "skipped": 2, "rolled_back": 3,
              "failed": 4, "rejected": 4}  # fmt: skip
_STEP_DETAIL_LIMIT = 200


def _mark(r: Rollout, n: Node, index: int, state: str, detail: str) -> bool:
    """Fold one step's reported state into the node's grid; True when it changed."""
    if not 0 <= index < len(r.plan) or state not in _STEP_RANK:
        return False
    if not n.grid:
        n.grid = [["pending", ""] for _ in r.plan]
    old_state, old_detail = n.grid[index]
    if _STEP_RANK[state] < _STEP_RANK[old_state]:
        return False
    if state == old_state and (old_detail or not detail):
        return False  # the first reason of a state is the one that says why
    text = meaningful(detail) if state in ("failed", "rejected") else detail.strip()
    grid = list(n.grid)  # assigned, not changed in place: the node is marked stale (``Node``)
    grid[index] = [state, text[:_STEP_DETAIL_LIMIT]]
    n.grid = grid
    return True


def _copied(value: Any) -> Any:
    return [list(cell) for cell in value] if isinstance(value, list) else value


#: A node's summary row: (phase shown, step, detail, failed or not restored).
_Row = tuple[NodePhase, int | None, str, bool]


class _RowTable:
    """A rollout's summary rows and counts, a row made again only for a node marked stale."""

    def __init__(self, final: bool) -> None:
        self.final = final
        self.rows: dict[str, _Row] = {}
        self._keys: dict[str, tuple[str, ...]] = {}  # per node: the counts it is in
        self._counts = dict.fromkeys(RolloutCounts.model_fields, 0)

    def update(self, r: Rollout) -> tuple[dict[str, _Row], dict[str, int]]:
        """Copies of the rows (in the rollout's node order) and of the counts, as of now."""
        rows, keys_of, counts = self.rows, self._keys, self._counts
        for name, node in r.nodes.items():
            if not node.stale & STALE_ROW and name in rows:
                continue
            phase = _shown_phase(node, self.final)
            keys = _counted_as(node, phase)
            for key in keys_of.get(name, ()):
                counts[key] -= 1
            for key in keys:
                counts[key] += 1
            keys_of[name] = keys
            rows[name] = (phase, node.step, node.detail, "failed" in keys or "rollback_failed" in keys)
            node.fresh(STALE_ROW)
        return dict(rows), dict(counts)


def _shown_phase(n: Node, final: bool) -> NodePhase:
    """The node's phase as people read it: a finished rollout has no ``pending`` node (DESIGN 3.11)."""
    return "not_started" if final and n.phase == "pending" else n.phase


#: The count of a node that neither failed nor was sent a restore, by its phase.
_COUNTED_AS: dict[str, str] = {
    "pending": "pending",
    "applying": "running",
    "rolling_back": "running",
    "succeeded": "succeeded",
    "lost": "lost",
    "offline": "running",
    "deferred": "deferred",
    "not_started": "not_started",
}


def _counted_as(n: Node, phase: NodePhase) -> tuple[str, ...]:
    """The counts a node is in (DESIGN 3.11): a failed node stays failed once restored.

    ``failed`` counts every node that failed (rejected, timed out, offline past
    its grace); ``rolled_back`` every node whose restore is verified (a failed
    one included) and ``rollback_failed`` every node whose restore failed or
    could not be verified; a node on its way back that did not fail is running.
    """
    keys: list[str] = []
    if n.failed:
        keys.append("failed")
    if n.restore == "restored" and phase != "rejected":
        keys.append("rolled_back")
    elif n.restore == "unrestored":
        keys.append("rollback_failed")
    elif n.restore == "waiting" and not n.failed:
        keys.append("lost" if phase == "lost" else "running")
    if not keys:
        keys.append(_COUNTED_AS.get(phase, "pending"))
    return tuple(keys)
