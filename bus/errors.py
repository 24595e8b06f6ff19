"""The one error tree of fleetbus.

    FleetError(reason)               anything fleetbus refuses or cannot do
    ├── InvalidInput                 bad user or wire input: ids, specs, payloads, flags (HTTP 422)
    │   └── InvalidNodeId            a node id outside DESIGN section 1's pattern
    ├── Conflict                     valid, but not now: offline or unknown targets, wrong state (HTTP 409)
    ├── NotFound                     an unknown rollout or node id (HTTP 404)
    ├── SignatureError               a command whose signature does not verify
    ├── ConfigError                  a config file, flag or environment value that is wrong
    ├── BusError                     the MQTT connection failed or timed out
    └── StepError                    a plan step failed on a node (carries the tool's message)

Library errors are translated once, at the edge that calls the library, with
``raise ... from exc``. Each surface maps the tree in one place: HTTP -> 4xx JSON,
hub -> ``Reply(ok=False)``, agent -> ``rejected``, CLI -> one line and exit 2.
"""

from __future__ import annotations

__all__ = [
    "BusError",
    "ConfigError",
    "Conflict",
    "FleetError",
    "InvalidInput",
    "InvalidNodeId",
    "NotFound",
    "SignatureError",
    "StepError",
]


class FleetError(Exception):
    """Root of every error fleetbus raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidInput(FleetError):
    """Input from a user or the wire that fleetbus refuses."""


class InvalidNodeId(InvalidInput):
    """A node id that does not match ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""


class Conflict(FleetError):
    """A valid request that cannot be carried out now (offline targets, a final rollout)."""

    def __init__(self, reason: str, nodes: list[str] | None = None) -> None:
        super().__init__(reason)
        self.nodes = nodes or []


class NotFound(FleetError):
    """An id that names nothing the hub knows."""


class SignatureError(FleetError):
    """A signed message whose signature is missing, malformed or untrusted."""


class ConfigError(FleetError):
    """A configuration value (flag, environment, TOML) that cannot be used."""


class BusError(FleetError):
    """The MQTT connection could not be made or was lost for good."""


class StepError(FleetError):
    """A plan step failed; ``reason`` carries the tool's own message."""
