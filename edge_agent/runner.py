"""The agent's command runner: intake, one job at a time, journal first, every transition reported.

``CommandRunner`` is what the agent process feeds with the messages of its
``cmd`` topic. It checks each command (``edge_agent.intake``), carries out
apply, rollback and abort commands one at a time in a background task, writes
its intent to the journal before each step (``edge_agent.journal``, atomic),
and reports every transition: ``StepStatus`` on the ``status`` topic (QoS 1),
the retained ``JobSnapshot`` on the ``job`` topic, step output as ``LogLine``
on the ``log`` topic (QoS 0). The order of steps and undos and the journal's
contents come from the pure ``edge_agent.executor``; the work of each step
type from ``edge_agent.steps``.

Protocol (DESIGN sections 2, 3.3, 3.6):

- apply: steps in order; a failed step makes the agent restore the node by
  itself: phase ``rolling_back``, undo the failed step's partial work and
  every completed step in reverse (``rolled_back`` for each), then phase
  ``rolled_back`` (the failed step stays ``failed``) or ``failed`` naming the
  undo that failed.
- rollback: undo what the latest apply of that rollout did (its undo records
  stay in the journal after success); nothing recorded -> ``rolled_back``,
  "nothing to roll back".
- abort: cancel the running step of that rollout's apply (its process group
  is killed), then undo as above; a finished apply is rolled back; nothing
  ran -> ``rolled_back``, "nothing to undo".
- A new apply while busy is rejected ("busy with rollout X"); abort and
  rollback of the running rollout preempt it; of another rollout they wait.
- ``recover()`` at start finishes a command the journal shows interrupted.

The parts around the job lifecycle (which stays here, in one place):

- ``edge_agent.reporter.Reporter``: step reports, the retained job snapshot
  (coalesced while a job is in progress, the final one at once) and log lines;
- ``edge_agent.journal_cell.JournalCell``: the journal state, changed one pure
  transition at a time, written (durable or not) or only noted in memory;
- ``edge_agent.preflights.Preflights``: pre-flight checks of a plan, beside the job.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bus.errors import FleetError, InvalidInput, SignatureError
from bus.messages import Command, HealthStep, Inventory, JobRef, JobSnapshot, Step, loads_object
from bus.signing import verify_fields
from bus.topics import Topics
from edge_agent import blocking, deferral, executor, system
from edge_agent.claims import Claim, claims_of
from edge_agent.executor import ActiveJob, Recovery
from edge_agent.intake import Accepted, Ignored, Rejected, ReplayFloor, TermFloor, check_command
from edge_agent.journal import Journal
from edge_agent.journal_cell import JournalCell
from edge_agent.preflights import Preflights
from edge_agent.reporter import MAX_DETAIL, Publish, Reporter
from edge_agent.settings import ExecutorSettings
from edge_agent.steps import HANDLERS, StepContext, StepHandler
from edge_agent.steps.base import Phase

__all__ = ["CommandRunner", "Publish"]

_LOGGER = logging.getLogger(__name__)

_ACTIONS: dict[str, Literal["apply", "rollback", "abort"]] = {a: a for a in ("apply", "rollback", "abort")}
#: How often a deferred apply looks at the update lock again.
_DEFER_POLL_S = 0.5


@dataclass
class _Outcome:
    record: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Job:
    """The job being carried out; ``ident`` is who it reports as (an adopted abort takes over)."""

    ident: ActiveJob
    index: int | None = None
    step_task: asyncio.Task[Any] | None = None
    preempted: bool = False
    undoing: bool = False
    final: bool = False
    step_failed: bool = False  # an apply step failed: the undo is the node's own restore
    plan: Sequence[Step] = ()
    checks: dict[int, str | None] = field(default_factory=dict)  # passed health checks: index -> expect


@dataclass(eq=False)
class _Recover:
    recovery: Recovery
    done: asyncio.Event = field(default_factory=asyncio.Event)


class CommandRunner:
    """Run the commands of one node; see the module docstring for the protocol.

    Args:
        settings: the node's executor settings (node id, dirs, keys, policy, services).
        topics: the topic scheme (its prefix is configurable).
        publish: ``publish(topic, payload, *, qos=1, retain=False)``, e.g. ``MqttClient.publish``.
        clock: wall-clock time (epoch seconds) for expiry checks and report timestamps.
        handlers: step handlers by type (default: ``edge_agent.steps.HANDLERS``).
        journal: where the job state is kept (default: ``Journal(settings.journal_path)``).
        snapshot_every_s: how long a snapshot of a job in progress may wait to be
            merged with the next (0: every change is published at once).
        versions: re-reads the node's versions (and re-announces them when they
            changed): called after every job, and by the verification of a restore.
            The agent sets it with ``watch_versions``.
    """

    def __init__(
        self,
        settings: ExecutorSettings,
        topics: Topics,
        publish: Publish,
        *,
        clock: Callable[[], float] = time.time,
        handlers: Mapping[str, StepHandler] | None = None,
        journal: Journal | None = None,
        snapshot_every_s: float = 1.0,
        versions: Callable[[Sequence[Claim]], Awaitable[Inventory]] | None = None,
    ) -> None:
        self._settings = settings
        self._versions = versions
        self._topics = topics
        self._clock = clock
        self._handlers: Mapping[str, StepHandler] = HANDLERS if handlers is None else dict(handlers)
        self._journal = JournalCell(
            journal if journal is not None else Journal(settings.journal_path), settings.state_dir
        )
        self._floor = ReplayFloor(settings.replay_floor_path)  # survives a reset journal (issue 16)
        self._terms = TermFloor(settings.term_floor_path)  # fences off replaced hubs (DESIGN 3.9)
        self._report = Reporter(
            settings.node,
            topics,
            publish,
            clock=clock,
            entry=self._journal.entry,
            snapshot_every_s=snapshot_every_s,
        )
        self._preflights = Preflights(
            settings, self._handlers, self._report, clock=clock, busy_with=self._busy_with
        )
        self._intake_lock = asyncio.Lock()
        self._queue: deque[Command | _Recover] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._job: _Job | None = None
        self._closed = False
        self._recovery: _Recover | None = None
        self._recovery_checked = False
        self._recovery_lock = asyncio.Lock()

    # ------------------------------------------------------------------ public API

    async def recover(self) -> None:
        """Finish a command the journal shows interrupted (the agent died mid-job).

        The half-done step and every completed one are undone and the job ends
        ``rolled_back`` (or ``failed`` if an undo fails), reported like any other.
        Returns when that is done (at once when there is nothing to finish).
        A command handled before ``recover()`` was called schedules it first.
        """
        item = await self._schedule_recovery()
        if item is not None:
            await item.done.wait()

    async def _schedule_recovery(self) -> _Recover | None:
        # Only what the journal held at start-up is a leftover: checked once.
        async with self._recovery_lock:
            if self._recovery_checked:
                return self._recovery
            state = await self._journal.load()
            self._recovery_checked = True
            plan = executor.recovery(state)
            if plan is None or self._closed:
                return None
            item = self._recovery = _Recover(plan)
        _LOGGER.warning(
            "recovering %s %s of rollout %s interrupted by a restart",
            plan.job.action,
            plan.job.command,
            plan.job.rollout,
        )
        self._queue.appendleft(item)
        self._ensure_worker()
        return item

    async def handle_command(self, topic: str, payload: bytes) -> None:
        """Take one message of the ``cmd`` topic; returns quickly, the work runs in the background.

        Never raises on bad input: a refused command is reported as ``rejected``.
        """
        if self._closed or not payload:
            return  # an empty payload is the hub clearing its retained command: nothing to do
        try:
            async with self._intake_lock:
                if topic == self._topics.hub_state:
                    await self._take_hub_state(payload)
                else:
                    await self._take(topic, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("handling a command failed")

    async def _take_hub_state(self, payload: bytes) -> None:
        """The active hub's signed state raises the term floor at once (DESIGN 3.9).

        Then a replaced hub is fenced off on this node before the new one sends it a
        command. Anything unsigned, unverified, not ``active`` or not higher is ignored.
        """
        try:
            raw = loads_object(payload)
        except InvalidInput:
            return
        term = raw.get("term")
        if raw.get("state") != "active" or isinstance(term, bool) or not isinstance(term, int) or term <= 0:
            return
        if term <= await asyncio.to_thread(self._terms.read):
            return
        try:
            verify_fields(raw, self._settings.trusted_keys)
        except SignatureError as exc:
            _LOGGER.warning("hub state of term %d ignored: %s", term, exc)
            return
        await asyncio.to_thread(self._terms.raise_to, term)
        _LOGGER.info("hub %s is active with term %d: older terms are refused", str(raw.get("hub"))[:64], term)

    def watch_versions(self, versions: Callable[[Sequence[Claim]], Awaitable[Inventory]]) -> None:
        """Re-read (and re-announce) the node's versions with ``versions`` after every job."""
        self._versions = versions

    def current_job(self) -> JobRef | None:
        """The job in progress (rollout, command, step index) for heartbeats, or None."""
        job = self._job
        if job is None:
            return None
        return JobRef(rollout=job.ident.rollout, command=job.ident.command, step=job.index)

    async def republish_snapshot(self) -> None:
        """Publish the latest job snapshot again (called after every reconnect).

        A broker restarted without persistence has lost it, and the hub learns
        from it where this node is (DESIGN 3.6).
        """
        await self._report.republish_snapshot()

    async def close(self) -> None:
        """Stop the work in progress (its step's processes are killed); the journal stays.

        A runner started later on the same state dir recovers the interrupted job.
        """
        self._closed = True
        await self._report.close()
        await self._preflights.close()
        worker = self._worker
        if worker is not None and not worker.done():
            worker.cancel()
            await asyncio.wait({worker})
        for item in self._queue:
            if isinstance(item, _Recover):
                item.done.set()
        self._queue.clear()

    # ------------------------------------------------------------------ refusals

    async def _reject_signed(self, command: Command, reason: str) -> None:
        """Reject a command whose signature verified (so its snapshot may say so)."""
        await self._reject(
            Rejected(
                reason,
                command_id=command.id,
                rollout=command.rollout,
                action=command.action,
                issued_at=command.issued_at,
                verified=True,
            )
        )

    async def _reject(self, verdict: Rejected) -> None:
        shown = verdict.command_id or "(unidentified)"
        _LOGGER.warning("command %s rejected: %s", shown, verdict.reason)
        who = ActiveJob(
            command=verdict.command_id,
            action=_ACTIONS.get(verdict.action, "apply"),
            rollout=verdict.rollout,
            issued_at=verdict.issued_at,
        )
        await self._report.status(who, -1, "command", "rejected", verdict.reason)
        await self._report.log(who, -1, f"command {shown} rejected: {verdict.reason}")
        if verdict.verified and verdict.command_id and verdict.rollout and verdict.action:
            # Only a verified command may replace the retained snapshot; remembering
            # it keeps a replay of the same retained command silent.
            try:
                await self._journal.change(lambda s: executor.remember(s, verdict.command_id, None))
            except OSError as exc:  # the refusal is still reported; only its memory is lost
                _LOGGER.warning("journal not written: %s", exc)
            await self._report.rejected(
                JobSnapshot(
                    node=self._settings.node,
                    id=verdict.command_id,
                    rollout=verdict.rollout,
                    action=who.action,
                    phase="rejected",
                    issued_at=verdict.issued_at,
                    updated_at=self._clock(),
                    detail=verdict.reason[:MAX_DETAIL],
                )
            )

    # ------------------------------------------------------------------ intake

    def _busy_with(self) -> str | None:
        if self._job is not None:
            return self._job.ident.rollout
        for item in self._queue:
            return item.recovery.job.rollout if isinstance(item, _Recover) else item.rollout
        return None

    async def _take(self, topic: str, payload: bytes) -> None:
        await self._schedule_recovery()  # an interrupted job is finished before anything new
        state = await self._journal.load()
        floor = await asyncio.to_thread(self._floor.read)
        term_floor = await asyncio.to_thread(self._terms.read)
        verdict = check_command(
            topic,
            payload,
            settings=self._settings,
            topics=self._topics,
            handlers=self._handlers,
            now=self._clock(),
            seen=set(state.seen),
            last_issued_at=max(state.last_issued_at, floor),
            term_floor=term_floor,
        )
        if isinstance(verdict, Ignored):
            _LOGGER.debug("command ignored: %s", verdict.reason)
            if verdict.replay_of is not None:
                await self._report.answer_replay(verdict.replay_of)
            return
        if isinstance(verdict, Rejected):
            await self._reject(verdict)
            return
        assert isinstance(verdict, Accepted)  # noqa: S101 - the Verdict union is closed
        command = verdict.command
        if command.action == "preflight":
            self._preflights.start(command)  # read-only, beside any job; never journalled
            return
        if command.action == "apply":
            busy = self._busy_with()
            if busy is not None:
                await self._reject_signed(command, f"busy with rollout {busy}")
                return
        try:
            await self._journal.change(lambda s: executor.remember(s, command.id, command.issued_at))
            await asyncio.to_thread(self._floor.raise_to, command.issued_at)
            await asyncio.to_thread(self._terms.raise_to, command.term)
        except OSError as exc:
            # Nothing may run before the journal knows (DESIGN 3.3): a state dir that is
            # full or read-only refuses the command, with the cause.
            await self._reject_signed(command, self._journal.unjournalled(exc))
            return
        job = self._job
        if (
            command.action != "apply"
            and job is not None
            and job.ident.rollout == command.rollout
            and not job.final
        ):
            await self._adopt(job, command)
            return
        _LOGGER.info("command %s (%s of rollout %s) accepted", command.id, command.action, command.rollout)
        self._queue.append(command)
        self._ensure_worker()

    async def _adopt(self, job: _Job, command: Command) -> None:
        """An abort/rollback of the running rollout takes over the job (and cancels its step)."""
        # Synchronously, before any await: the job must not finish an apply it was told to undo.
        job.ident = executor.identity(command)
        task = job.step_task if not job.undoing else None
        if not job.undoing:
            job.preempted = True
        if task is not None and not task.done():
            task.cancel()
        _LOGGER.info("%s %s takes over rollout %s", command.action, command.id, command.rollout)
        await self._journal.change(lambda s: executor.adopt(s, command), durable=False)
        if task is not None:
            await self._report.log(
                job.ident, job.index if job.index is not None else -1, f"{command.action}: step cancelled"
            )

    # ------------------------------------------------------------------ the worker

    def _ensure_worker(self) -> None:
        if self._closed:
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name=f"fleet-runner-{self._settings.node}")

    async def _work(self) -> None:
        while self._queue and not self._closed:
            item = self._queue.popleft()
            if isinstance(item, _Recover):
                job = _Job(ident=item.recovery.job)
            else:
                job = _Job(ident=executor.identity(item))
            self._job = job
            try:
                if isinstance(item, _Recover):
                    await self._run_recovery(job, item.recovery)
                elif item.action == "apply":
                    await self._run_apply(job, item)
                else:
                    await self._run_undo_command(job, item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _LOGGER.exception("job %s failed inside the agent", job.ident.command)
                await self._report.snapshot(job.ident, "failed", f"agent error: {type(exc).__name__}: {exc}")
            finally:
                self._job = None
                if isinstance(item, _Recover):
                    item.done.set()
            # What the job changed is announced at once, not at the next heartbeat (issue 14),
            # with what its health checks saw answering.
            await self._read_versions(claims_of(job.plan, job.checks))
            await self._prune_backups()

    async def _prune_backups(self) -> None:
        state = self._journal.state
        if state is None:
            return
        keep = {e.command for e in state.applies.values()}
        directory = self._settings.backup_dir

        def prune() -> None:
            if not directory.is_dir():
                return
            for child in directory.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)

        try:
            await blocking.run(prune)
        except OSError:
            _LOGGER.warning("pruning %s failed", directory, exc_info=True)

    # ------------------------------------------------------------------ steps

    def _context(
        self, job: _Job, owner: str, rollout: str, index: int, phase: Phase, timeout: float
    ) -> StepContext:
        async def log(line: str) -> None:
            await self._report.log(job.ident, index, line)

        async def output(stream: str, line: str) -> None:
            await self._report.log(job.ident, index, line, stream)

        async def checkpoint(record: dict[str, Any]) -> None:
            if phase == "apply":  # an undo never replaces the record it works from
                await self._journal.update(rollout, index, record=dict(record))

        return StepContext(
            node=self._settings.node,
            rollout=rollout,
            command=owner,
            index=index,
            phase=phase,
            settings=self._settings,
            timeout=timeout,
            log=log,
            output=output,
            checkpoint=checkpoint,
        )

    def _timeout(self, step: Step) -> float:
        return step.timeout_s or self._settings.default_step_timeout_s

    async def _guarded(
        self,
        work: Awaitable[Any],
        timeout: float,
        job: _Job,
        *,
        cancellable: bool,
        index: int,
        what: str,
    ) -> _Outcome:
        """Run one apply, undo or check with its timeout; an abort may cancel it when ``cancellable``.

        Every process it starts is in one ``system.StepScope``. Unless it succeeded
        (then what it started runs on purpose, e.g. a service), they are all killed,
        the ones that left the session included, and gone before this returns: the
        undo that follows never races a daemon the step launched (issue of a start
        script whose daemon writes its pidfile late).
        """
        scope = system.open_scope(f"{job.ident.command[:8]}-{index + 1}-{what}")
        task: asyncio.Task[Any] = asyncio.create_task(asyncio.wait_for(system.in_scope(scope, work), timeout))
        outcome: _Outcome | None = None
        try:
            outcome = await self._outcome(task, timeout, job, cancellable)
        finally:
            if inspect.iscoroutine(work) and inspect.getcoroutinestate(work) == inspect.CORO_CREATED:
                work.close()  # cancelled before it ever ran: nothing to clean up, no warning
            if outcome is not None and not outcome.cancelled and outcome.error is None:
                scope.release()
            else:  # cancelled, failed, timed out, or the agent is closing: nothing may outlive it
                await asyncio.shield(self._end_scope(scope, job, index, what, outcome))
        return outcome

    async def _end_scope(
        self, scope: system.StepScope, job: _Job, index: int, what: str, outcome: _Outcome | None
    ) -> None:
        try:
            killed = await scope.kill()
        except FleetError as exc:
            _LOGGER.error("step %d (%s): %s", index + 1, what, exc.reason)  # noqa: TRY400
            await self._report.log(job.ident, index, f"{what}: {exc.reason}")
            if outcome is not None and outcome.error is None:
                outcome.error = exc.reason
            return
        if killed:
            pids = " ".join(map(str, killed))
            line = f"{what}: killed {len(killed)} process(es) of the step still running (pids {pids})"
            _LOGGER.info("step %d: %s", index + 1, line)
            await self._report.log(job.ident, index, line)

    async def _outcome(
        self, task: asyncio.Task[Any], timeout: float, job: _Job, cancellable: bool
    ) -> _Outcome:
        await _finish(task, job, cancellable=cancellable)
        if task.cancelled():
            return _Outcome(cancelled=True)
        exc = task.exception()
        if exc is None:
            result = task.result()
            return _Outcome(record=result if isinstance(result, dict) else {})
        if isinstance(exc, asyncio.TimeoutError):
            return _Outcome(error=f"step timed out after {timeout:g} s")
        if isinstance(exc, FleetError):
            return _Outcome(error=exc.reason)
        _LOGGER.error("step handler raised", exc_info=exc)
        return _Outcome(error=f"{type(exc).__name__}: {exc}")

    def _handler(self, step_type: str) -> StepHandler | None:
        return self._handlers.get(step_type)

    async def _defer(self, job: _Job, command: Command) -> bool:
        """Hold the apply back while the node's update lock is held (``edge_agent.deferral``).

        Returns True when the apply may go on; False when it ended here: the lock
        outlasted ``defer_until`` (job ``not_started``), or an abort or rollback of
        the rollout took the job over while it waited (nothing ran: ``rolled_back``).
        """
        env = {
            "FLEET_ROLLOUT": command.rollout,
            "FLEET_COMMAND": command.id,
            "FLEET_STATE_DIR": str(self._settings.state_dir),
        }
        waited = False

        async def busy(reason: str) -> None:
            nonlocal waited
            waited = True
            _LOGGER.info("apply %s of rollout %s deferred: %s", command.id, command.rollout, reason)
            await self._report.status(job.ident, -1, "command", "deferred", reason)
            await self._report.snapshot(job.ident, "deferred", reason)

        until = command.defer_until if command.defer_until is not None else self._clock()
        task = asyncio.create_task(
            deferral.wait_until_free(
                self._settings, until, clock=self._clock, poll_s=_DEFER_POLL_S, on_busy=busy, env=env
            )
        )
        await _finish(task, job, cancellable=True)
        if job.preempted or task.cancelled():
            detail = "nothing to undo: the apply never started (it was deferred)"
            job.final = True
            await self._journal.change(executor.finish, durable=False)
            await self._report.status(job.ident, -1, "command", "rolled_back", detail)
            await self._report.snapshot(job.ident, "rolled_back", detail)
            return False
        still = task.result()
        if still is None:
            if waited:
                await self._report.log(job.ident, -1, "the node is free again: applying")
            return True
        allowed = max(0.0, until - command.issued_at)
        detail = f"not started: {still} (the rollout allows waiting {allowed:g} s)"
        job.final = True
        _LOGGER.warning("apply %s of rollout %s %s", command.id, command.rollout, detail)
        await self._report.status(job.ident, -1, "command", "skipped", detail)
        await self._report.snapshot(job.ident, "not_started", detail)
        return False

    async def _run_apply(self, job: _Job, command: Command) -> None:
        if not await self._defer(job, command):
            return
        rollout = command.rollout
        last = len(command.plan) - 1
        job.plan = command.plan
        try:
            # One write holds the job and the intent of its first step.
            await self._journal.change(
                lambda s: executor.update_step(
                    executor.begin(s, command), rollout, 0, state="running", detail=""
                )
            )
        except OSError as exc:
            await self._reject_signed(command, self._journal.unjournalled(exc))
            return
        await self._report.snapshot(job.ident, "applying")
        failed = False
        for index, step in enumerate(command.plan):
            if job.preempted:
                break
            job.index = index
            try:
                if index:  # the intent of step 0 went with the job's own record
                    await self._journal.update(rollout, index, state="running", detail="")
            except OSError as exc:  # no step starts unless the journal knows (DESIGN 3.3)
                error = self._journal.unjournalled(exc)
                _LOGGER.error("step %d (%s) of %s not started: %s", index + 1, step.type, command.id, error)  # noqa: TRY400
                await self._report.status(job.ident, index, step.type, "failed", error)
                failed = True
                break
            await self._report.status(job.ident, index, step.type, "running")
            handler = self._handler(step.type)
            timeout = self._timeout(step)
            if handler is None:
                outcome = _Outcome(error=f"step type {step.type} is not supported by this agent")
            else:
                ctx = self._context(job, command.id, rollout, index, "apply", timeout)
                outcome = await self._guarded(
                    handler.apply(step, ctx), timeout, job, cancellable=True, index=index, what="apply"
                )
            if outcome.cancelled:
                detail = f"cancelled by {job.ident.action} {job.ident.command}"
                await self._journal.update(rollout, index, durable=False, state="cancelled", detail=detail)
                break
            if outcome.error is None:
                # Written with the next step's intent, or with the job's end.
                await self._journal.note(
                    functools.partial(
                        executor.update_step,
                        rollout=rollout,
                        index=index,
                        state="succeeded",
                        record=outcome.record,
                    )
                )
                await self._report.status(job.ident, index, step.type, "succeeded")
                if isinstance(step, HealthStep):
                    job.checks[index] = step.expect
                if index < last:  # after the last step, the job's end is the next snapshot
                    await self._report.snapshot(job.ident, "applying")
                continue
            error = outcome.error
            _LOGGER.warning("step %d (%s) of %s failed: %s", index + 1, step.type, command.id, error)
            await self._journal.update(rollout, index, durable=False, state="failed", detail=error)
            await self._report.status(job.ident, index, step.type, "failed", error)
            failed = True  # the undo's snapshot follows at once
            job.step_failed = True
            break
        job.index = None
        if not failed and not job.preempted:
            try:
                await self._journal.change(
                    lambda s: executor.finish(executor.set_phase(s, rollout, "succeeded"))
                )
            except OSError as exc:
                # A success the journal does not hold would be undone by the next restart's
                # recovery behind the hub's back: undo it now, and say why.
                error = self._journal.unjournalled(exc)
                _LOGGER.error("apply %s of rollout %s not recorded: %s", command.id, rollout, error)  # noqa: TRY400
                await self._report.status(job.ident, last, command.plan[last].type, "failed", error)
            else:
                if not _taken_over(job):  # (read again: the journal write above yielded)
                    job.final = True
                    await self._report.snapshot(job.ident, "succeeded")
                    _LOGGER.info("apply %s of rollout %s succeeded", command.id, rollout)
                    return
                # An abort or rollback took the job over while its end was being written:
                # it is undone like any other preempted apply (else the node kept the new
                # version while the hub was told it was restored).
                _LOGGER.info("apply %s of rollout %s taken over as it ended: undoing", command.id, rollout)
        await self._undo(job)

    async def _undo(self, job: _Job) -> None:
        """Undo, last first, every step of the rollout's entry that is not undone yet."""
        rollout = job.ident.rollout
        job.undoing = True
        job.checks.clear()  # what the apply's checks saw is being undone
        await self._journal.change(lambda s: executor.set_phase(s, rollout, "rolling_back"), durable=False)
        await self._report.snapshot(job.ident, "rolling_back")
        entry = self._journal.entry(rollout)
        assert entry is not None  # noqa: S101 - callers checked
        job.plan = entry.plan
        for index in executor.undo_order(entry.steps, entry.plan):
            job.index = index
            step = entry.plan[index]
            record = entry.steps[index].record
            # Not written: a restart undoes again every step whose undo is not "done".
            await self._journal.note(
                functools.partial(executor.update_step, rollout=rollout, index=index, undo="running")
            )
            handler = self._handler(step.type)
            timeout = self._timeout(step)
            if handler is None:
                outcome = _Outcome(error=f"step type {step.type} is not supported by this agent")
            else:
                ctx = self._context(job, entry.command, rollout, index, "rollback", timeout)
                outcome = await self._guarded(
                    handler.undo(step, ctx, record), timeout, job, cancellable=False, index=index, what="undo"
                )
            error = "cancelled" if outcome.cancelled else outcome.error
            if error is None:
                await self._journal.update(rollout, index, durable=False, undo="done", undo_detail="")
                await self._report.status(job.ident, index, step.type, "rolled_back")
            else:
                _LOGGER.error(
                    "undo of step %d (%s) of rollout %s failed: %s", index + 1, step.type, rollout, error
                )
                await self._journal.update(rollout, index, durable=False, undo="failed", undo_detail=error)
                await self._report.status(job.ident, index, step.type, "failed", f"undo failed: {error}")
            await self._report.snapshot(job.ident, "rolling_back")
        job.index = None
        await self._end_undo(job, rollout)

    async def _end_undo(self, job: _Job, rollout: str) -> None:
        """Verify the restore (unless an undo failed), then end the job with its true phase."""
        done = self._journal.entry(rollout)
        assert done is not None  # noqa: S101
        if executor.undo_outcome(done)[0] == "rolled_back":
            await self._verify(job, done)
            done = self._journal.entry(rollout)
            assert done is not None  # noqa: S101
        job.index = None
        job.final = True
        # An abort or rollback that took over the node's own restore answers for itself: it
        # ends rolled_back (verified) or rollback_failed, as the hub expects of it.
        self_restore = job.step_failed and job.ident.action == "apply"
        phase, detail = executor.final_phase(done, self_restore=self_restore)
        await self._journal.change(
            lambda s: executor.finish(executor.set_phase(s, rollout, phase, detail)), durable=False
        )
        await self._report.log(job.ident, -1, f"{phase}: {detail}" if detail else phase)
        await self._report.snapshot(job.ident, phase, detail)  # the job's last word
        log = _LOGGER.warning if phase == "rollback_failed" else _LOGGER.info
        log("rollout %s on this node: %s %s", rollout, phase, detail)

    async def _verify(self, job: _Job, entry: executor.ApplyEntry) -> None:
        """Show the restored state answering: versions re-read, each health check in restore mode.

        Each check's outcome goes on its step (journal and snapshot), in the log and
        as a ``StepStatus`` (``rolled_back`` "restore verified: ..." or ``failed``
        "restore not verified: ...").
        """
        from edge_agent.steps import health  # the health handler's restore mode

        rollout = entry.rollout
        await self._report.log(job.ident, -1, "verifying the restore")
        inventory = await self._read_versions()
        if inventory is not None:
            found = {**inventory.services, **inventory.packages, **inventory.drivers}
            shown = ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "none reported"
            await self._report.log(job.ident, -1, f"versions after the restore: {shown}")
        for index, step in enumerate(entry.plan):
            if not isinstance(step, HealthStep):
                continue
            job.index = index
            restore = health.restore_check(step)
            if restore is None:
                await self._journal.update(
                    rollout, index, durable=False, verified="skipped", verify_detail=""
                )
                await self._report.log(job.ident, index, "verify: skipped (verify = skip)")
                continue
            timeout = self._timeout(step)
            ctx = self._context(job, entry.command, rollout, index, "verify", timeout)
            await self._report.log(job.ident, index, f"verify: {health.describe(restore)}")
            outcome = await self._guarded(
                health.verify(step, ctx), timeout, job, cancellable=False, index=index, what="verify"
            )
            error = "cancelled" if outcome.cancelled else outcome.error
            if error is None:
                what = health.describe(restore)
                job.checks[index] = restore.expect
                await self._journal.update(
                    rollout, index, durable=False, verified="passed", verify_detail=what
                )
                await self._report.status(
                    job.ident, index, step.type, "rolled_back", f"restore verified: {what}"
                )
            else:
                line = _one_line(error)
                _LOGGER.warning("restore of rollout %s not verified by step %d: %s", rollout, index + 1, line)
                await self._journal.update(
                    rollout, index, durable=False, verified="failed", verify_detail=line
                )
                await self._report.status(
                    job.ident, index, step.type, "failed", f"restore not verified: {line}"
                )
        job.index = None

    async def _read_versions(self, claims: Sequence[Claim] = ()) -> Inventory | None:
        """The node's versions, read again now (and re-announced by the agent if they changed).

        ``claims``: the versions this job's passed health checks saw answering; the
        agent names each one the re-read versions do not bear out.
        """
        if self._versions is None:
            return None
        try:
            return await self._versions(claims)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.warning("reading the node's versions failed", exc_info=True)
            return None

    async def _run_undo_command(self, job: _Job, command: Command) -> None:
        await self._journal.note(lambda s: executor.begin(s, command))  # written with the undo's first record
        entry = self._journal.entry(command.rollout)
        if entry is not None and entry.phase == "rollback_failed" and not executor.undo_order(entry.steps):
            # Undone before, but not shown restored: a new rollback or abort checks again.
            await self._journal.change(
                lambda s: executor.set_phase(s, command.rollout, "rolling_back"), durable=False
            )
            await self._report.snapshot(job.ident, "rolling_back")
            await self._end_undo(job, command.rollout)
            return
        if entry is None or not executor.undo_order(entry.steps):
            detail = "nothing to undo" if command.action == "abort" else "nothing to roll back"
            job.final = True
            await self._journal.change(executor.finish, durable=False)
            await self._report.status(job.ident, -1, "command", "rolled_back", detail)
            await self._report.snapshot(job.ident, "rolled_back", detail)
            return
        await self._undo(job)

    async def _run_recovery(self, job: _Job, plan: Recovery) -> None:
        entry = plan.entry
        if entry is None:
            await self._journal.change(executor.finish, durable=False)
            return
        rollout = entry.rollout
        if plan.interrupted is not None:
            index = plan.interrupted
            detail = "interrupted: the agent stopped during this step"
            await self._journal.update(rollout, index, durable=False, state="interrupted", detail=detail)
            await self._report.status(job.ident, index, entry.steps[index].type, "failed", detail)
        if entry.phase in executor.FINAL_PHASES:
            job.final = True
            await self._journal.change(executor.finish, durable=False)
            await self._report.snapshot(job.ident, entry.phase, entry.detail)
            return
        await self._undo(job)


def _one_line(text: str, limit: int = 400) -> str:
    """A multi-line reason as one line (the last meaningful lines), for details people read."""
    lines = [line.strip() for line in text.replace(" | ", "\n").splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:] if lines else text[:limit]


def _taken_over(job: _Job) -> bool:
    """Whether an abort or rollback took the job over (it may have while the job awaited)."""
    return job.preempted


async def _finish(task: asyncio.Task[Any], job: _Job, *, cancellable: bool) -> None:
    """Wait for ``task``; if ``cancellable``, an abort may cancel it through ``job.step_task``.

    If this wait itself is cancelled, the task is cancelled and awaited first.
    """
    if cancellable:
        job.step_task = task
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise
    finally:
        job.step_task = None
