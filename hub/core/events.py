"""What goes into the rollout engine (events) and what comes out (actions): plain values.

The runner (``hub.rollouts.RolloutManager``) turns bus messages, requests and
the passing of time into events for ``RolloutEngine.handle(event, now)`` and
carries out the actions it returns, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from bus.messages import Command, JobSnapshot, RolloutSpec, StepStatus

__all__ = [
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
    "RolloutsLoaded",
    "SnapshotReported",
    "StepReported",
    "Tick",
]

# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RolloutCreated:
    """A validated rollout: ``nodes`` are the resolved targets, ``online`` those online now."""

    rollout: str
    spec: RolloutSpec
    nodes: tuple[str, ...]
    online: frozenset[str] = frozenset()
    zones: Mapping[str, str] = field(default_factory=dict)  # node -> its tz label (maintenance windows)


@dataclass(frozen=True)
class RolloutsLoaded:
    """Records read back from the store after a restart (every rollout, final ones too)."""

    records: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class AbortRequested:
    """An operator asked for a coordinated rollback of a non-final rollout."""

    rollout: str


@dataclass(frozen=True)
class RollbackRequested:
    """An operator asked to roll back a finished rollout."""

    rollout: str


@dataclass(frozen=True)
class PauseRequested:
    """No new commands until resumed; running nodes continue."""

    rollout: str


@dataclass(frozen=True)
class ResumeRequested:
    """Continue a paused rollout."""

    rollout: str


@dataclass(frozen=True)
class StepReported:
    """A ``StepStatus`` received on ``node``'s status topic."""

    node: str
    status: StepStatus


@dataclass(frozen=True)
class SnapshotReported:
    """A (retained) ``JobSnapshot`` received on ``node``'s job topic."""

    node: str
    snapshot: JobSnapshot


@dataclass(frozen=True)
class PresenceChanged:
    """The registry saw ``node`` come online or go offline (will, shutdown, missed heartbeats)."""

    node: str
    online: bool


@dataclass(frozen=True)
class BrokerChanged:
    """The hub's own broker connection went down or came back (DESIGN 3.4: a broker event)."""

    connected: bool


@dataclass(frozen=True)
class Tick:
    """Time passed: check deadlines (node timeouts, expiry, soak)."""


EngineEvent = Union[  # noqa: UP007 - a runtime alias; `X | Y` of classes needs 3.10's types.UnionType
    RolloutCreated,
    RolloutsLoaded,
    AbortRequested,
    RollbackRequested,
    PauseRequested,
    ResumeRequested,
    StepReported,
    SnapshotReported,
    PresenceChanged,
    BrokerChanged,
    Tick,
]

# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class PublishCommand:
    """Sign ``command`` and publish it retained (QoS 1) on its node's ``cmd`` topic."""

    node: str
    command: Command


@dataclass(frozen=True)
class ClearCommand:
    """Publish an empty retained payload on ``node``'s ``cmd`` topic (it held ``command``)."""

    node: str
    command: str


@dataclass(frozen=True)
class RolloutChanged:
    """Persist ``record(rollout)`` and publish its summary (the runner coalesces both)."""

    rollout: str


@dataclass(frozen=True)
class Audit:
    """An automatic decision or an operator request, with its evidence (audit table + event feed)."""

    rollout: str
    kind: str
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    node: str | None = None


Action = Union[PublishCommand, ClearCommand, RolloutChanged, Audit]  # noqa: UP007 - see EngineEvent
