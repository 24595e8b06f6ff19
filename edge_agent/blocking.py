"""Blocking file work from the agent's event loop: in a worker thread, or inline on RAM.

A real agent runs every file operation of a job (journal writes with fsync,
lock-file checks, pruning old backups) in a worker thread, so a slow disk
never stalls its MQTT traffic. ``fleet simulate`` keeps a thousand agents'
state on a RAM-backed directory, where each such call takes microseconds and
the thread hand-off (a future, a condition variable, a wake-up of the loop)
costs far more than the call: it switches this module to ``inline`` for its
process, and the same calls then run directly on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["inline", "run", "set_inline"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_inline = False


def set_inline(on: bool) -> None:
    """Run blocking calls on the loop itself (``True``: only for RAM-backed state) or in threads."""
    global _inline
    _inline = on


def inline() -> bool:
    """Whether blocking calls run on the loop itself."""
    return _inline


async def run(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)`` in a worker thread, or at once when ``inline``."""
    if _inline:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
