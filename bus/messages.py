"""Every wire message of DESIGN section 2 as a pydantic v2 model.

Messages that cross a trust boundary (``Command``, ``Request``, ``RolloutSpec``
and the plan ``Step``s) forbid unknown fields and bound their sizes. Reports
from agents and the hub are parsed leniently about extra fields, so a newer
agent does not break an older hub. Every payload carries ``"v": 1``.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from bus import params
from bus.errors import InvalidInput
from bus.topics import NODE_ID_PATTERN

__all__ = [
    "MAX_PACKET_BYTES",
    "MAX_PAYLOAD_BYTES",
    "PLAN_PREFIX",
    "AdaptivePace",
    "Command",
    "ContainerStep",
    "DownloadStep",
    "Event",
    "FailurePolicy",
    "FileStep",
    "HealthStep",
    "Heartbeat",
    "HubState",
    "Inventory",
    "JobRef",
    "JobSnapshot",
    "LogLine",
    "MaintenanceWindow",
    "ModuleStep",
    "NodeState",
    "NodeSummary",
    "PackageStep",
    "Reply",
    "Request",
    "RestoreCheck",
    "RolloutCounts",
    "RolloutNodes",
    "RolloutSpec",
    "RolloutSummary",
    "ScriptStep",
    "ServiceStep",
    "Step",
    "StepState",
    "StepStatus",
    "Strategy",
    "TargetLabels",
    "decode",
    "encode",
    "new_id",
    "plan_for_node",
]

#: Rollout ids of plans (dry runs) start with this: their pre-flight reports are
#: no rollout's, and UIs and metrics leave them out.
PLAN_PREFIX = "plan-"

#: Largest payload any fleetbus process parses; larger ones are refused unread.
MAX_PAYLOAD_BYTES = 256 * 1024
#: Largest MQTT packet both brokers accept (embedded: bus.broker; mosquitto: max_packet_size).
#: Every process refuses payloads over MAX_PAYLOAD_BYTES unread, so the broker drops anything
#: far beyond that before it is read into memory; the margin keeps a broker from ever
#: disconnecting the hub for a message a reader would only have refused.
MAX_PACKET_BYTES = 4 * MAX_PAYLOAD_BYTES

NodeId = Annotated[str, StringConstraints(pattern=f"^{NODE_ID_PATTERN}$")]
#: A local name (downloaded file, script, service, unit): no path separators, no dot-dot.
SafeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$", max_length=128)]
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$", max_length=63)]


def _no_control(value: str) -> str:
    # Names and labels end up on operators' terminals: ESC/BEL sequences are refused here.
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("control characters (ESC, BEL, newline, ...) are not allowed")
    return value


#: Text without control characters (rollout names, node labels).
_Printable = Annotated[str, AfterValidator(_no_control)]
LabelValue = Annotated[str, StringConstraints(max_length=128), AfterValidator(_no_control)]
Seconds = Annotated[float, Field(gt=0, le=7 * 86400)]
#: Printable ASCII without spaces (a UUID, a CI job id, "deploy-2024-06-01-web").
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[!-~]+$", max_length=128)]


def new_id() -> str:
    """A fresh random id (uuid4, hex with dashes)."""
    return str(uuid.uuid4())


# NaN and infinities are refused in every message: JSON has no spelling for them (a
# parsed NaN would be re-encoded as null, which no reader takes back).
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, allow_inf_nan=False)


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- steps


class _StepBase(_Strict):
    timeout_s: Seconds | None = Field(
        default=None, description="Step timeout; None means the rollout's step_timeout_s."
    )


class DownloadStep(_StepBase):
    """Fetch ``url`` into the agent's cache as ``name`` and verify its sha256."""

    type: Literal["download"] = "download"
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
    name: SafeName
    max_bytes: int | None = Field(default=None, gt=0, description="Refuse larger downloads.")


class ServiceStep(_StepBase):
    """Stop, start or restart a service through the node's service manager."""

    type: Literal["service"] = "service"
    action: Literal["stop", "start", "restart"]
    name: SafeName


