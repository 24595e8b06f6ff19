"""The rollout manager: feeds ``hub.core.engine.RolloutEngine`` and carries out its actions.

``hub.service`` hands it requests (decoded and validated at the edge:
``hub.requests``), node reports (decoded once, by the hub) and presence
transitions; it turns each into an engine event under one lock (so actions
leave in the order the engine decided them), then:

- ``PublishCommand``: the store is flushed first (durable before visible,
  DESIGN 3.6: a restarted hub must know every command it ever sent, so it
  never issues a second apply for the same rollout), then the command is
  signed and published retained on the node's ``cmd`` topic.
- ``ClearCommand``: an empty retained payload on the node's ``cmd`` topic.
- ``Audit``: an entry in the store's ``audit`` table and an ``Event`` (QoS 0).
- ``RolloutChanged``: the rollout's record is put in the store and its
  retained ``RolloutSummary`` published, both coalesced: at most one of each
  per rollout per ``summary_interval_s``, the latest state always last. The
  job snapshots the agents keep retained cover what a crash loses in between.

A timer task sleeps until the engine's next deadline (node timeouts, expiry,
soak) and feeds it a ``Tick``.

With ``keep_rollouts``, finished rollouts beyond the newest that many are
archived (``hub.retention``): out of the engine, the store and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus import params
from bus.errors import BusError, Conflict, FleetError, InvalidInput, NotFound
from bus.messages import (
    Event,
    JobSnapshot,
    NodePhase,
    NodeSummary,
    RolloutSpec,
    RolloutSummary,
    StepStatus,
    TargetLabels,
    encode,
    new_id,
)
from bus.publisher import Publish
from bus.signing import CommandSigner
from bus.topics import Topics
from hub.core.engine import (
    FINAL_STATES,
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
    RolloutEngine,
    RolloutsLoaded,
    SnapshotReported,
    StepReported,
    Tick,
    check_record,
)
from hub.core.plan import LabelSource, labels_from
from hub.core.state import EncodedRecord
from hub.idempotency import IdempotencyIndex
from hub.plan import Planner
from hub.requests import (
    CreateRollout,
    ListRollouts,
    PlanRollout,
    RolloutOperation,
    RolloutRequest,
    rollout_request,
)
from hub.retention import Archive
from hub.standby import RecordSplitter

__all__ = ["FleetView", "RolloutManager", "RolloutStore"]

_LOGGER = logging.getLogger(__name__)

#: Longest nap of the timer: a wall-clock jump is noticed within this.
_MAX_SLEEP_S = 30.0
#: Pause after a tick, so a deadline that stays due cannot spin the loop.
_TICK_FLOOR_S = 0.01
#: After events woke the timer, look for the next deadline only this much later: a
#: rollout's reports come in bursts (a thousand nodes), and each look scans its nodes.
_RECHECK_S = 0.02
#: ... or later, so that looking takes at most this share of the hub's time.
_SCAN_SHARE = 0.02
#: A summary round may take at most this share of the time: big rollouts publish
#: their summary less often (its bytes grow with the nodes; fixed-rate publishing
#: would make the bytes of one rollout grow with the square of its size).
_SUMMARY_SHARE = 0.05
#: ... and publish at most about this many summary bytes a second.
_SUMMARY_BYTES_PER_S = 200_000
#: Events waiting for the engine before reports wait for room (back-pressure on the bus).
_QUEUE_LIMIT = 10_000
#: Events handled before their actions are carried out (one store flush per batch).
_BATCH_LIMIT = 1000
#: Actions carried out between two yields to the event loop (a wave of 1000 commands).
_YIELD_EVERY = 50
#: Audit entries a ``show`` reply carries (the latest ones; replies are size-bounded).
_SHOWN_AUDIT = 200
_LISTED = 20
#: The retained summary (and ``list``) of a rollout of more nodes than this carries this
#: many of them, those that need attention first, and ``nodes_total``; every node's
#: changes go out on ``rollout/{id}/nodes`` and ``show`` answers with every node.
SUMMARY_NODES = 200
#: Nodes per ``RolloutNodes`` message (about 60 bytes each: well within the payload limit).
_CHANGES_PER_MESSAGE = 2000
#: Which nodes a bounded summary keeps first: failed ones, then by phase (trouble, then work
#: in progress), then the rest.
_ATTENTION: dict[str, int] = {
    "rollback_failed": 0,
    "failed": 1,
    "timed_out": 1,
    "rejected": 1,
    "lost": 2,
    "offline": 2,
    "rolling_back": 3,
    "rolled_back": 4,
    "applying": 5,
    "deferred": 6,
}

#: (phase, step, detail, failed) of one node (``RolloutEngine.summary_rows``)
Row = tuple[NodePhase, "int | None", str, bool]


def bounded_summary(head: RolloutSummary, rows: dict[str, Row], limit: int = SUMMARY_NODES) -> RolloutSummary:
    """``head`` (``RolloutEngine.summary_rows``) with its nodes: all, or ``limit`` and ``nodes_total``."""
    kept: list[tuple[str, Row]]
    if len(rows) <= limit:
        kept = list(rows.items())
        total = None
    else:
        kept = heapq.nsmallest(
            limit, rows.items(), key=lambda item: (not item[1][3], _ATTENTION.get(item[1][0], 9), item[0])
        )
        kept.sort()
        total = len(rows)
    nodes = {name: NodeSummary.model_construct(phase=p, step=s, detail=d) for name, (p, s, d, _) in kept}
    return head.model_copy(update={"nodes": nodes, "nodes_total": total})


def changes_payloads(rollout: str, seq: int, ts: float, changed: dict[str, Row]) -> list[bytes]:
    """``RolloutNodes`` payloads of ``changed`` (seq, seq+1, ...), defaults left out to save bytes."""
    names = list(changed)
    payloads = []
    for index, start in enumerate(range(0, len(names), _CHANGES_PER_MESSAGE)):
        nodes: dict[str, dict[str, Any]] = {}
        for name in names[start : start + _CHANGES_PER_MESSAGE]:
            phase, step, detail, _ = changed[name]
            cell: dict[str, Any] = {"phase": phase}
            if step is not None:
                cell["step"] = step
            if detail:
                cell["detail"] = detail
            nodes[name] = cell
        body = {"v": 1, "rollout": rollout, "seq": seq + index, "ts": ts, "nodes": nodes}
        payloads.append(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return payloads


class FleetView(LabelSource, Protocol):
    """What the manager needs of ``hub.core.registry.Registry`` (``get``: a node's labels)."""

    def is_online(self, node: str) -> bool:
        """True when ``node`` is online."""

    def resolve(self, targets: list[str] | TargetLabels | Literal["all"]) -> tuple[list[str], list[str]]:
        """(known nodes, unknown names) of a rollout's targets."""


class RolloutStore(Protocol):
    """What the manager needs of ``hub.store.Store``."""

    def put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        """Insert or replace one document (in memory; on disk at the next commit)."""

    def put_encoded(self, table: str, key: str, text: str) -> None:
        """``put`` of a document already encoded as a JSON object's text."""

    def all(self, table: str) -> list[dict[str, Any]]:
        """Every document of ``table``."""

    def append(self, table: str, doc: dict[str, Any]) -> Any:
        """Add a document under a new key."""

    def delete(self, table: str, key: str) -> None:
        """Remove one document."""

    def items(self, table: str) -> list[tuple[str, dict[str, Any]]]:
        """Every (key, document) of ``table``."""

    async def flush(self) -> None:
        """Return once everything put so far is on disk."""


def _listed(names: list[str]) -> str:
    more = f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


class RolloutManager:
    """Runs every rollout of the hub (see the module docstring).

    Args:
        topics: the topic prefix in use.
        publish: ``bus.mqtt.MqttClient.publish`` (or the hub's wrapper of it).
        store: the hub's store (tables ``rollouts`` and ``audit``).
        registry: fleet presence, to resolve and check targets.
        signing_key: the hub's Ed25519 key; every command is signed with it.
        clock: wall-clock seconds; commands carry ``issued_at``/``expires_at`` from it.
        new_id: id factory for rollouts and commands.
        resume_grace_s: after a restart, how long timeouts wait for retained snapshots.
        summary_interval_s: at most one summary publish (and record put) per rollout this often.
        summary_nodes: a rollout of more nodes has only this many in its retained summary and
            in ``list`` (``bounded_summary``); each node's changes go on ``rollout/{id}/nodes``.
        keep_rollouts: how many finished rollouts stay; older ones go to ``archive``
            (``hub.retention``). None: every rollout stays.
        archive: the archive of retired rollouts (needed with ``keep_rollouts``).
        offline_grace_s: how long a node offline mid-job is ``lost`` before it fails,
            when its spec leaves ``offline_grace_s`` unset (3 heartbeats plus the keepalive).
        outage_limit_s: how long a broker event (many nodes lost at once, or the
            hub's own connection) may hold a rollout before it halts for the operator.
        term: the active hub's term (DESIGN 3.9), signed into every command; with a
            term, each rollout's full record is also kept retained on the broker
            (``rollout/{id}/record``) before any command it names, for the standbys.
    """

    def __init__(
        self,
        *,
        topics: Topics,
        publish: Publish,
        store: RolloutStore,
        registry: FleetView,
        signing_key: Ed25519PrivateKey,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_id,
        resume_grace_s: float = 5.0,
        summary_interval_s: float = 0.075,
        keep_rollouts: int | None = None,
        archive: Archive | None = None,
        offline_grace_s: float = 25.0,
        outage_limit_s: float = 300.0,
        term: int = 0,
        summary_nodes: int = SUMMARY_NODES,
    ) -> None:
        if keep_rollouts is not None and archive is None:
            raise ValueError("keep_rollouts needs an archive")
        self._topics = topics
        self._publish = publish
        self._store = store
        self._registry = registry
        self._signer = CommandSigner(signing_key)
        self._clock = clock
        self._new_id = new_id
        self._interval = summary_interval_s
        self._summary_nodes = summary_nodes
        self._engine = RolloutEngine(
            new_id=new_id,
            resume_grace_s=resume_grace_s,
            offline_grace_s=offline_grace_s,
            outage_limit_s=outage_limit_s,
        )
        self._idempotent = IdempotencyIndex()
        self._planner = Planner(
            topics=topics,
            publish=publish,
            resolve=registry.resolve,
            is_online=registry.is_online,
            busy=self._engine.busy,
            signing_key=signing_key,
            clock=clock,
            new_id=new_id,
            labels=labels_from(registry),
            offline_grace_s=offline_grace_s,
        )
        self._queue: asyncio.Queue[tuple[EngineEvent, asyncio.Future[None] | None]] = asyncio.Queue(
            _QUEUE_LIMIT
        )
        self._dirty: dict[str, None] = {}
        self._dirty_event = asyncio.Event()
        self._urgent = asyncio.Event()
        self._published_states: dict[str, str] = {}
        #: per rollout: every node's row as last published on ``rollout/{id}/nodes``, and that seq
        self._published_rows: dict[str, dict[str, Row]] = {}
        self._changes_seq: dict[str, int] = {}
        self._records = RecordSplitter()  # what of each retained record went out last
        self._oversized: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._keep = keep_rollouts
        self._archive = archive
        self._term = term
        # A record is put and published only between batches of actions: never ahead of
        # a command or a clear that the same batch decided (a standby, or a restarted
        # hub, would take the record's word for a clear that never reached the broker).
        self._acting = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reload every rollout from the store, resume the non-final ones, start the timers."""
        if self._running:
            return
        records = []
        for record in self._store.all("rollouts"):
            problem = check_record(record)
            if problem is not None:
                _LOGGER.error("skipping stored rollout: %s", problem)
                continue
            records.append(record)
        await self._process([(RolloutsLoaded(tuple(records)), None)])
        self._idempotent.load(records)
        await self._retire()  # a lower keep_rollouts than last time, or a crash mid-retirement
        self._running = True
        for coro, name in (
            (self._event_loop(), "rollouts-events"),
            (self._timer_loop(), "rollouts-timer"),
            (self._summary_loop(), "rollouts-summaries"),
        ):
            task = asyncio.create_task(coro, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        resumed = [rid for rid in self._engine.rollout_ids() if self._engine.state(rid) not in FINAL_STATES]
        _LOGGER.info("rollouts: %d loaded, %d resumed", len(records), len(resumed))

    async def stop(self) -> None:
        """Stop the timers; put and publish the latest state of every changed rollout."""
        self._running = False
        # Python < 3.12's wait_for may swallow a cancel that races with the event it
        # waits for: the loops also stop on the flag, and the wake-up gets them there.
        self._wake.set()
        self._dirty_event.set()
        self._urgent.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # What was queued still counts (a report, a request waiting for its answer).
        left = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        if left:
            await self._process(left)
        await self._flush_summaries()

    # ------------------------------------------------------------------ queries

    def summaries(self) -> list[RolloutSummary]:
        """Every rollout, newest first; a big one with a bounded part of its nodes (``bounded_summary``)."""
        rollouts = reversed(self._engine.rollout_ids())
        return [bounded_summary(*self._engine.summary_rows(rid), self._summary_nodes) for rid in rollouts]

    def is_issued(self, node: str, rollout: str, command: str) -> bool:
        """Whether a node's report names a command this hub sent it (what feeds metrics)."""
        return self._engine.is_issued(rollout, node, command)

    def summary(self, rollout_id: str) -> RolloutSummary:
        """One rollout's summary; NotFound if unknown."""
        return self._engine.summary(rollout_id)

    def audit(self, rollout_id: str) -> list[dict[str, Any]]:
        """The audit entries of one rollout, oldest first; NotFound if unknown."""
        self._engine.state(rollout_id)  # NotFound
        return [entry for entry in self._store.all("audit") if entry.get("rollout") == rollout_id]

    # ------------------------------------------------------------------ requests

    async def request(self, op: str, body: Any) -> Any:
        """Answer one rollout request in its wire form: ``handle(rollout_request(op, body))``."""
        return await self.handle(rollout_request(op, body))

    async def handle(self, request: RolloutRequest) -> Any:
        """Answer one rollout request, decoded at the edge (``hub.requests``).

        Returns:
            ``{"rollout": id}`` for create (plus ``"existing": true`` when its
            ``idempotency_key`` named an earlier rollout); ``{"rollout", "state"}`` for the
            operations; for ``show`` the summary plus its ``plan``, every node's
            step grid (``steps``: ``{node: [{index, type, state, detail}]}``) and the latest
            ``audit`` entries; for ``list`` every summary, newest first; for ``plan``
            the plan with every node's pre-flight (nothing started); as JSON values.

        Raises:
            InvalidInput: a plan naming labels a target lacks, or a rollout id prefix
                that several rollouts share (named).
            Conflict: unknown, offline or busy targets (``exc.nodes``), a request the
                rollout's state does not allow, or an idempotency key used for another spec.
            NotFound: an unknown rollout id (any unique prefix of one is accepted).
        """
        match request:
            case CreateRollout(spec=spec):
                return await self._create(spec)
            case PlanRollout():
                return await self._planner.plan(request)
            case ListRollouts():
                return [summary.model_dump(mode="json") for summary in self.summaries()]
            case RolloutOperation(op="show", rollout=given, offset=offset, limit=limit):
                return await self._show(given, offset, limit)
            case RolloutOperation(op=op, rollout=given):
                return await self._operate(op, given)

    async def _show(self, given: str, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One rollout: its summary, plan, step grid and latest audit; or one page of its nodes.

        With ``offset``/``limit`` the nodes (sorted by id) and their step grids are that
        page's, with ``nodes_total`` and ``offset``; the audit comes with the first page.
        """
        rollout = await self._resolved(given)
        summary = self.summary(rollout)
        if offset == 0 and limit is None:
            return {
                **summary.model_dump(mode="json"),
                "plan": self._engine.plan(rollout),
                "steps": self._engine.steps(rollout),
                "audit": self.audit(rollout)[-_SHOWN_AUDIT:],
            }
        names = sorted(summary.nodes)
        page = names[offset : None if limit is None else offset + limit]
        grids = self._engine.steps(rollout, limit=len(names) * len(self._engine.plan(rollout)) + 1)
        head = summary.model_copy(update={"nodes": {n: summary.nodes[n] for n in page}})
        return {
            **head.model_dump(mode="json"),
            "nodes_total": len(names),
            "offset": offset,
            "plan": self._engine.plan(rollout),
            "steps": {n: grids[n] for n in page if n in grids},
            "audit": self.audit(rollout)[-_SHOWN_AUDIT:] if offset == 0 else [],
        }

    async def _resolved(self, given: str) -> str:
        """The rollout ``given`` names (an id or a unique prefix); NotFound saying where it went."""
        if not self._engine.has(given) and self._archive is not None and await self._archive.holds(given):
            raise NotFound(
                f"rollout {given[:80]} is archived in {self._archive.path} "
                f"(the hub keeps the newest {self._keep} finished rollouts)"
            )
        return self._engine.resolve(given)  # a unique prefix names its rollout (issue 20.5)

    async def _operate(self, op: str, given: str) -> dict[str, Any]:
        if op == "show":
            return await self._show(given)
        rollout = await self._resolved(given)
        await self._run(_REQUESTS[op](rollout))
        return {"rollout": rollout, "state": self._engine.state(rollout)}

    def _check_labels_of(self, spec: RolloutSpec, targets: list[str]) -> None:
        """Refuse a plan naming ``{labels.NAME}`` that a target lacks (DESIGN 3.10), naming them."""
        plan = [step.model_dump(mode="json") for step in spec.plan]
        lacking = params.lacking_labels(plan, targets, labels_from(self._registry))
        if lacking:
            shown = params.lacking_text(lacking)
            raise InvalidInput(f"the plan names labels some targets do not have: {shown[:500]}")

    async def _create(self, spec: RolloutSpec) -> dict[str, Any]:
        """Start a rollout of ``spec`` unless its idempotency key names an earlier one (hub.idempotency)."""
        key = spec.idempotency_key
        if key is None:
            return {"rollout": await self._start(spec)}
        async with self._idempotent.serialised(key):
            earlier = self._idempotent.earlier(spec)
            if earlier is not None:
                return {"rollout": earlier, "existing": True}
            rollout = await self._start(spec)
            self._idempotent.add(spec, rollout)
            return {"rollout": rollout}

    async def _start(self, spec: RolloutSpec) -> str:
        known, unknown = self._registry.resolve(spec.targets)
        if unknown:
            raise Conflict(f"unknown targets: {_listed(unknown)}", nodes=unknown)
        if not known:
            raise Conflict("the targets match no known node")
        self._check_labels_of(spec, known)
        online = frozenset(node for node in known if self._registry.is_online(node))
        if spec.require_online:
            offline = [node for node in known if node not in online]
            if offline:
                raise Conflict(
                    f"offline targets: {_listed(offline)} (set require_online false to queue them)",
                    nodes=offline,
                )
        rollout = self._new_id()
        zones: dict[str, str] = {}
        if spec.windows:  # each node's windows are in its own zone: its tz label (hub.core.windows)
            labels = labels_from(self._registry)
            zones = {node: tz for node in known if (tz := labels(node).get("tz"))}
        await self._run(RolloutCreated(rollout, spec, tuple(known), online, zones))
        _LOGGER.info("rollout %s (%s) created on %d nodes", rollout, spec.name, len(known))
        return rollout

    # ------------------------------------------------------------------ bus input

    async def on_report(self, node: str, report: StepStatus | JobSnapshot) -> None:
        """A node's ``StepStatus`` or retained ``JobSnapshot``, decoded by the hub (``hub.service``).

        A report that names another node than the topic's costs a log line only.
        """
        if report.node != node:
            _LOGGER.warning("report on %s's topic names node %r: ignored", node, report.node)
            return
        if isinstance(report, StepStatus) and self._planner.take(node, report):
            return  # a pre-flight's answer (hub.plan)
        if not self._engine.has(report.rollout):
            return  # another hub's, or a rollout this hub no longer keeps
        event: EngineEvent = (
            StepReported(node, report) if isinstance(report, StepStatus) else SnapshotReported(node, report)
        )
        await self._submit(event)

    async def on_presence(self, node: str, online: bool) -> None:
        """A registry transition: online (birth, heartbeat) or offline (will, shutdown, missed heartbeats)."""
        await self._submit(PresenceChanged(node, online))

    async def on_broker(self, connected: bool) -> None:
        """The hub's own broker connection went down or came back (a broker event, DESIGN 3.4)."""
        await self._submit(BrokerChanged(connected))

    # ------------------------------------------------------------------ running the engine

    async def _submit(self, event: EngineEvent) -> None:
        """Queue a report: handled in order, in the next batch (back-pressure when the queue is full)."""
        if not self._running:
            await self._process([(event, None)])
            return
        await self._queue.put((event, None))

    async def _run(self, event: EngineEvent) -> None:
        """Queue a request and wait until its actions are carried out (its error raised here)."""
        if not self._running:
            await self._process([(event, None)])
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((event, done))
        await done

    async def _event_loop(self) -> None:
        """Handle every queued event in order, a batch at a time: one store flush per batch."""
        while self._running:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH_LIMIT and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._process(batch)

    async def _process(self, batch: list[tuple[EngineEvent, asyncio.Future[None] | None]]) -> None:
        actions: list[Action] = []
        outcomes: list[tuple[asyncio.Future[None] | None, BaseException | None]] = []
        for event, done in batch:
            try:
                actions += self._engine.handle(event, self._clock())
            except FleetError as exc:
                outcomes.append((done, exc))
                if done is None:
                    _LOGGER.warning("%s refused: %s", type(event).__name__, exc.reason)
                continue
            except Exception as exc:
                _LOGGER.exception("rollout engine failed on %s", type(event).__name__)
                outcomes.append((done, exc))
                continue
            outcomes.append((done, None))
        failure: BaseException | None = None
        try:
            async with self._acting:
                await self._execute(actions)
        except asyncio.CancelledError:
            failure = FleetError("the hub is stopping: request not carried out")
            raise
        except Exception:
            # A bug, not an input: log it, fail the waiting requests, keep serving.
            _LOGGER.exception("carrying out rollout actions failed")
            failure = FleetError("internal error while carrying out the request")
        finally:
            for done, error in outcomes:
                if done is None or done.done():
                    continue
                if error is None and failure is None:
                    done.set_result(None)
                else:
                    done.set_exception(error or failure or FleetError("failed"))
            self._wake.set()

    async def _execute(self, actions: list[Action]) -> None:
        changed = list(dict.fromkeys(a.rollout for a in actions if isinstance(a, RolloutChanged)))
        if any(isinstance(a, PublishCommand) for a in actions):
            # Durable before visible: the record naming a command is on disk before
            # the command is on the broker.
            records = {rollout: self._engine.encoded_record(rollout) for rollout in changed}
            for rollout, record in records.items():
                self._store.put_encoded("rollouts", rollout, record.text)
            try:
                await self._store.flush()
            except FleetError as exc:
                _LOGGER.error("rollout state not on disk before publishing commands: %s", exc.reason)  # noqa: TRY400
            # ... and on the broker, ahead of the commands on the same connection, for a
            # standby that takes over (DESIGN 3.9).
            commanded = {a.command.rollout for a in actions if isinstance(a, PublishCommand)}
            for rollout in dict.fromkeys([*changed, *commanded]):
                await self._publish_record(rollout, records.get(rollout))
        for index, action in enumerate(actions, 1):
            try:
                await self._carry_out(action)
            except BusError as exc:
                _LOGGER.warning("could not publish for %s: %s", getattr(action, "rollout", "?"), exc.reason)
            if index % _YIELD_EVERY == 0:
                # Let what is signed leave now (the nodes start while the rest is signed)
                # and the bus be read meanwhile; batches are still carried out one at a
                # time, in order, by the one event task.
                await asyncio.sleep(0)
        for rollout in changed:
            self._dirty[rollout] = None
            if self._published_states.get(rollout) != self._engine.state(rollout):
                self._urgent.set()  # a new rollout state is news: no coalescing delay
        if changed:
            self._dirty_event.set()

    async def _carry_out(self, action: Action) -> None:
        if isinstance(action, PublishCommand):
            command = action.command
            payload = self._signer.payload(command, self._term)
            _LOGGER.debug("%s %s -> %s (%s)", command.action, command.rollout, action.node, command.id)
            await self._publish(self._topics.node(action.node, "cmd"), payload, qos=1, retain=True)
        elif isinstance(action, ClearCommand):
            await self._publish(self._topics.node(action.node, "cmd"), b"", qos=1, retain=True)
        elif isinstance(action, Audit):
            now = self._clock()
            _LOGGER.info("rollout %s: %s", action.rollout, action.message)
            self._store.append(
                "audit",
                {
                    "rollout": action.rollout,
                    "ts": now,
                    "kind": action.kind,
                    "message": action.message,
                    "node": action.node,
                    "evidence": dict(action.evidence),
                },
            )
            event = Event(
                ts=now, kind=action.kind, message=action.message, rollout=action.rollout, node=action.node
            )
            await self._publish(self._topics.events, encode(event), qos=0)

    # ------------------------------------------------------------------ background tasks

    async def _flush_summaries(self) -> int:
        """Put and publish every changed rollout; return the bytes published."""
        async with self._acting:
            return await self._flush_dirty()

    async def _flush_dirty(self) -> int:
        dirty = list(self._dirty)
        self._dirty.clear()
        published = 0
        for rollout in dirty:
            record = self._engine.encoded_record(rollout)
            self._store.put_encoded("rollouts", rollout, record.text)
            head, rows = self._engine.summary_rows(rollout)
            self._published_states[rollout] = head.state
            await self._publish_record(rollout, record)
            # Per-node changes first, then the summary that counts them (one connection, in order).
            published += await self._publish_changes(rollout, rows)
            payload = encode(bounded_summary(head, rows, self._summary_nodes))
            try:
                await self._publish(self._topics.rollout(rollout), payload, qos=1, retain=True)
            except BusError as exc:
                _LOGGER.warning("summary of %s not published: %s", rollout, exc.reason)
            published += len(payload)
        if any(self._published_states.get(rollout) in FINAL_STATES for rollout in dirty):
            await self._retire()
        return published

    async def _publish_changes(self, rollout: str, rows: dict[str, Row]) -> int:
        """The nodes whose row changed since the last round, on ``rollout/{id}/nodes``; the bytes sent."""
        before = self._published_rows.get(rollout, {})
        changed = {name: row for name, row in rows.items() if before.get(name) != row}
        self._published_rows[rollout] = rows
        if not changed:
            return 0
        seq = self._changes_seq.get(rollout, 0) + 1
        payloads = changes_payloads(rollout, seq, self._clock(), changed)
        self._changes_seq[rollout] = seq + len(payloads) - 1
        topic = self._topics.rollout_nodes(rollout)
        for payload in payloads:
            try:
                await self._publish(topic, payload, qos=1)
            except BusError as exc:
                _LOGGER.warning("node changes of %s not published: %s", rollout, exc.reason)
        return sum(len(p) for p in payloads)

    async def _publish_record(self, rollout: str, record: EncodedRecord | None = None) -> None:
        """The rollout's full record and audit tail, retained (with a term only: standbys read it)."""
        if not self._term or not self._engine.has(rollout) or rollout in self._oversized:
            return  # (an oversized record stays so: its nodes do not change, and it was said)
        audit = [e for e in self._store.all("audit") if e.get("rollout") == rollout]
        payloads = self._records.payloads(
            rollout, self._engine.encoded_record(rollout) if record is None else record, audit
        )
        if payloads is None:
            self._oversized.add(rollout)  # (said once: its nodes' records only grow)
            _LOGGER.warning("record of %s exceeds the payload limit: a standby cannot carry it on", rollout)
            return
        try:
            # The parts first, the head that names them last (one connection, in order).
            for index, payload in payloads.parts.items():
                topic = self._topics.rollout_record_part(rollout, index)
                await self._publish(topic, payload, qos=1, retain=True)
            if payloads.head is not None:
                await self._publish(self._topics.rollout_record(rollout), payloads.head, qos=1, retain=True)
        except BusError as exc:
            _LOGGER.warning("record of %s not published: %s", rollout, exc.reason)
            self._records.forget(rollout)  # all of it again next time

    async def _retire(self) -> None:
        """Archive the oldest finished rollouts beyond ``keep_rollouts`` (``hub.retention``)."""
        if self._keep is None or self._archive is None:
            return
        finished = self._engine.finished()
        retiring = finished[: max(0, len(finished) - self._keep)]
        if not retiring:
            return
        audits: dict[str, list[tuple[str, dict[str, Any]]]] = {rollout: [] for rollout in retiring}
        for key, doc in self._store.items("audit"):  # decoded once, however many retire
            if doc.get("rollout") in audits:
                audits[doc["rollout"]].append((key, doc))
        for rollout in retiring:
            audit = audits[rollout]
            try:
                await self._archive.add(self._engine.record(rollout), [doc for _, doc in audit])
            except OSError as exc:
                _LOGGER.error("rollout %s stays: cannot archive it: %s", rollout, exc)  # noqa: TRY400
                return
            try:
                self._engine.forget(rollout)
            except Conflict:
                continue  # rolled back on request meanwhile: it stays (and is archived again later)
            self._store.delete("rollouts", rollout)
            for key, _ in audit:
                self._store.delete("audit", key)
            self._published_states.pop(rollout, None)
            self._published_rows.pop(rollout, None)
            self._changes_seq.pop(rollout, None)
            self._dirty.pop(rollout, None)
            try:  # nothing stale on the broker either: UIs list what is retained
                await self._publish(self._topics.rollout(rollout), b"", qos=1, retain=True)
                if self._term:
                    await self._publish(self._topics.rollout_record(rollout), b"", qos=1, retain=True)
                    for index in range(self._records.used_parts(rollout)):
                        topic = self._topics.rollout_record_part(rollout, index)
                        await self._publish(topic, b"", qos=1, retain=True)
                self._records.forget(rollout)
            except BusError as exc:
                _LOGGER.warning("retained summary of archived %s not cleared: %s", rollout, exc.reason)
            _LOGGER.info("rollout %s archived in %s", rollout, self._archive.path)

    async def _summary_loop(self) -> None:
        """Coalesce: publish what changed, then wait before the next round.

        The wait is ``summary_interval_s``, or longer when a round takes more than
        ``_SUMMARY_SHARE`` of the time or publishes more than
        ``_SUMMARY_BYTES_PER_S`` (a 1000-node rollout: about 4 rounds a second);
        a change of a rollout's state ends the wait at once.
        """
        while self._running:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            self._urgent.clear()
            started = time.monotonic()
            published = await self._flush_summaries()
            pause = max(
                self._interval,
                (time.monotonic() - started) / _SUMMARY_SHARE,
                published / _SUMMARY_BYTES_PER_S,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), pause)

    async def _timer_loop(self) -> None:
        """Feed the engine a Tick at each deadline it reports."""
        recheck = _RECHECK_S
        while self._running:
            self._wake.clear()
            started = time.monotonic()
            deadline = self._engine.next_deadline()
            # A look scans every open node: at 10,000 nodes, look less often, so that
            # looking takes at most _SCAN_SHARE of the time (deadlines are seconds apart).
            recheck = max(_RECHECK_S, (time.monotonic() - started) / _SCAN_SHARE)
            if deadline is None:
                await self._wake.wait()
                await asyncio.sleep(recheck)
                continue
            delay = deadline - self._clock()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), min(delay, _MAX_SLEEP_S))
                except asyncio.TimeoutError:
                    continue  # the nap is over: look again
                await asyncio.sleep(min(delay, recheck))  # woken by events: look again soon
                continue
            try:
                await self._run(Tick())
            except FleetError:
                _LOGGER.exception("rollout timer failed")
            await asyncio.sleep(_TICK_FLOOR_S)


_REQUESTS: dict[str, Callable[[str], EngineEvent]] = {
    "abort": AbortRequested,
    "rollback": RollbackRequested,
    "pause": PauseRequested,
    "resume": ResumeRequested,
}
