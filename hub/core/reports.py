"""A node's reports read as one thing, and what they mean for the node: one decision function.

A ``StepStatus`` (one step's transition) and a ``JobSnapshot`` (the retained
state of the whole job) say the same kinds of things: the job is deferred,
started, at step N, succeeded, failed (and then restored, or not), rejected.
``report_of_status`` and ``report_of_snapshot`` read either as a ``Report``;
``decide(node, report)`` returns the moves the engine makes on the node
(``Verdict``), in order, the way ``edge_agent.intake`` returns verdicts: ordered
checks, no side effect. The engine carries the moves out; each is checked
against the node stage table (``hub.core.state.TRANSITIONS``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Literal, NamedTuple

from bus.messages import JobSnapshot, NodePhase, StepStatus
from hub.core.state import Node, Restore

__all__ = ["Move", "Report", "ReportKind", "Verdict", "decide", "meaningful", "report_of_snapshot",
           "report_of_status", "step_name"]  # fmt: skip

#: Words that mark the line of a command's output that says what went wrong.
_ERROR_WORDS = re.compile(
    r"error|fail|fatal|refus|denied|unsupported|cannot|can't|not found|exception|panic", re.IGNORECASE
)
#: Longest failure reason kept per node (the summary is size-bounded).
_REASON_LIMIT = 300


def meaningful(detail: str) -> str:
    """The line of an agent's failure detail that says what went wrong (DESIGN 3.11).

    An agent's detail is ``"<what failed>: <output lines joined by ' | '>"``
    (``edge_agent.system.RunResult.tail``); a service that printed its start-up
    chatter before its error shows all of it. Keep the head and the last line
    that reads as an error (else the last line).
    """
    text = detail.strip()
    parts = [p.strip() for p in re.split(r"\n| \| ", text) if p.strip()]
    if len(parts) <= 1:
        return text[:_REASON_LIMIT]
    head, sep, first = parts[0].partition(": ")
    lines = [first, *parts[1:]] if sep else parts
    chosen = next((line for line in reversed(lines) if _ERROR_WORDS.search(line)), lines[-1])
    return (f"{head}: {chosen}" if sep else chosen)[:_REASON_LIMIT]


def step_name(index: int, type_: str) -> str:
    """A step as people count (DESIGN 3.11): the wire's 0-based index 2 is ``step 3 (service)``."""
    return f"step {index + 1} ({type_})"


ReportKind = Literal[
    "deferred",  # waiting for the node's update lock
    "not_started",  # gave up waiting: it changed nothing
    "running",  # at a step (a step's report that is no failure; a snapshot of a job applying)
    "succeeded",  # the whole job succeeded
    "rejected",  # the agent refused the command
    "step_failed",  # a step failed: the agent restores the node next
    "step_rolled_back",  # a step was undone (after a failure)
    "rolling_back",  # the job is undoing its steps
    "rolled_back",  # the job ended restored
    "failed",  # the job ended failed (its restore verified unless said otherwise)
    "rollback_failed",  # the job ended with its restore failed or unverified
]


class Report(NamedTuple):
    """A ``StepStatus`` or a ``JobSnapshot`` as the engine reads it."""

    kind: ReportKind
    detail: str  # the agent's detail
    step: int | None = None  # the step the node is at (0-based); None: none or not said
    audit_step: int | None = None  # the step a failure is audited with
    reason: str = ""  # a failure as people read it (DESIGN 3.11)
    started: bool = True  # it shows the node started the command (a withdrawn apply gets an abort)
    unverified: bool = False  # a restore the agent could not verify
    restore_why: str = ""  # why a restore (rollback, abort) failed, as people read it
    is_status: bool = False  # one step's report, not the whole job's


def report_of_status(status: StepStatus) -> Report:
    """A ``StepStatus`` as a ``Report``."""
    index = status.index if status.index >= 0 else None
    started = status.state not in ("rejected", "deferred", "skipped")
    if status.index < 0 and status.state == "deferred":
        return Report("deferred", status.detail, started=False, is_status=True)
    if status.index < 0 and status.state == "skipped":
        return Report("not_started", status.detail, started=False, is_status=True)
    if status.state == "rejected":
        return Report("rejected", status.detail, started=False, is_status=True)
    if status.state == "failed":
        reason = f"failed {step_name(status.index, status.type)}" + (
            f": {meaningful(status.detail)}" if status.detail else ""
        )
        return Report("step_failed", status.detail, index, status.index, reason, is_status=True)
    kind: ReportKind = "step_rolled_back" if status.state == "rolled_back" else "running"
    return Report(kind, status.detail, index, started=started, is_status=True)


