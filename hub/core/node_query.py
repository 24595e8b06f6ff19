"""Which nodes a ``nodes`` request (or ``GET /api/nodes``) asks for, and their counts.

A query filters on presence (``state``), labels (every ``{name: value}`` must
match), a shell-style glob on the node id (``node``, ``fnmatch`` rules, case
sensitive) and reported versions (``versions``: ``{software: version or null}``,
null for "reports it at any version"); ``summary`` turns the reply into counts
by state and by software version instead of rows. Pure functions over the
registry's ``NodeInfo``: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bus.errors import InvalidInput

__all__ = ["NodeQuery", "node_versions", "summarise"]

_STATES = ("online", "offline")


@dataclass(frozen=True)
class NodeQuery:
    """A parsed filter; ``matches`` tells whether a node passes it."""

    state: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str | None = None
    versions: Mapping[str, str | None] = field(default_factory=dict)
    _pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> NodeQuery:
        """The filter of a request body; InvalidInput naming the bad field."""
        state = body.get("state")
        if state is not None and state not in _STATES:
            raise InvalidInput("state must be 'online' or 'offline'")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise InvalidInput("labels must be an object of strings")
        node = body.get("node")
        if node is not None and (not isinstance(node, str) or not node or len(node) > 200):
            raise InvalidInput("node must be a glob of 1-200 characters, e.g. 'web-*'")
        versions = body.get("versions") or {}
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and k and (v is None or isinstance(v, str)) for k, v in versions.items()
        ):
            raise InvalidInput("versions must be an object of software -> version (or null)")
        pattern = re.compile(fnmatch.translate(node)) if node is not None else None
        return cls(state, dict(labels), node, dict(versions), pattern)

    @property
    def empty(self) -> bool:
        """True when every node passes."""
        return self.state is None and not self.labels and self.node is None and not self.versions

    def matches(self, info: Any) -> bool:
        """Whether a registry ``NodeInfo`` passes."""
        if self.state is not None and ("online" if info.online else "offline") != self.state:
            return False
        if self._pattern is not None and not self._pattern.match(info.node):
            return False
        node_labels = info.labels
        if any(node_labels.get(k) != v for k, v in self.labels.items()):
            return False
        if self.versions:
            have = node_versions(info)
            return all(
                name in have and (version is None or have[name] == version)
                for name, version in self.versions.items()
            )
        return True


def node_versions(info: Any) -> dict[str, str]:
    """A node's ``{software: version}``: the agent, drivers, packages, services (these win).

    The same rule as ``tui.versions.software_versions`` (``fleet nodes --by-version``).
    """
    inventory = info.inventory
    found: dict[str, str] = {"fleet-agent": info.agent_version} if info.agent_version else {}
    for group in (inventory.drivers, inventory.packages, inventory.services):
        found.update(group)
    return found


def summarise(infos: Iterable[Any]) -> dict[str, Any]:
    """Counts of the nodes: ``{"total", "by_state": {online, offline}, "by_version": {software: {v: n}}}``.

    ``by_version`` lists every software with its versions, the most common first.
    """
    return count_nodes((info.online, node_versions(info)) for info in infos)


def count_nodes(nodes: Iterable[tuple[bool, Mapping[str, str]]]) -> dict[str, Any]:
    """``summarise`` of (online, ``{software: version}``) pairs.

    ``fleet nodes --summary`` counts rows with it when the hub does not count.
    """
    total = 0
    by_state = dict.fromkeys(_STATES, 0)
    by_version: dict[str, dict[str, int]] = {}
    for online, versions in nodes:
        total += 1
        by_state["online" if online else "offline"] += 1
        for software, version in versions.items():
            seen = by_version.setdefault(software, {})
            seen[version] = seen.get(version, 0) + 1
    ordered = {
        software: dict(sorted(versions.items(), key=lambda item: (-item[1], item[0])))
        for software, versions in sorted(by_version.items())
    }
    return {"total": total, "by_state": by_state, "by_version": ordered}
