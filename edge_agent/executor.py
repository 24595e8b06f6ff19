"""The pure core of the agent's executor: journal state, its transitions, undo order.

No I/O here (STYLE section 4): ``edge_agent.runner`` feeds these functions and
persists what they return through ``edge_agent.journal``. The journal keeps,
per rollout, the latest apply command with each step's state and undo record
(kept after success, so a later ``rollback`` can undo it), the command that is
running (``active``: a restart finds it and restores the node, DESIGN 3.6),
the ids of the last ``MAX_SEEN`` commands and the ``issued_at`` of the last
command run (replays stay ignored after a restart, DESIGN section 2).

A step's apply outcome (``state``) and its undo (``undo``) are kept apart: the
retained snapshot shows a failed step as ``failed`` even after it was undone,
so "failed, node restored" stays visible.

After an undo pass the runner verifies the restore (the plan's health checks in
restore mode, ``edge_agent.steps.health``); each check's outcome is kept on its
step (``verified``). ``final_phase`` says what the job ends as: ``rolled_back``
(rollback or abort, restore verified), ``failed`` (a step failed and the node
restored itself, verified) or ``rollback_failed`` (an undo failed, or the
restore could not be verified), with the evidence in one line. Steps are
numbered from 1 in every text (DESIGN 3.11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Command, JobPhase, JobSnapshot, ModuleStep, ServiceStep, Step, StepState

__all__ = [
    "FINAL_PHASES",
    "MAX_APPLIES",
    "MAX_SEEN",
    "ActiveJob",
    "ApplyEntry",
    "JournalState",
    "Recovery",
    "StepEntry",
    "adopt",
    "begin",
    "final_phase",
    "finish",
    "identity",
    "is_deferred_undo",
    "new_apply",
    "recovery",
    "remember",
    "set_phase",
    "snapshot",
    "undo_order",
    "undo_outcome",
    "update_step",
    "verification",
]

#: Command ids remembered for replay protection.
MAX_SEEN = 500
#: Rollouts whose latest apply (with undo records) stays in the journal.
MAX_APPLIES = 32

Action = Literal["apply", "rollback", "abort"]
StepRun = Literal["pending", "running", "succeeded", "failed", "cancelled", "interrupted"]
UndoRun = Literal["none", "running", "done", "failed"]
VerifyRun = Literal["none", "passed", "failed", "skipped"]
FINAL_PHASES: frozenset[str] = frozenset(
    {"succeeded", "failed", "rolled_back", "rollback_failed", "rejected"}
)
_STARTED: frozenset[str] = frozenset({"running", "succeeded", "failed", "cancelled", "interrupted"})


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepEntry(_Frozen):
    """One step of a journalled apply: how its apply went, how its undo went."""

    index: int
    type: str
    state: StepRun = "pending"
    undo: UndoRun = "none"
    detail: str = ""
    undo_detail: str = ""
    record: dict[str, Any] | None = Field(
        default=None, description="the handler's undo record (checkpointed while it runs)"
    )
    verified: VerifyRun = Field(default="none", description="this health check's verification of a restore")
    verify_detail: str = ""


class ApplyEntry(_Frozen):
    """The latest apply command of one rollout on this node, kept for rollback."""

    command: str
    rollout: str
    issued_at: float
    plan: list[Step]
    steps: list[StepEntry]
    phase: JobPhase = "applying"
    detail: str = ""


class ActiveJob(_Frozen):
    """The command being carried out (what reports are made as)."""

    command: str
    action: Action
    rollout: str
    issued_at: float


class JournalState(_Frozen):
    """Everything the agent must not forget across a restart."""

    v: Literal[1] = 1
    seen: list[str] = Field(default_factory=list)
    last_issued_at: float = 0.0
    applies: dict[str, ApplyEntry] = Field(default_factory=dict)
    active: ActiveJob | None = None


@dataclass(frozen=True)
class Recovery:
    """What a restarted agent must finish: undo ``undo`` (in that order) for ``job``."""

    job: ActiveJob
    entry: ApplyEntry | None
    interrupted: int | None
    undo: list[int]


def identity(command: Command) -> ActiveJob:
    """The reporting identity of a command."""
    return ActiveJob(
        command=command.id, action=command.action, rollout=command.rollout, issued_at=command.issued_at
    )


def remember(state: JournalState, command_id: str, issued_at: float | None) -> JournalState:
    """Record a command id as seen; ``issued_at`` (of a command that runs) raises the floor."""
    seen = [s for s in state.seen if s != command_id]
    seen.append(command_id)
    update: dict[str, Any] = {"seen": seen[-MAX_SEEN:]}
    if issued_at is not None:
        update["last_issued_at"] = max(state.last_issued_at, issued_at)
    return state.model_copy(update=update)


def new_apply(command: Command) -> ApplyEntry:
    """A fresh journal entry for an apply command: every step pending."""
    return ApplyEntry(
        command=command.id,
        rollout=command.rollout,
        issued_at=command.issued_at,
        plan=list(command.plan),
        steps=[StepEntry(index=i, type=step.type) for i, step in enumerate(command.plan)],
    )


def begin(state: JournalState, command: Command) -> JournalState:
    """Start carrying out ``command``: it becomes active; an apply gets a fresh entry.

    The entry of an older apply of the same rollout is replaced (only the
    latest apply of a rollout can be rolled back); the oldest rollouts are
    dropped beyond ``MAX_APPLIES``.
    """
    applies = dict(state.applies)
    if command.action == "apply":
        applies.pop(command.rollout, None)
        keep = sorted(applies.values(), key=lambda e: e.issued_at)[-(MAX_APPLIES - 1) :]
        applies = {e.rollout: e for e in keep}
        applies[command.rollout] = new_apply(command)
    return state.model_copy(update={"applies": applies, "active": identity(command)})


def adopt(state: JournalState, command: Command) -> JournalState:
    """An abort/rollback of the running rollout takes over the running job's reports."""
    return state.model_copy(update={"active": identity(command)})


