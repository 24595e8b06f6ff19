"""What every step handler gets (``StepContext``) and provides (``StepHandler``).

A handler is three functions of one step type:

- ``check(step, settings) -> str | None``: at intake, before anything runs: the
  reason this node refuses the step (a script that is not there, a service
  that is not defined), or None.
- ``apply(step, ctx) -> dict``: do the work; return the undo record (JSON-able),
  which the runner journals. ``await ctx.checkpoint(record)`` before touching
  anything journals a partial record first, so an interrupted or failed apply
  can still be undone.
- ``undo(step, ctx, record)``: put back what ``apply`` changed. ``record`` is
  the returned record, the last checkpoint, or None (the step never got as far
  as its first checkpoint). Undo must be idempotent: a restart may run it again.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bus.errors import StepError
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.system import LineSink

__all__ = [
    "ApplyFn",
    "CheckFn",
    "Phase",
    "StepContext",
    "StepHandler",
    "UndoFn",
    "check_script",
    "no_check",
    "resolve_script",
]

Phase = Literal["apply", "rollback", "verify"]
"""``verify``: a health check run after an undo, to show the restored state answering."""


@dataclass(frozen=True)
class StepContext:
    """Where and for whom a step runs, and how it reports.

    Attributes:
        node: this node's id.
        rollout: the rollout the step belongs to.
        command: id of the apply command that owns the step (it names the step's
            artifacts, e.g. ``state_dir/backup/<command>/<index>``, also on undo).
        index: the step's index in the plan.
        phase: ``apply``, ``rollback`` (undo) or ``verify`` (a health check verifying a restore).
        settings: the node's executor settings.
        timeout: seconds this apply or undo may take.
        log: coroutine that reports one agent line to the ``log`` topic.
        output: sink for a process's (stream, line) output, to the ``log`` topic.
        checkpoint: coroutine that journals a partial undo record.
    """

    node: str
    rollout: str
    command: str
    index: int
    phase: Phase
    settings: ExecutorSettings
    timeout: float
    log: Callable[[str], Awaitable[None]]
    output: LineSink
    checkpoint: Callable[[dict[str, Any]], Awaitable[None]]

    @property
    def state_dir(self) -> Path:
        """The agent's state directory (cwd of scripts)."""
        return self.settings.state_dir

    @property
    def scripts_dir(self) -> Path:
        """The only directory scripts run from."""
        return self.settings.scripts_dir

    @property
    def cache_dir(self) -> Path:
        """Where downloads land (``state_dir/cache``)."""
        return self.settings.cache_dir

    def script_env(self, phase: Phase | None = None) -> dict[str, str]:
        """The environment of scripts (DESIGN section 2): FLEET_* and PATH, nothing else."""
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "FLEET_NODE": self.node,
            "FLEET_ROLLOUT": self.rollout,
            "FLEET_COMMAND": self.command,
            "FLEET_STATE_DIR": str(self.state_dir),
            "FLEET_PHASE": phase or self.phase,
        }


ApplyFn = Callable[[Any, StepContext], Awaitable[dict[str, Any]]]
UndoFn = Callable[[Any, StepContext, "dict[str, Any] | None"], Awaitable[None]]
CheckFn = Callable[[Any, ExecutorSettings], "str | None"]


def no_check(_step: Any, _settings: ExecutorSettings) -> str | None:
    """A handler with nothing to check at intake."""
    return None


@dataclass(frozen=True)
class StepHandler:
    """The functions that carry out one step type."""

    apply: ApplyFn
    undo: UndoFn
    check: CheckFn = no_check


def resolve_script(scripts_dir: Path, name: str) -> Path:
    """The path of script ``name``: a regular, executable file inside ``scripts_dir``.

    Symlinks are resolved first, so a link pointing out of the directory is refused.

    Raises:
        StepError: no such script, outside the directory, or not executable.
    """
    if not name or "/" in name or name in (".", ".."):
        raise StepError(f"invalid script name {name[:80]!r}")
    try:
        base = scripts_dir.resolve(strict=True)
        path = (scripts_dir / name).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise StepError(f"script {name} not found in the scripts directory") from exc
    if path.parent != base and base not in path.parents:
        raise StepError(f"script {name} resolves outside the scripts directory")
    if not path.is_file():
        raise StepError(f"script {name} is not a regular file")
    if not os.access(path, os.X_OK):
        raise StepError(f"script {name} is not executable")
    return path


def check_script(settings: ExecutorSettings, name: str) -> str | None:
    """Intake check of a script name: allowed by the policy and present in the scripts dir."""
    if not Policy.matches(settings.policy.scripts, name):
        return f"script {name} is not allowed by this node's policy"
    try:
        resolve_script(settings.scripts_dir, name)
    except StepError as exc:
        return exc.reason
    return None