class PackageStep(_StepBase):
    """Install a package version from a downloaded file (``src``) or the repositories."""

    type: Literal["package"] = "package"
    manager: Literal["apt", "dnf", "yum", "dpkg"]
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9+._-]*$", max_length=128)]
    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+~:_-]+$", max_length=128)] | None = None
    src: SafeName | None = None


class ContainerStep(_StepBase):
    """Recreate a Docker container with a new image."""

    type: Literal["container"] = "container"
    name: SafeName
    image: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$", max_length=256)]
    pull: Literal["always", "missing", "never"] = Field(
        default="missing",
        description="When to pull the image: always; only when it is not on the node (the default, "
        "as compose and Kubernetes do; an air-gapped node with a loaded image needs no registry); never.",
    )

    @model_serializer(mode="wrap")
    def _without_default_pull(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Left out at its default, so agents that predate the field still take the command.
        data = handler(self)
        if isinstance(data, dict) and data.get("pull") == "missing":
            data.pop("pull", None)
        return data


class FileStep(_StepBase):
    """Atomically replace ``dest`` with a downloaded file; the old one is kept.

    A relative ``dest`` is relative to the agent's state dir (the same plan then
    fits nodes whose state dirs differ).
    """

    type: Literal["file"] = "file"
    src: SafeName
    dest: Annotated[str, StringConstraints(pattern=r"^[^\x00]+$", max_length=1024)]
    mode: Annotated[str, StringConstraints(pattern=r"^0?[0-7]{3}$")] = "0644"

    @field_validator("dest")
    @classmethod
    def _no_dot_dot(cls, value: str) -> str:
        if any(part == ".." for part in value.split("/")):
            raise ValueError("dest must not contain '..'")
        return value


class ScriptStep(_StepBase):
    """Run a script from the agent's scripts directory; ``rollback`` undoes it."""

    type: Literal["script"] = "script"
    name: SafeName
    args: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list, max_length=64
    )
    rollback: SafeName | None = None


class ModuleStep(_StepBase):
    """Load, unload or reload a kernel driver module."""

    type: Literal["module"] = "module"
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)]
    action: Literal["reload", "load", "unload"] = "reload"


class RestoreCheck(_Strict):
    """What a health check looks for once its node is restored (the old state answering)."""

    target: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    expect: Annotated[str, StringConstraints(max_length=1024)] | None = None


