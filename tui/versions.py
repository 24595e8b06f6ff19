"""Which versions run where: the fleet-wide version drift view (pure; the TUI and ``fleet nodes``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["VersionGroup", "drifting", "group_versions", "software_versions"]


@dataclass(frozen=True)
class VersionGroup:
    """The nodes that report one version of one piece of software."""

    software: str
    version: str
    nodes: tuple[str, ...]
    offline: tuple[str, ...] = ()


def software_versions(
    services: Mapping[str, str] | None = None,
    packages: Mapping[str, str] | None = None,
    drivers: Mapping[str, str] | None = None,
    agent_version: str = "",
) -> dict[str, str]:
    """One ``{software: version}`` map of a node: the agent, drivers, packages, services (these win)."""
    found: dict[str, str] = {"fleet-agent": agent_version} if agent_version else {}
    for group in (drivers, packages, services):
        for name, version in (group or {}).items():
            if isinstance(name, str) and isinstance(version, str):
                found[name] = version
    return found


def group_versions(nodes: Iterable[tuple[str, bool, Mapping[str, str]]]) -> list[VersionGroup]:
    """Group ``(node, online, {software: version})`` by software and version.

    Sorted by software; within one, the most common version first. Offline nodes
    count with their last reported versions and are named in ``offline``.
    """
    where: dict[tuple[str, str], list[str]] = {}
    down: set[str] = set()
    for node, online, versions in nodes:
        if not online:
            down.add(node)
        for software, version in versions.items():
            where.setdefault((software, version), []).append(node)
    groups = [
        VersionGroup(software, version, tuple(sorted(names)), tuple(sorted(n for n in names if n in down)))
        for (software, version), names in where.items()
    ]
    return sorted(groups, key=lambda g: (g.software, -len(g.nodes), g.version))


def drifting(groups: Iterable[VersionGroup]) -> list[str]:
    """Software that runs in more than one version across the fleet, sorted."""
    seen: dict[str, int] = {}
    for group in groups:
        seen[group.software] = seen.get(group.software, 0) + 1
    return sorted(name for name, count in seen.items() if count > 1)