def finish(state: JournalState) -> JournalState:
    """Nothing is running any more."""
    return state.model_copy(update={"active": None})


def _replace_entry(state: JournalState, entry: ApplyEntry) -> JournalState:
    applies = dict(state.applies)
    applies[entry.rollout] = entry
    return state.model_copy(update={"applies": applies})


def update_step(journal: JournalState, rollout: str, index: int, **changes: Any) -> JournalState:
    """Change fields of one step of a rollout's entry (state, undo, detail, record)."""
    entry = journal.applies[rollout]
    steps = list(entry.steps)
    steps[index] = steps[index].model_copy(update=changes)
    return _replace_entry(journal, entry.model_copy(update={"steps": steps}))


def set_phase(state: JournalState, rollout: str, phase: JobPhase, detail: str = "") -> JournalState:
    """Set the phase of a rollout's entry."""
    entry = state.applies[rollout]
    return _replace_entry(state, entry.model_copy(update={"phase": phase, "detail": detail}))


def is_deferred_undo(step: Step) -> bool:
    """True for a step whose undo restarts something: it must run after every other undo.

    A ``service restart`` (or a module ``reload``) is undone by restarting
    (reloading) again, which only restores the old state once the files,
    packages or images undone after it in reverse order are back: undone in
    place, it would restart on the new file and leave it running (issue 24).
    """
    return (isinstance(step, ServiceStep) and step.action == "restart") or (
        isinstance(step, ModuleStep) and step.action == "reload"
    )


def undo_order(steps: Sequence[StepEntry], plan: Sequence[Step] = ()) -> list[int]:
    """Indexes to undo, last first: every step that started and is not undone yet.

    A failed, cancelled or interrupted step is undone too (its partial work);
    a step whose undo failed before is tried again; pending steps never ran.
    With the ``plan``, the undo of a restart or reload goes after all the
    others (``is_deferred_undo``), last first among themselves.
    """
    order = [s.index for s in reversed(steps) if s.state in _STARTED and s.undo != "done"]
    deferred = [i for i in order if i < len(plan) and is_deferred_undo(plan[i])]
    return [i for i in order if i not in deferred] + deferred


def _step_name(step: StepEntry) -> str:
    return f"step {step.index + 1} ({step.type})"


