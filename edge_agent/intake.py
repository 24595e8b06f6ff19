"""Command intake (DESIGN sections 2 and 7): decide, before anything runs, whether to run a command.

The checks, in order: an empty payload (the hub clearing its retained
command) is ignored; the command must have arrived on this node's own ``cmd``
topic and name this node (amqtt leaks retained messages, FINDINGS.md); its raw
JSON object's signature must verify against a trusted key, *before* model
validation; then it is validated; a command already run is ignored silently
(the broker replays a retained command on every reconnect); it must not have
expired and must be issued later than the last command run; and every step
of an apply must be one this agent supports and its local policy allows.

``check_command`` never raises: any input gives a ``Verdict``.

``ReplayFloor`` keeps the highest ``issued_at`` ever taken in a file of its own
beside the journal: a journal that is reset (deleted, moved aside as corrupt)
must not let a captured, unexpired command run again (issue 16). The runner
checks against the higher of the two.

``TermFloor`` keeps the highest hub ``term`` of a command this node took, in
``term-floor`` beside it: a command of a lower term comes from a hub that
another has replaced since, and is refused (fencing, DESIGN 3.9).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bus.errors import FleetError, InvalidInput, SignatureError
from bus.files import write_atomic
from bus.messages import (
    Command,
    ContainerStep,
    ModuleStep,
    PackageStep,
    Step,
    describe,
    loads_object,
    plan_for_node,
)
from bus.signing import verify_fields
from bus.topics import Topics
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepHandler

__all__ = [
    "Accepted",
    "Ignored",
    "Rejected",
    "ReplayFloor",
    "TermFloor",
    "Verdict",
    "check_command",
    "check_plan",
    "check_step",
]

_LOGGER = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Accepted:
    """Run this command."""

    command: Command


@dataclass(frozen=True)
class Ignored:
    """Report nothing new (an empty payload, a replay).

    ``replay_of`` names the signed command seen again: the hub sends a command again
    when it may have missed the answer (a restart, a takeover), and the node's latest
    snapshot of it is the answer (``edge_agent.reporter.Reporter.answer_replay``).
    """

    reason: str
    replay_of: str | None = None


@dataclass(frozen=True)
class Rejected:
    """Refuse the command and report why.

    ``verified`` says the signature checked out: only then may the rejection
    replace the node's retained job snapshot (a forgery must never overwrite
    the snapshot of a real job).
    """

    reason: str
    command_id: str = ""
    rollout: str = ""
    action: str = ""
    issued_at: float = 0.0
    verified: bool = False


Verdict = Accepted | Ignored | Rejected


class ReplayFloor:
    """The highest ``issued_at`` this node ever took, in its own file.

    Blocking I/O: call ``read`` and ``raise_to`` through asyncio.to_thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value: float | None = None

    def read(self) -> float:
        """The floor (0.0 when the file is missing or unreadable, with a warning for the latter)."""
        if self._value is None:
            try:
                value = float(self.path.read_text(encoding="ascii").strip())
            except FileNotFoundError:
                value = 0.0
            except (OSError, ValueError) as exc:
                _LOGGER.warning(
                    "replay floor %s unreadable (%s): only the journal guards replays", self.path, exc
                )
                value = 0.0
            self._value = value if math.isfinite(value) else 0.0
        return self._value

    def raise_to(self, issued_at: float) -> None:
        """Persist ``issued_at`` as the floor if it is higher (durably, mode 600)."""
        if issued_at <= self.read():
            return
        write_atomic(self.path, f"{issued_at!r}\n", 0o600)
        self._value = issued_at


