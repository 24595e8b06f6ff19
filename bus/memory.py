"""Memory and garbage collection of long-running fleetbus processes.

Heap: glibc keeps memory that Python and pydantic-core freed (start-up, a job, an
inventory scan) in its arenas, where it still counts as the process's RSS.
``malloc_trim(0)`` returns the free pages. It costs about a millisecond, so
:func:`release_soon` coalesces requests: one trim per process at most once
per ``delay_s``, however many agents (the simulator holds a thousand) ask.
On a C library without ``malloc_trim`` (musl) it does nothing.

Garbage collection: the hub and ``fleet simulate`` hold many long-lived
objects (modules, validators, a thousand clients) and allocate fast while a
rollout runs. With the default thresholds, CPython's collector walked all of
them again and again: about 0.17 s of the simulator's CPU per 1000-node
rollout. :func:`settle_after_start` moves what start-up built out of the
collector's way (``gc.freeze``) and collects young objects less often.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Callable

__all__ = ["release_now", "release_soon", "settle_after_start"]

#: Net new container objects between two young-generation collections (CPython: 700).
YOUNG_THRESHOLD = 20_000

_LOGGER = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()
#: The loop with a trim pending on it; a loop closed before its trim ran does not count.
_pending_on: asyncio.AbstractEventLoop | None = None


def release_now() -> bool:
    """Trim the heap now; True when the C library has ``malloc_trim``."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def release_soon(delay_s: float = 1.0) -> None:
    """Trim once, ``delay_s`` from now, on the running loop (requests meanwhile are merged)."""
    global _pending_on
    loop = asyncio.get_running_loop()
    if _TRIM is None or _pending_on is loop:
        return

    def run() -> None:
        global _pending_on
        _pending_on = None
        release_now()

    _pending_on = loop
    loop.call_later(delay_s, run)


def settle_after_start(young: int = YOUNG_THRESHOLD) -> None:
    """Start-up is over: exempt every object alive now from collection, collect young ones less often.

    Objects frozen here are never freed by the cyclic collector (reference
    counting still frees them), so call it once, when the process is ready.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