def undo_outcome(entry: ApplyEntry) -> tuple[JobPhase, str]:
    """After an undo pass: ``rolled_back``, or ``rollback_failed`` naming each failed undo (1-based)."""
    failed = [s for s in entry.steps if s.undo == "failed"]
    if not failed:
        return "rolled_back", ""
    named = "; ".join(f"undo of {_step_name(s)} failed: {s.undo_detail}" for s in failed)
    return "rollback_failed", named


def verification(entry: ApplyEntry) -> tuple[bool, str]:
    """Whether the restore is verified, and the evidence in one line (checks numbered from 1)."""
    failed = [s for s in entry.steps if s.verified == "failed"]
    if failed:
        return False, "; ".join(f"restore not verified: {_step_name(s)} {s.verify_detail}" for s in failed)
    passed = [s for s in entry.steps if s.verified == "passed"]
    if passed:
        return True, "restore verified: " + "; ".join(f"{_step_name(s)} {s.verify_detail}" for s in passed)
    return True, "restore not checked: the plan has no health check to verify it"


def final_phase(entry: ApplyEntry, *, self_restore: bool) -> tuple[JobPhase, str]:
    """What an undo pass ends as (see the module docstring) and its detail, in one line.

    ``self_restore``: the node undid an apply whose step failed (not a rollback
    or abort); verified, it ends ``failed`` naming the failed step.
    """
    phase, detail = undo_outcome(entry)
    if phase != "rolled_back":
        return phase, detail
    ok, evidence = verification(entry)
    if not ok:
        return "rollback_failed", evidence
    if self_restore:
        failed = next((s for s in entry.steps if s.state == "failed"), None)
        if failed is not None:
            why = (
                f"{_step_name(failed)} failed: {failed.detail}"
                if failed.detail
                else f"{_step_name(failed)} failed"
            )
            return "failed", f"{why}; node restored, {evidence}"
    return "rolled_back", evidence


def recovery(state: JournalState) -> Recovery | None:
    """What a restart must finish, or None when no command was interrupted.

    An apply interrupted mid-step, or any undo pass interrupted, is finished
    by undoing what is left (the interrupted step included).
    """
    job = state.active
    if job is None:
        return None
    entry = state.applies.get(job.rollout)
    if entry is None:
        return Recovery(job=job, entry=None, interrupted=None, undo=[])
    running = [s.index for s in entry.steps if s.state == "running"]
    return Recovery(
        job=job,
        entry=entry,
        interrupted=running[0] if running else None,
        undo=[] if entry.phase in FINAL_PHASES else undo_order(entry.steps, entry.plan),
    )


def _shown(step: StepEntry, final: bool) -> StepState:
    if step.verified == "failed":
        return StepState(
            index=step.index,
            type=step.type,
            state="failed",
            detail=f"restore not verified: {step.verify_detail}",
        )
    shown = _shown_undo(step, final)
    if step.verified == "passed":
        return shown.model_copy(update={"detail": f"restore verified: {step.verify_detail}"})
    return shown


def _shown_undo(step: StepEntry, final: bool) -> StepState:
    if step.undo == "failed":
        return StepState(index=step.index, type=step.type, state="failed", detail=step.undo_detail)
    if step.undo == "done":
        state: Any = "failed" if step.state in ("failed", "interrupted") else "rolled_back"
        return StepState(index=step.index, type=step.type, state=state, detail=step.detail)
    shown: Any = {
        "pending": "skipped" if final else "pending",
        "cancelled": "failed",
        "interrupted": "failed",
    }.get(step.state, step.state)
    return StepState(index=step.index, type=step.type, state=shown, detail=step.detail)


def snapshot(
    job: ActiveJob,
    entry: ApplyEntry | None,
    *,
    node: str,
    phase: JobPhase,
    now: float,
    detail: str = "",
) -> JobSnapshot:
    """The retained ``JobSnapshot`` of ``job`` over the steps of ``entry``."""
    final = phase in FINAL_PHASES and phase != "succeeded"
    steps = [_shown(s, final) for s in entry.steps] if entry is not None else []
    return JobSnapshot(
        node=node,
        id=job.command,
        rollout=job.rollout,
        action=job.action,
        phase=phase,
        steps=steps,
        issued_at=job.issued_at,
        updated_at=now,
        detail=detail,
    )
