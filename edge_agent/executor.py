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
so "failed, node restored" stays visible (phase ``rolled_back`` + a failed step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Command, JobPhase, JobSnapshot, Step, StepState

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
    "finish",
    "identity",
    "new_apply",
    "recovery",
    "remember",
    "set_phase",
    "snapshot",
    "undo_order",
    "undo_outcome",
    "update_step",
]

#: Command ids remembered for replay protection.
MAX_SEEN = 500
#: Rollouts whose latest apply (with undo records) stays in the journal.
MAX_APPLIES = 32

Action = Literal["apply", "rollback", "abort"]
StepRun = Literal["pending", "running", "succeeded", "failed", "cancelled", "interrupted"]
UndoRun = Literal["none", "running", "done", "failed"]
FINAL_PHASES: frozenset[str] = frozenset({"succeeded", "failed", "rolled_back", "rejected"})
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


def undo_order(steps: Sequence[StepEntry]) -> list[int]:
    """Indexes to undo, last first: every step that started and is not undone yet.

    A failed, cancelled or interrupted step is undone too (its partial work);
    a step whose undo failed before is tried again; pending steps never ran.
    """
    return [s.index for s in reversed(steps) if s.state in _STARTED and s.undo != "done"]


def undo_outcome(entry: ApplyEntry) -> tuple[JobPhase, str]:
    """The phase after an undo pass: ``rolled_back``, or ``failed`` naming each failed undo."""
    failed = [s for s in entry.steps if s.undo == "failed"]
    if not failed:
        return "rolled_back", ""
    named = "; ".join(f"undo of step {s.index} ({s.type}) failed: {s.undo_detail}" for s in failed)
    return "failed", named


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
        undo=[] if entry.phase in FINAL_PHASES else undo_order(entry.steps),
    )


def _shown(step: StepEntry, final: bool) -> StepState:
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
