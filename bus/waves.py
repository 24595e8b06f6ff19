"""Pure wave planning of a rollout (DESIGN section 3, ``strategy``).

``waves`` lists node counts (``3``) or percents of the targets (``"25%"``);
a percent is rounded up and every wave holds at least one node; the last
entry repeats until every target is covered. ``max_parallel`` is not a wave
boundary: the engine dispatches a wave in chunks so that at most that many
nodes are busy at once (``dispatchable``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bus.errors import InvalidInput

__all__ = ["dispatchable", "plan_waves", "wave_sizes"]

#: More waves than this is a spec mistake, not a rollout (a "1" wave over 10k nodes is fine).
MAX_WAVES = 10_000


def _size(entry: int | str, total: int) -> int:
    if isinstance(entry, str):
        text = entry.strip()
        if not text.endswith("%"):
            raise InvalidInput(f"strategy.waves: {entry!r} is neither a count nor a percent")
        try:
            percent = float(text[:-1])
        except ValueError as exc:
            raise InvalidInput(f"strategy.waves: {entry!r} is not a percent") from exc
        if not 0 < percent <= 100:
            raise InvalidInput(f"strategy.waves: {entry!r} must be above 0% and at most 100%")
        # Round the product first: 10% of 30 is 3, not 4 because of 3.0000000000000004.
        return max(1, math.ceil(round(total * percent / 100, 9)))
    if isinstance(entry, bool) or entry < 1:
        raise InvalidInput(f"strategy.waves: {entry!r} must be a count of at least 1")
    return entry


def wave_sizes(waves: Sequence[int | str], total: int) -> list[int]:
    """Sizes of the successive waves over ``total`` targets.

    Args:
        waves: counts or percents (``"25%"``) of ``total``; the last one repeats.
        total: how many targets the rollout has.

    Returns:
        Positive sizes that add up to ``total`` (the last one cut to what is left).

    Raises:
        InvalidInput: an entry that is neither a positive count nor a percent.
    """
    if total <= 0:
        return []
    if not waves:
        waves = ["100%"]
    sizes: list[int] = []
    left = total
    index = 0
    while left > 0:
        size = min(_size(waves[min(index, len(waves) - 1)], total), left)
        sizes.append(size)
        left -= size
        index += 1
        if len(sizes) > MAX_WAVES:
            raise InvalidInput(f"strategy.waves: more than {MAX_WAVES} waves")
    return sizes


def plan_waves(targets: Sequence[str], waves: Sequence[int | str]) -> list[list[str]]:
    """Split ``targets`` (in order) into waves of ``wave_sizes``."""
    plan: list[list[str]] = []
    start = 0
    for size in wave_sizes(waves, len(targets)):
        plan.append(list(targets[start : start + size]))
        start += size
    return plan


def dispatchable(waiting: Sequence[str], busy: int, max_parallel: int | None) -> list[str]:
    """The nodes of ``waiting`` (in order) that may start now without exceeding ``max_parallel``."""
    if max_parallel is None:
        return list(waiting)
    room = max(0, max_parallel - busy)
    return list(waiting[:room])