def report_of_snapshot(snap: JobSnapshot) -> Report:
    """A ``JobSnapshot`` as a ``Report`` (its step: the furthest one reached)."""
    failed_step = next((s for s in snap.steps if s.state == "failed"), None)
    reached = [s.index for s in snap.steps if s.state != "pending"]
    step = max(reached) if reached else None
    if failed_step is not None:
        reason = f"failed {step_name(failed_step.index, failed_step.type)}" + (
            f": {meaningful(failed_step.detail)}" if failed_step.detail else ""
        )
        name = step_name(failed_step.index, failed_step.type)
        undo = f"undo of {name} failed: {meaningful(failed_step.detail)}"
    else:
        reason, undo = snap.detail or f"job {snap.phase}", "the agent could not restore it"
    kind: ReportKind = "running" if snap.phase == "applying" else snap.phase
    if snap.phase == "rollback_failed":
        restore_why = meaningful(snap.detail) or "its restore could not be verified"
    elif snap.phase == "failed":
        restore_why = meaningful(snap.detail) or undo
    else:
        restore_why = ""
    return Report(
        kind,
        snap.detail,
        step,
        step,
        reason,
        started=snap.phase not in ("rejected", "deferred", "not_started"),
        # (An agent from before restore verification says "failed" with "undo of step ..."
        # when an undo failed.)
        unverified=snap.phase == "rollback_failed" or snap.detail.startswith("undo of step"),
        restore_why=restore_why,
    )


class Move(enum.Enum):
    """What a report makes the engine do to a node."""

    DEFER = "defer"  # deferred: its update lock holds the apply back
    NOT_START = "not_start"  # not started, final
    START = "start"  # applying, at ``step``
    SUCCEED = "succeed"
    FAIL = "fail"  # failed with ``phase`` and ``restore``; ``clear``: its command goes
    SHOW_ROLLING_BACK = "show_rolling_back"  # a failed node's own restore is under way
    AT_STEP = "at_step"  # a restore command's step report: at ``step`` (None: unchanged)
    UNDER_WAY = "under_way"  # a restore command's job is under way (it touched the node), at ``step``
    RESTORED = "restored"
    UNRESTORED = "unrestored"  # ``reason``; ``after_detail``: kept after the node's failure reason


class Verdict(NamedTuple):
    """One move of a node, with what it needs."""

    move: Move
    reason: str = ""
    step: int | None = None
    phase: NodePhase | None = None
    restore: Restore | None = None
    audit_step: int | None = None
    clear: bool = False
    after_detail: bool = False


def decide(n: Node, report: Report) -> tuple[Verdict, ...]:
    """The moves ``report`` makes ``n`` take (the report is of ``n``'s latest command)."""
    if n.action == "apply":
        return _decide_apply(n, report)
    return _decide_restore(n, report)


def _decide_apply(n: Node, report: Report) -> tuple[Verdict, ...]:
    """A report of an apply: what the job says first, then what the node already is."""
    fresh = not n.failed and not n.applied  # neither failed nor succeeded yet
    if report.is_status and report.kind not in ("deferred", "not_started", "rejected"):
        return _decide_step(n, report, fresh)
    return _BY_KIND[report.kind](n, report, fresh)


def _deferred(_n: Node, report: Report, _fresh: bool) -> tuple[Verdict, ...]:
    return (Verdict(Move.DEFER, report.detail),)


def _not_started(_n: Node, report: Report, _fresh: bool) -> tuple[Verdict, ...]:
    return (Verdict(Move.NOT_START, report.detail or "not started: gave up waiting"),)


def _rejected(n: Node, report: Report, _fresh: bool) -> tuple[Verdict, ...]:
    if n.phase in ("pending", "applying") and n.step is None and not n.failed:
        why = f"rejected the command: {report.detail}"
        return (Verdict(Move.FAIL, why, phase="rejected", restore="restored", clear=True),)
    return ()


