"""A rollout's targets resolved against the nodes one knows (DESIGN section 3.1).

The hub (``hub.core.registry.Registry.resolve``) and the TUI's preview both
resolve here, so a preview names the same nodes, in the same order, as the hub
will: a list keeps its order with duplicates dropped; labels and ``"all"`` give
the known nodes sorted by name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Literal

from bus.messages import TargetLabels

__all__ = ["Targets", "resolve_targets"]

Targets = list[str] | TargetLabels | Literal["all"]


def resolve_targets(
    targets: Targets, known: Collection[str], labels: Callable[[str], Mapping[str, str]]
) -> tuple[list[str], list[str]]:
    """(known nodes, unknown names) of a rollout's ``targets``.

    Args:
        targets: a spec's ``targets``: node names, ``{"labels": {...}}`` or ``"all"``.
        known: every node one knows of (online or not; a set or a mapping: ``in`` is fast).
        labels: a known node's labels.
    """
    if targets == "all":
        return sorted(known), []
    if isinstance(targets, TargetLabels):
        wanted = targets.labels.items()
        return sorted(n for n in known if all(labels(n).get(k) == v for k, v in wanted)), []
    found: list[str] = []
    unknown: list[str] = []
    for name in dict.fromkeys(targets):  # the first of duplicate names, in order
        (found if name in known else unknown).append(name)
    return found, unknown
