"""Deferral: an agent holds back an apply while its node says it is busy (like balena's update locks).

The node is busy while

- any file exists in ``STATE_DIR/locks/`` (an application creates
  ``locks/<app>.lock`` while it must not be disturbed, and removes it after;
  its existence is the lock, as with balena's ``updates.lock``), or
- the executable ``SCRIPTS_DIR/defer-check`` exists and exits non-zero (its
  last line of output is the reason; it runs with the FLEET_* environment,
  cwd the state dir, at most ``CHECK_TIMEOUT_S``).

The rollout says how long a node may defer (``max_defer_s``): the command
carries ``defer_until`` (signed). Busy at the start of an apply, the agent
reports ``deferred`` (a status and its retained job snapshot) and checks
again every ``poll_s``; when the node is free it applies as usual; when
``defer_until`` passes first (or the rollout allows no deferral) it gives
up: the job ends ``not_started`` and the hub counts the node as not
started, not failed. An abort of the rollout ends the wait at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bus.errors import StepError
from edge_agent import blocking, system
from edge_agent.settings import ExecutorSettings

__all__ = ["CHECK_SCRIPT", "LOCKS_DIR", "busy_reason", "wait_until_free"]

LOCKS_DIR = "locks"
CHECK_SCRIPT = "defer-check"
CHECK_TIMEOUT_S = 30.0
_LOCKS_LISTED = 3


def _locks(directory: Path) -> list[str]:
    """Names of the lock files in ``directory``. Call through asyncio.to_thread."""
    try:
        return sorted(entry.name for entry in os.scandir(directory) if not entry.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _probe(settings: ExecutorSettings) -> tuple[list[str], Path | None]:
    """The lock files, and the ``defer-check`` script if there is one. Blocking."""
    path = settings.scripts_dir / CHECK_SCRIPT
    script = path if path.is_file() and os.access(path, os.X_OK) else None
    return _locks(settings.state_dir / LOCKS_DIR), script


async def busy_reason(settings: ExecutorSettings, env: dict[str, str] | None = None) -> str | None:
    """Why the node is busy now (lock files, ``defer-check``), or None when an update may start.

    ``env`` is the environment of ``defer-check`` (the runner passes the FLEET_* variables).
    """
    locks, script = await blocking.run(_probe, settings)
    if locks:
        more = f" (+{len(locks) - _LOCKS_LISTED} more)" if len(locks) > _LOCKS_LISTED else ""
        shown = ", ".join(f"{LOCKS_DIR}/{name}" for name in locks[:_LOCKS_LISTED])
        return f"update lock held: {shown}{more}"
    if script is None:
        return None
    environ = {"PATH": os.environ.get("PATH", os.defpath), "FLEET_NODE": settings.node, **(env or {})}
    try:
        result = await system.run([str(script)], timeout=CHECK_TIMEOUT_S, cwd=settings.state_dir, env=environ)
    except StepError as exc:
        return f"{CHECK_SCRIPT} failed: {exc.reason}"
    if result.ok:
        return None
    said = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return f"{CHECK_SCRIPT} says busy: {said[-1][:200] if said else f'exit {result.returncode}'}"


async def wait_until_free(
    settings: ExecutorSettings,
    until: float,
    *,
    clock: Callable[[], float] = time.time,
    poll_s: float = 1.0,
    on_busy: Callable[[str], Awaitable[None]] | None = None,
    env: dict[str, str] | None = None,
) -> str | None:
    """Check until the node is free or ``until`` (wall clock) passes.

    ``on_busy(reason)`` is awaited with the first reason and whenever it changes.

    Returns:
        None when the node is free, else the reason it was still busy at ``until``.
    """
    said: str | None = None
    while True:
        reason = await busy_reason(settings, env)
        if reason is None:
            return None
        if reason != said and on_busy is not None:
            await on_busy(reason)
        said = reason
        left = until - clock()
        if left <= 0:
            return reason
        await asyncio.sleep(min(poll_s, left))