def _running(_n: Node, report: Report, fresh: bool) -> tuple[Verdict, ...]:
    return (Verdict(Move.START, step=report.step),) if fresh else ()


def _succeeded(_n: Node, _report: Report, fresh: bool) -> tuple[Verdict, ...]:
    return (Verdict(Move.SUCCEED),) if fresh else ()


def _rolling_back(n: Node, report: Report, fresh: bool) -> tuple[Verdict, ...]:
    if fresh:
        return (_failed(report, "rolling_back", "waiting"),)
    return (Verdict(Move.SHOW_ROLLING_BACK),) if n.restore == "waiting" else ()


def _rolled_back(n: Node, report: Report, fresh: bool) -> tuple[Verdict, ...]:
    if fresh:
        return (_failed(report, "rolled_back", "restored", clear=True),)
    return (Verdict(Move.RESTORED),) if n.restore in ("waiting", "unrestored") else ()


def _ended_failed(n: Node, report: Report, fresh: bool) -> tuple[Verdict, ...]:
    """The job ended: "failed" once the node's own restore is verified, "rollback_failed" if not."""
    moves: list[Verdict] = []
    restore = n.restore
    if fresh:
        moves.append(_failed(report, "failed", "waiting"))
        restore = "waiting"
    if restore == "waiting" and report.unverified:
        why = meaningful(report.detail) or "its restore could not be verified"
        moves.append(Verdict(Move.UNRESTORED, f"not restored: {why}", after_detail=True))
    elif restore in ("waiting", "unrestored") and not report.unverified:
        moves.append(Verdict(Move.RESTORED))
    return tuple(moves)


def _nothing(_n: Node, _report: Report, _fresh: bool) -> tuple[Verdict, ...]:
    return ()


_BY_KIND: dict[ReportKind, Callable[[Node, Report, bool], tuple[Verdict, ...]]] = {
    "deferred": _deferred,
    "not_started": _not_started,
    "rejected": _rejected,
    "running": _running,
    "succeeded": _succeeded,
    "rolling_back": _rolling_back,
    "rolled_back": _rolled_back,
    "failed": _ended_failed,
    "rollback_failed": _ended_failed,
    "step_failed": _nothing,  # (step reports: _decide_step)
    "step_rolled_back": _nothing,
}


def _failed(report: Report, phase: NodePhase, restore: Restore, clear: bool = False) -> Verdict:
    """The node failed as ``report`` says, at its step; ``restore``: what of its restore is known."""
    return Verdict(Move.FAIL, report.reason, report.step, phase, restore, report.audit_step, clear)


def _decide_step(n: Node, report: Report, fresh: bool) -> tuple[Verdict, ...]:
    """One step's report of an apply."""
    if n.failed:
        restoring = report.kind == "step_rolled_back" and n.phase == "failed" and n.restore == "waiting"
        return (Verdict(Move.SHOW_ROLLING_BACK),) if restoring else ()
    if not fresh:
        return ()
    if report.kind == "step_failed":
        return (_failed(report, "failed", "waiting"),)
    return (Verdict(Move.START, step=report.step if report.step is not None else n.step),)


def _decide_restore(n: Node, report: Report) -> tuple[Verdict, ...]:
    """A report of a rollback or abort command."""
    prefix = f"{n.detail}; " if n.failed and n.detail else ""
    kind = report.kind
    if kind == "rejected":
        if n.restore != "waiting":
            return ()
        return (Verdict(Move.UNRESTORED, f"{prefix}rejected the {n.action}: {report.detail}"),)
    if report.is_status:
        return (Verdict(Move.AT_STEP, step=report.step),) if n.restore == "waiting" else ()
    if n.restore == "unrestored" and kind == "rolled_back":
        return (Verdict(Move.RESTORED),)  # back after its restore deadline; ran the retained command
    if n.restore != "waiting":
        return ()
    if kind in ("rolled_back", "succeeded"):
        return (Verdict(Move.RESTORED),)
    if kind == "rollback_failed":
        return (Verdict(Move.UNRESTORED, f"{prefix}{n.action} not verified: {report.restore_why}"),)
    if kind == "failed":
        return (Verdict(Move.UNRESTORED, f"{prefix}{n.action} failed: {report.restore_why}"),)
    return (Verdict(Move.UNDER_WAY, step=report.step),)
