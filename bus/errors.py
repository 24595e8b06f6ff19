"""The one error tree of fleetbus.

    FleetError(reason)               anything fleetbus refuses or cannot do
    ├── InvalidInput                 bad user or wire input: ids, specs, payloads, flags
    │   └── InvalidNodeId            a node id outside DESIGN section 1's pattern
    ├── Conflict                     valid, but not now: offline or unknown targets, wrong state
    ├── NotFound                     an unknown rollout or node id
    ├── SignatureError               a command whose signature does not verify
    ├── ConfigError                  a config file, flag or environment value that is wrong
    ├── BusError                     the MQTT connection failed or timed out
    └── StepError                    a plan step failed on a node (carries the tool's message)

Library errors are translated once, at the edge that calls the library, with
``raise ... from exc``. Every class carries its ``status``, the one table of
what each surface makes of it (a unit test checks every class declares one):

    class            reply kind     HTTP  exit  exit (hub's reply)
    FleetError       error          503   2     1
    InvalidInput     invalid_input  422   2     2
    Conflict         conflict       409   2     1
    NotFound         not_found      404   2     1
    SignatureError   error          503   2     1
    ConfigError      config         503   2     1
    BusError         bus            503   1     1
    StepError        error          503   2     1

The hub answers ``Reply(ok=False, body={"kind": ...})`` (``exc.status.kind``), the HTTP
bridge the status code, the CLI one line on stderr and the exit code: for an
error raised in its own process ``exit``, for a hub's refusal ``reply_exit``
(``reply_exit_code``): only input the hub refused is a usage error there (DESIGN
section 4: 1 the operation failed, 2 bad usage or input). The agent answers
``rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "BusError",
    "ConfigError",
    "Conflict",
    "ErrorStatus",
    "FleetError",
    "InvalidInput",
    "InvalidNodeId",
    "NotFound",
    "SignatureError",
    "StepError",
    "error_classes",
    "reply_exit_code",
]


@dataclass(frozen=True)
class ErrorStatus:
    """What each surface makes of one error class (the table in the module docstring)."""

    #: ``Reply.body["kind"]`` of a refused MQTT request.
    kind: str
    #: The HTTP bridge's status code.
    http: int
    #: The CLI's exit code when the error is raised in its own process.
    exit: int
    #: The CLI's exit code when the hub refuses a request with this error.
    reply_exit: int


class FleetError(Exception):
    """Root of every error fleetbus raises on purpose."""

    status: ClassVar[ErrorStatus] = ErrorStatus(kind="error", http=503, exit=2, reply_exit=1)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidInput(FleetError):
    """Input from a user or the wire that fleetbus refuses."""

    status = ErrorStatus(kind="invalid_input", http=422, exit=2, reply_exit=2)


class InvalidNodeId(InvalidInput):
    """A node id that does not match ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""

    status = InvalidInput.status


class Conflict(FleetError):
    """A valid request that cannot be carried out now (offline targets, a final rollout)."""

    status = ErrorStatus(kind="conflict", http=409, exit=2, reply_exit=1)

    def __init__(self, reason: str, nodes: list[str] | None = None) -> None:
        super().__init__(reason)
        self.nodes = nodes or []


class NotFound(FleetError):
    """An id that names nothing the hub knows."""

    status = ErrorStatus(kind="not_found", http=404, exit=2, reply_exit=1)


class SignatureError(FleetError):
    """A signed message whose signature is missing, malformed or untrusted."""

    status = FleetError.status


class ConfigError(FleetError):
    """A configuration value (flag, environment, TOML) that cannot be used."""

    status = ErrorStatus(kind="config", http=503, exit=2, reply_exit=1)


class BusError(FleetError):
    """The MQTT connection could not be made or was lost for good."""

    status = ErrorStatus(kind="bus", http=503, exit=1, reply_exit=1)


class StepError(FleetError):
    """A plan step failed; ``reason`` carries the tool's own message."""

    status = FleetError.status


def error_classes() -> list[type[FleetError]]:
    """Every class of the tree, root first (subclasses included wherever they are defined)."""
    found: list[type[FleetError]] = [FleetError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


def reply_exit_code(kind: object) -> int:
    """The CLI's exit code for a hub's refusal naming ``kind`` (1 for kinds outside the tree)."""
    for cls in error_classes():
        if cls.status.kind == kind:
            return cls.status.reply_exit
    return 1