class HealthStep(_StepBase):
    """Check that the node is healthy after the change."""

    type: Literal["health"] = "health"
    check: Literal["command", "http", "tcp", "systemd"]
    target: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    expect: Annotated[str, StringConstraints(max_length=1024)] | None = None
    retries: int = Field(default=3, ge=1, le=100)
    interval_s: float = Field(default=1.0, ge=0, le=3600)
    verify: RestoreCheck | Literal["skip"] | None = Field(
        default=None,
        description="How this check verifies a restore after a rollback: fields that replace target "
        'and expect (e.g. the old version), or "skip". None: the same check with expect dropped.',
    )

    @model_serializer(mode="wrap")
    def _without_absent_verify(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Left out when absent, so agents that predate the field still take the command.
        data = handler(self)
        if isinstance(data, dict) and data.get("verify") is None:
            data.pop("verify", None)
        return data


Step = Annotated[
    Union[  # noqa: UP007 - pydantic needs the Union spelled out for discriminators on 3.10
        DownloadStep,
        ServiceStep,
        PackageStep,
        ContainerStep,
        FileStep,
        ScriptStep,
        ModuleStep,
        HealthStep,
    ],
    Field(discriminator="type"),
]
Plan = Annotated[list[Step], Field(min_length=1, max_length=64)]

# ------------------------------------------------------------------------ presence


class Inventory(_Report):
    """What a node runs: versions of what it manages, and its OS."""

    services: dict[str, str] = Field(default_factory=dict)
    packages: dict[str, str] = Field(default_factory=dict)
    drivers: dict[str, str] = Field(default_factory=dict)
    os: dict[str, str] = Field(default_factory=dict)
    health_saw: dict[str, str] = Field(
        default_factory=dict,
        description="Service or package -> the version its last passed health check saw answering, "
        "where the version reported here does not bear it out (left out when there is none).",
    )

    @model_serializer(mode="wrap")
    def _without_empty_health_saw(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not data.get("health_saw"):
            data.pop("health_saw", None)
        return data


class NodeState(_Report):
    """Retained birth (online) or last will / shutdown (offline) of a node."""

    v: Literal[1] = 1
    node: NodeId
    state: Literal["online", "offline"]
    session: Id
    reason: Literal["birth", "shutdown", "lost"]
    agent_version: str = ""
    started_at: float = 0.0
    labels: dict[_Printable, _Printable] = Field(default_factory=dict)
    inventory: Inventory = Field(default_factory=Inventory)
    heartbeat_s: float | None = Field(
        default=None, gt=0, description="The agent's heartbeat period; the hub expects one that often."
    )


class JobRef(_Report):
    """The job a node is busy with, as carried in heartbeats."""

    rollout: str
    command: str = ""
    step: int | None = None


class Heartbeat(_Report):
    """Periodic liveness and load report of a node."""

    v: Literal[1] = 1
    node: NodeId
    session: Id
    seq: int = Field(ge=0)
    ts: float
    uptime_s: float = 0.0
    load1: float = 0.0
    mem_used_pct: float = 0.0
    disk_free_pct: float = 0.0
    job: JobRef | None = None


class HubState(_Report):
    """Retained birth or will of the hub (``hub/state``), and of each hub's membership record.

    With standby hubs (DESIGN 3.9) ``hub/state`` says ``active`` for the hub that
    acts, naming it (``hub``) and its ``term``; a membership record
    (``hub/member/{id}``) says ``active``, ``standby`` or ``offline``.
    """

    v: Literal[1] = 1
    state: Literal["online", "offline", "active", "standby"]
    session: Id
    reason: Literal["birth", "shutdown", "lost"] = "birth"
    version: str = ""
    started_at: float = 0.0
    ts: float = Field(
        default=0.0,
        description="When this state began: a birth's or shutdown's publish time; for a will, when the "
        "connection it ends was made. 0: unknown.",
    )
    hub: str = Field(default="", max_length=128, description="The id of the hub this state is of.")
    term: int = Field(default=0, ge=0, description="The active hub's term (grows at every takeover).")
    sig: str = Field(
        default="",
        max_length=512,
        description="An active hub/state is signed like a command (a hub with a signing key): agents "
        "take its term as their floor, fencing off the replaced hub at once. Left out when unsigned.",
    )

    @model_serializer(mode="wrap")
    def _without_empty_sig(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not data.get("sig"):
            data.pop("sig", None)
        return data


# ------------------------------------------------------------------------ commands


class Command(_Strict):
    """A signed instruction from the hub to one node (retained on its ``cmd`` topic)."""

    v: Literal[1] = 1
    id: Id
    node: NodeId
    rollout: Id
    action: Literal["apply", "rollback", "abort", "preflight"] = Field(
        description="preflight (an extension): check the plan on the node without changing anything; "
        "sent unretained, answered on the status topic."
    )
    issued_at: float
    expires_at: float
    plan: list[Step] = Field(default_factory=list, max_length=64)
    defer_until: float | None = Field(
        default=None,
        description="An extension (edge_agent.deferral): an apply may wait for the node's update lock "
        "until then; absent: no waiting. Left out of the JSON when absent, so older agents read it.",
    )
    term: int = Field(
        default=0,
        ge=0,
        le=2**53,
        description="The issuing hub's term (DESIGN 3.9): an agent refuses a command whose term is below the "
        "highest it has seen. Left out of the JSON when 0, so older agents read it.",
    )
    sig: Annotated[str, StringConstraints(max_length=256)] = ""

    @model_serializer(mode="wrap")
    def _without_absent_extensions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            if data.get("defer_until") is None:
                data.pop("defer_until", None)
            if data.get("term") == 0:
                data.pop("term", None)
        return data

    @model_validator(mode="after")
    def _apply_has_plan(self) -> Command:
        if self.action in ("apply", "preflight") and not self.plan:
            raise ValueError(f"an {self.action} command needs a non-empty plan")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be later than issued_at")
        return self


StepStateName = Literal["running", "succeeded", "failed", "skipped", "rolled_back", "rejected", "deferred"]
#: "deferred" (waiting for the node's update lock) and "not_started" (gave up waiting) are extensions.
#: "rollback_failed": the agent undid its steps but could not show the old state answering again.
JobPhase = Literal[
    "applying",
    "succeeded",
    "failed",
    "rolling_back",
    "rolled_back",
    "rollback_failed",
    "rejected",
    "deferred",
    "not_started",
]


class StepStatus(_Report):
    """One step transition on a node."""

    v: Literal[1] = 1
    node: NodeId
    command: str
    rollout: str
    index: int = Field(ge=-1)
    type: str
    state: StepStateName
    ts: float
    detail: str = ""


class StepState(_Report):
    """A step's latest state inside a ``JobSnapshot``."""

    index: int
    type: str
    state: StepStateName | Literal["pending"] = "pending"
    detail: str = ""


class JobSnapshot(_Report):
    """The agent's retained view of its latest command."""

    v: Literal[1] = 1
    node: NodeId
    id: str
    rollout: str
    action: Literal["apply", "rollback", "abort"]
    phase: JobPhase
    steps: list[StepState] = Field(default_factory=list)
    issued_at: float = 0.0
    updated_at: float = 0.0
    detail: str = ""


class LogLine(_Report):
    """One line of a step's output."""

    v: Literal[1] = 1
    node: NodeId
    command: str
    rollout: str
    index: int
    stream: Literal["stdout", "stderr", "agent"] = "stdout"
    line: str
    ts: float


# ------------------------------------------------------------------------ requests

RequestOp = Literal["create_rollout", "abort", "rollback", "pause", "resume", "list", "show", "nodes", "plan"]


class Request(_Strict):
    """A request to the hub from the TUI, the CLI or any other tool."""

    v: Literal[1] = 1
    id: Id
    op: RequestOp
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    body: dict[str, Any] = Field(default_factory=dict)


class Reply(_Report):
    """The hub's answer to one ``Request``."""

    v: Literal[1] = 1
    request: str
    ok: bool
    error: str | None = None
    body: Any = None


class TargetLabels(_Strict):
    """Target every node whose labels include all of these."""

    labels: dict[Label, LabelValue] = Field(min_length=1, max_length=32)


Percent = Annotated[str, StringConstraints(pattern=r"^(100|[1-9][0-9]?)(\.[0-9]+)?%$")]


class AdaptivePace(_Strict):
    """Adaptive waves: grow after clean waves, shrink or hold when failures appear (``bus.pace``)."""

    start: Annotated[int, Field(ge=1)] | Percent = Field(
        default=1, description="Nodes (or percent of the targets) in the first wave."
    )
    max: Annotated[int, Field(ge=1)] | Percent | None = Field(
        default=None, description="Largest wave, a count or percent; none: no cap."
    )
    grow_factor: float = Field(
        default=2.0, gt=1, le=10, description="Next wave = size x this after a clean wave."
    )
    on_failures: Literal["shrink", "hold"] = Field(
        default="shrink", description="After a wave with (tolerated) failures: shrink or hold the size."
    )
    shrink_factor: float = Field(
        default=0.5, gt=0, lt=1, description="Next wave = size x this when shrinking."
    )


class Strategy(_Strict):
    """How a rollout spreads over its targets."""

    waves: list[Annotated[int, Field(ge=1)] | Percent] = Field(
        default_factory=lambda: list[int | str](["100%"]),
        min_length=1,
        max_length=100,
        description="Wave sizes: node counts or percents of the targets; the last repeats.",
    )
    max_parallel: int | None = Field(default=None, ge=1, description="At most this many nodes busy at once.")
    soak_s: float = Field(
        default=0.0, ge=0, le=86400, description="A wave succeeds after its nodes stay healthy this long."
    )
    adaptive: AdaptivePace | None = Field(
        default=None,
        description="Instead of fixed waves: grow after clean waves, shrink or hold on failures.",
    )

    @model_validator(mode="after")
    def _waves_or_adaptive(self) -> Strategy:
        # (The default ["100%"] may stand beside adaptive: a dumped spec carries it.)
        if self.adaptive is not None and list(self.waves) != ["100%"]:
            raise ValueError("give either waves or adaptive, not both")
        return self


class FailurePolicy(_Strict):
    """What a rollout does when nodes fail."""

    max_failed: int = Field(default=0, ge=0, description="Failures tolerated before acting.")
    on_failure: Literal["rollback", "halt"] = "rollback"


class MaintenanceWindow(_Strict):
    """A maintenance window (``hub.core.windows``): opens when ``cron`` matches, in each node's zone."""

    cron: Annotated[str, StringConstraints(min_length=9, max_length=200)] = Field(
        description="minute hour day-of-month month day-of-week: when the window opens (node's zone)."
    )
    duration_s: Seconds = Field(description="How long the window stays open.")


class RolloutSpec(_Strict):
    """What ``create_rollout`` and ``POST /api/updates`` take."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_control)]
    targets: Annotated[list[NodeId], Field(min_length=1, max_length=10000)] | TargetLabels | Literal["all"]
    plan: Plan
    strategy: Strategy = Field(default_factory=Strategy)
    failure: FailurePolicy = Field(default_factory=FailurePolicy)
    require_online: bool = True
    step_timeout_s: Seconds = 300.0
    node_timeout_s: Seconds = 1800.0
    expires_after_s: Seconds = 3600.0
    max_defer_s: float = Field(
        default=0.0,
        ge=0,
        le=7 * 86400,
        description="How long a node whose update lock is held may hold back its apply; past it the "
        "node is reported not_started (not failed). 0: a locked node does not wait.",
    )
    windows: list[MaintenanceWindow] = Field(
        default_factory=list,
        max_length=16,
        description="Maintenance windows: a node gets its apply only inside one (in its own zone: its "
        "tz label, else window_tz, else UTC). None: any time.",
    )
    window_tz: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None,
        description="Zone of the windows for nodes without a tz label (IANA, e.g. Europe/Berlin).",
    )
    on_window_end: Literal["finish", "pause"] = Field(
        default="finish",
        description="When a window ends: finish the wave in progress, or pause it until the next window.",
    )
    offline_grace_s: Seconds | None = Field(
        default=None,
        description="How long a node that went offline mid-job is 'lost' (not failed) before it counts "
        "as a failure. None: 3 heartbeats plus the keepalive (shown in the plan).",
    )
    restore_timeout_s: Seconds = Field(
        default=600.0,
        description="How long a coordinated rollback waits for an offline node to restore itself; "
        "past it the rollout ends rollback_failed naming the node.",
    )
    start_deadline_s: Seconds | None = Field(
        default=None,
        description="A node that has not started this long after its command was sent (offline, "
        "deferred) is not_started, not failed, and its command is withdrawn.",
    )
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description="Creating a rollout again with the same key returns the first rollout instead "
        "of starting a second one (HTTP: the Idempotency-Key header).",
    )

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("targets name a node more than once")
        return value

    @field_validator("plan")
    @classmethod
    def _known_parameters(cls, value: list[Step]) -> list[Step]:
        # DESIGN section 3, point 10: an unknown name is refused when the rollout is created.
        for number, step in enumerate(value, 1):
            for path, name in params.unknown_names(step.model_dump(mode="json")):
                raise ValueError(
                    f"plan step {number} ({step.type}) {path}: unknown variable {{{name}}} "
                    f"(known: {params.KNOWN})"
                )
        return value


RolloutState = Literal[
    "pending",
    "running",
    "paused",
    "succeeded",
    "halted",
    "rolling_back",
    "rolled_back",
    "rollback_failed",
    "aborting",
    "aborted",
]
NodePhase = Literal[
    "pending",
    "applying",
    "succeeded",
    "failed",
    "rolling_back",
    "rolled_back",
    "rejected",
    "timed_out",
    "offline",
    "lost",
    "rollback_failed",
    "deferred",
    "not_started",
]


class RolloutCounts(_Report):
    """How many target nodes are in each group."""

    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    rolled_back: int = 0
    rollback_failed: int = 0
    lost: int = 0
    deferred: int = 0
    not_started: int = 0


class NodeSummary(_Report):
    """One node's place in a rollout."""

    phase: NodePhase
    step: int | None = None
    detail: str = ""


class RolloutSummary(_Report):
    """Retained snapshot of one rollout, published on every change."""

    v: Literal[1] = 1
    id: str
    name: str
    state: RolloutState
    created_at: float
    updated_at: float
    counts: RolloutCounts = Field(default_factory=RolloutCounts)
    nodes: dict[str, NodeSummary] = Field(default_factory=dict)
    wave: int = 0
    waves: int = 0
    detail: str = ""
    #: How many nodes the rollout targets. When it is above ``len(nodes)``, the retained
    #: summary carries a bounded part of the nodes (those that need attention first) and
    #: every node's changes go out on ``rollout/{id}/nodes`` (``RolloutNodes``); ``show``
    #: and ``GET /api/rollouts/{id}`` answer with every node. None: ``nodes`` is complete.
    nodes_total: int | None = None


class RolloutNodes(_Report):
    """Per-node changes of one rollout (``rollout/{id}/nodes``, not retained, QoS 1).

    Each message names only the nodes whose ``phase``, ``step`` or ``detail``
    changed since the hub's previous message for this rollout; ``seq`` grows by
    one per message, so a reader sees a gap (then asks ``show`` for the whole table).
    """

    v: Literal[1] = 1
    rollout: str
    seq: int = Field(ge=1)
    ts: float
    nodes: dict[str, NodeSummary]


class Event(_Report):
    """One line of the fleet-wide feed for UIs."""

    v: Literal[1] = 1
    ts: float
    kind: str
    message: str
    rollout: str | None = None
    node: str | None = None


_STEP: TypeAdapter[Step] = TypeAdapter(Step)


def plan_for_node(plan: list[Step], node: str, labels: Mapping[str, str]) -> list[Step]:
    """The plan as it runs on ``node``: its per-node parameters resolved (``bus.params``).

    A step without variables is returned as it is; a resolved one is validated
    again, so a label value that makes a field invalid is refused too.

    Raises:
        InvalidInput: naming the step (1-based), the field and the variable or label.
    """
    resolved: list[Step] = []
    for number, step in enumerate(plan, 1):
        data = step.model_dump(mode="json")
        if not any(True for _ in params.variables(data)):
            resolved.append(step)
            continue
        try:
            data = params.resolve(data, node, labels)
            resolved.append(_STEP.validate_python(data))
        except InvalidInput as exc:
            raise InvalidInput(f"plan step {number} ({step.type}) {exc.reason}") from exc
        except ValidationError as exc:
            raise InvalidInput(
                f"plan step {number} ({step.type}) resolved for {node} is invalid: {describe(exc, data)}"
            ) from exc
    return resolved


# -------------------------------------------------------------------- encode/decode

M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    """The message as compact UTF-8 JSON."""
    return message.model_dump_json().encode("utf-8")


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse and validate a payload; raise InvalidInput with a one-line reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidInput(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            data = None
        raise InvalidInput(f"invalid {model.__name__}: {describe(exc, data)}") from exc


def describe(exc: ValidationError, data: Any = None) -> str:
    """A short, one-line account of a validation error, naming the fields.

    With the validated ``data`` the field paths are those the user wrote (union
    branch names folded away, see ``bus.validation``).
    """
    from bus.validation import explain, one_line

    if data is not None:
        return one_line(explain(exc, data))
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - 3
    if more > 0:
        parts.append(f"(+{more} more)")
    return re.sub(r"\s+", " ", "; ".join(parts))


def loads_object(payload: bytes | str) -> dict[str, Any]:
    """Parse a JSON object with the payload bound; raise InvalidInput otherwise."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidInput(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput("payload must be a JSON object")
    return value