class TermFloor:
    """The highest hub term of a command this node took, in its own file (DESIGN 3.9).

    Blocking I/O: call ``read`` and ``raise_to`` through asyncio.to_thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value: int | None = None

    def read(self) -> int:
        """The floor (0 when the file is missing; unreadable is 0 with a warning)."""
        if self._value is None:
            try:
                value = int(self.path.read_text(encoding="ascii").strip())
            except FileNotFoundError:
                value = 0
            except (OSError, ValueError) as exc:
                _LOGGER.warning("term floor %s unreadable (%s): replaced hubs not fenced", self.path, exc)
                value = 0
            self._value = max(value, 0)
        return self._value

    def raise_to(self, term: int) -> None:
        """Persist ``term`` as the floor if it is higher (durably, mode 600)."""
        if term <= self.read():
            return
        write_atomic(self.path, f"{term}\n", 0o600)
        self._value = term


def _text_id(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    return value if isinstance(value, str) and _ID.fullmatch(value) else ""


def _rejected(reason: str, raw: Mapping[str, Any] | None = None, *, verified: bool = False) -> Rejected:
    if raw is None:
        return Rejected(reason)
    issued = raw.get("issued_at")
    action = raw.get("action")
    return Rejected(
        reason,
        command_id=_text_id(raw, "id"),
        rollout=_text_id(raw, "rollout"),
        action=action if action in ("apply", "rollback", "abort") else "",
        issued_at=_seconds(issued),
        verified=verified,
    )


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        seconds = float(value)
    except OverflowError:
        return 0.0
    return seconds if math.isfinite(seconds) else 0.0


def _policy_reason(step: Step, policy: Policy) -> str | None:
    if not Policy.matches(policy.step_types, step.type):
        return f"step type {step.type} is not allowed by this node's policy"
    if isinstance(step, PackageStep) and not Policy.matches(policy.packages, step.name):
        return f"package {step.name} is not allowed by this node's policy"
    if isinstance(step, ModuleStep) and not Policy.matches(policy.modules, step.name):
        return f"module {step.name} is not allowed by this node's policy"
    if isinstance(step, ContainerStep) and not Policy.matches(policy.images, step.image):
        return f"image {step.image} is not allowed by this node's policy"
    return None


def check_step(step: Step, settings: ExecutorSettings, handlers: Mapping[str, StepHandler]) -> str | None:
    """Why this node refuses one step (unsupported type, local policy, the handler's check), or None.

    Reads the scripts directory (scripts must exist); otherwise pure.
    """
    handler = handlers.get(step.type)
    if handler is None:
        return f"step type {step.type} is not supported by this agent"
    return _policy_reason(step, settings.policy) or handler.check(step, settings)


def check_plan(
    command: Command, settings: ExecutorSettings, handlers: Mapping[str, StepHandler]
) -> str | None:
    """The first reason this node refuses a step of the plan, or None.

    Reads the scripts directory (scripts must exist); otherwise pure.
    """
    for index, step in enumerate(command.plan):
        if step.type not in handlers:
            return f"step {index + 1}: step type {step.type} is not supported by this agent"
        reason = check_step(step, settings, handlers)
        if reason is not None:  # numbered from 1, as people count (DESIGN 3.11)
            return f"step {index + 1} ({step.type}): {reason}"
    return None


def check_command(
    topic: str,
    payload: bytes,
    *,
    settings: ExecutorSettings,
    topics: Topics,
    handlers: Mapping[str, StepHandler],
    now: float,
    seen: Container[str],
    last_issued_at: float,
    term_floor: int = 0,
) -> Verdict:
    """Decide what to do with one message from the ``cmd`` topic.

    Args:
        topic: the topic it arrived on.
        payload: its bytes, as received.
        settings: this node's settings (node id, trusted keys, policy, dirs).
        topics: the topic scheme (prefix) in use.
        handlers: the registered step handlers.
        now: the current time (epoch seconds).
        seen: ids of commands this agent already took.
        last_issued_at: ``issued_at`` of the last command it ran.
        term_floor: the highest hub term of a command it took (``TermFloor``).

    Returns:
        ``Accepted``, ``Ignored`` or ``Rejected`` (never raises).
    """
    try:
        return _check(topic, payload, settings, topics, handlers, now, seen, last_issued_at, term_floor)
    except Exception as exc:  # the last line of defence: bad input never crashes the agent
        _LOGGER.exception("command check failed")
        return Rejected(f"command could not be checked: {type(exc).__name__}")


def _check(
    topic: str,
    payload: bytes,
    settings: ExecutorSettings,
    topics: Topics,
    handlers: Mapping[str, StepHandler],
    now: float,
    seen: Container[str],
    last_issued_at: float,
    term_floor: int,
) -> Verdict:
    if not payload:
        return Ignored("empty payload (retained command cleared)")
    own = topics.node(settings.node, "cmd")
    if topic != own:
        # Not ours (a leaked retained message): no ids in the report, so it
        # can never be taken for this node's answer to that command.
        return Rejected(f"command arrived on {topic[:200]!r}, not on this node's topic {own}")
    try:
        raw = loads_object(payload)
    except FleetError as exc:
        return Rejected(exc.reason)
    if raw.get("node") != settings.node:
        shown = str(raw.get("node"))[:80]
        return _rejected(f"command is for node {shown!r}, not for {settings.node}", raw)
    if not settings.trusted_keys:
        return _rejected("no trusted key configured", raw)
    try:
        verify_fields(raw, settings.trusted_keys)
    except SignatureError as exc:
        return _rejected(exc.reason, raw)
    try:
        command = Command.model_validate(raw)
    except ValidationError as exc:
        return _rejected(f"invalid command: {describe(exc)}", raw, verified=True)
    if command.id in seen:
        return Ignored(f"command {command.id} already taken", replay_of=command.id)
    if command.expires_at <= now:
        return _rejected(f"command expired {now - command.expires_at:.0f} s ago", raw, verified=True)
    if command.plan:
        # Per-node parameters ({node}, {labels.NAME}) resolved before anything looks at the
        # plan: the signature covered the plan as the hub sent it (DESIGN 3.10).
        try:
            command = command.model_copy(
                update={"plan": plan_for_node(command.plan, settings.node, settings.labels)}
            )
        except InvalidInput as exc:
            return _rejected(exc.reason, raw, verified=True)
    if command.action == "preflight":
        # Read-only and never journalled: it neither raises the issued_at floor nor is
        # held to it, and its plan is checked step by step by edge_agent.preflight.
        return Accepted(command)
    if command.term < term_floor:
        # Fencing (DESIGN 3.9): a hub that was replaced, cut off and back, or a replay.
        return _rejected(
            f"command of hub term {command.term} is below term {term_floor}, the highest this node "
            "has taken: it comes from a hub that has been replaced",
            raw,
            verified=True,
        )
    if command.issued_at <= last_issued_at:
        return _rejected(
            f"command issued at {command.issued_at:.3f} is not later than the last command run "
            f"(issued at {last_issued_at:.3f})",
            raw,
            verified=True,
        )
    if command.action == "apply":
        reason = check_plan(command, settings, handlers)
        if reason is not None:
            return _rejected(reason, raw, verified=True)
    return Accepted(command)
