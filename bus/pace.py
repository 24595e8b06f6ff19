"""Adaptive pace (``strategy.adaptive``): grow the wave after clean waves, shrink or hold it on failures.

Pure functions the engine calls between waves. The first wave has ``start``
nodes (a count or a percent of the targets). When a wave is done:

- no node of it failed: the next wave is ``ceil(size x grow_factor)``, at most
  ``max`` (a count or percent; none means no cap);
- some failed, but no more than ``failure.max_failed`` in all (beyond that the
  rollout rolls back or halts and there is no next wave): ``on_failures:
  "shrink"`` makes the next wave ``floor(size x shrink_factor)`` (at least 1),
  ``"hold"`` keeps the size.

The nodes not yet started are split again into waves of the new size, so the
wave count of a running rollout changes as it goes. Every decision comes back
with its reason, for the audit trail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bus.messages import AdaptivePace, Strategy
from bus.waves import plan_waves, wave_sizes

__all__ = [
    "Pace",
    "cap",
    "first_size",
    "initial_waves",
    "next_pace",
    "planned_waves",
    "projected_waves",
    "resplit",
]


def _resolve(entry: int | str, total: int) -> int:
    return wave_sizes([entry], total)[0] if total > 0 else 0


def first_size(adaptive: AdaptivePace, total: int) -> int:
    """Nodes in the first wave (at least 1, at most ``total``, never above the cap)."""
    return max(1, min(_resolve(adaptive.start, total), cap(adaptive, total)))


def cap(adaptive: AdaptivePace, total: int) -> int:
    """The largest wave ``max`` allows (``total`` when there is no cap)."""
    return total if adaptive.max is None else max(1, _resolve(adaptive.max, total))


@dataclass(frozen=True)
class Pace:
    """The next wave's size and why."""

    size: int
    change: str  # grow, shrink, hold, max
    reason: str


def next_pace(adaptive: AdaptivePace, total: int, size: int, wave: int, done: int, failed: int) -> Pace:
    """The size of the wave after wave ``wave`` (1-based), which had ``size`` nodes, ``failed`` failing.

    Args:
        adaptive: the rollout's ``strategy.adaptive``.
        total: the rollout's number of targets (percents are of this).
        size: how many nodes the finished wave had.
        wave: the finished wave's number, for the reason text.
        done: how many of its nodes succeeded.
        failed: how many of its nodes failed (tolerated: within ``max_failed``).
    """
    limit = cap(adaptive, total)
    if failed == 0:
        grown = min(limit, max(size + 1, math.ceil(size * adaptive.grow_factor)))
        if grown <= size:
            reason = f"wave {wave} clean ({done}/{size} succeeded): staying at the cap of {limit}"
            return Pace(size, "max", reason)
        return Pace(
            grown,
            "grow",
            f"wave {wave} clean ({done}/{size} succeeded): next wave {grown} nodes (x{adaptive.grow_factor:g}"
            + (", capped)" if grown == limit and grown < math.ceil(size * adaptive.grow_factor) else ")"),
        )
    if adaptive.on_failures == "hold":
        return Pace(size, "hold", f"wave {wave}: {failed} of {size} failed: holding the pace at {size} nodes")
    shrunk = max(1, math.floor(size * adaptive.shrink_factor))
    return Pace(
        shrunk,
        "shrink",
        f"wave {wave}: {failed} of {size} failed: next wave {shrunk} nodes (x{adaptive.shrink_factor:g})",
    )


def projected_waves(targets: Sequence[str], adaptive: AdaptivePace) -> list[list[str]]:
    """The waves if every wave is clean (the fastest the rollout can go): for plans and previews."""
    total = len(targets)
    waves: list[list[str]] = []
    start = 0
    size = first_size(adaptive, total) if total else 0
    while start < total:
        waves.append(list(targets[start : start + size]))
        start += size
        size = next_pace(adaptive, total, size, len(waves), size, 0).size
    return waves


def resplit(remaining: Sequence[str], size: int) -> list[list[str]]:
    """The nodes not started yet, in waves of ``size`` (the last one may be smaller)."""
    return plan_waves(list(remaining), [size]) if remaining else []


def initial_waves(targets: Sequence[str], strategy: Strategy) -> list[list[str]]:
    """The waves a new rollout starts with: fixed ``waves``, or adaptive waves of ``start`` nodes."""
    if strategy.adaptive is None:
        return plan_waves(targets, strategy.waves)
    return resplit(targets, first_size(strategy.adaptive, len(targets)))


def planned_waves(targets: Sequence[str], strategy: Strategy) -> list[list[str]]:
    """The waves a plan or a preview shows: fixed ``waves``, or adaptive ones at their fastest."""
    if not targets:
        return []
    if strategy.adaptive is None:
        return plan_waves(targets, strategy.waves)
    return projected_waves(targets, strategy.adaptive)  # the fastest it can go: every wave clean
