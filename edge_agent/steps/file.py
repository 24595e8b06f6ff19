"""``file`` step: atomically replace a file with a downloaded one, keeping the old one.

A relative ``dest`` is relative to the state dir (DESIGN section 2).

The file it replaces is kept as ``state_dir/backup/<command>/<index>`` (or the
marker ``<index>.absent`` when there was none) *before* ``dest`` is touched,
each written atomically, so undo finds what to put back from the step's
identity alone, even after a crash in the middle of the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import stat
from pathlib import Path
from typing import Any

from bus.errors import StepError
from bus.files import copy_atomic, fsync_dir, write_atomic
from bus.messages import FileStep
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepContext, StepHandler

__all__ = ["HANDLER", "RESERVED", "apply", "check", "destination", "is_in_scripts_dir", "undo"]

#: Names in the state dir a file step must never overwrite: the agent's own state.
RESERVED = ("journal.json", "replay-floor", "term-floor", "cache", "backup", "services")
#: In the name of a copy's temp file (``.NAME.fleet-<random>.tmp``).
_TEMP_TAG = "fleet-"


def destination(step: FileStep, settings: ExecutorSettings) -> Path:
    """The path ``dest`` names: absolute, or relative to the state dir."""
    dest = Path(step.dest)
    return dest if dest.is_absolute() else settings.state_dir / dest


def check(step: FileStep, settings: ExecutorSettings) -> str | None:
    """``dest`` must be allowed: under the state dir by default, else matching the policy's paths.

    The path is checked as written and with symlinks resolved, so a link cannot
    lead a write elsewhere; the agent's own state files and the scripts directory
    are never a destination, whatever the policy says.
    """
    dest = str(destination(step, settings))
    real = os.path.realpath(dest)
    state = os.path.realpath(settings.state_dir)
    if is_in_scripts_dir(dest, settings):
        # Whatever the policy says: a step that may replace a script may run anything (issue 16).
        return f"file destination {step.dest} is in the scripts directory, which steps never write"
    for name in RESERVED:
        own = os.path.join(state, name)
        if real == own or real.startswith(own + os.sep):
            return f"file destination {step.dest} is part of the agent's state"
    if settings.policy.paths is None:
        if not real.startswith(state + os.sep):
            return f"file destination {step.dest} is outside the agent's state dir"
        return None
    if not (Policy.matches(settings.policy.paths, dest) and Policy.matches(settings.policy.paths, real)):
        return f"file destination {step.dest} is not allowed by this node's policy"
    return None


def is_in_scripts_dir(path: str | Path, settings: ExecutorSettings) -> bool:
    """True when ``path`` (as written or with links resolved) is the scripts dir or inside it."""
    scripts = [os.path.abspath(settings.scripts_dir), os.path.realpath(settings.scripts_dir)]
    given = [os.path.abspath(path), os.path.realpath(path)]
    return any(p == s or p.startswith(s + os.sep) for p in given for s in scripts)


def _backup_paths(ctx: StepContext) -> tuple[Path, Path]:
    directory = ctx.settings.backup_dir / ctx.command
    return directory / str(ctx.index), directory / f"{ctx.index}.absent"


def _copy_into_place(src: Path, dest: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Copy ``src`` over ``dest`` atomically (``bus.files.copy_atomic``: temp in dest's dir, fsync, replace).

    The temp file is ``.NAME.fleet-<random>.tmp``, which ``_remove_temp_copies``
    finds after a crash. Call through asyncio.to_thread.
    """
    copy_atomic(src, dest, mode, owner=owner, tag=_TEMP_TAG)


def _keep_old(dest: Path, backup: Path, absent: Path) -> bool:
    """Keep the current ``dest`` as ``backup`` (or mark it absent); True if it existed.

    Call through asyncio.to_thread.
    """
    if backup.exists() or absent.exists():  # a re-run after a crash: the first copy is the old one
        return backup.exists()
    backup.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = dest.lstat()
    except FileNotFoundError:
        write_atomic(absent, b"")
        return False
    if not stat.S_ISREG(info.st_mode):
        raise StepError(f"{dest} exists and is not a regular file")
    _copy_into_place(dest, backup, stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid))
    return True


def _install(step: FileStep, ctx: StepContext) -> dict[str, Any]:
    src = ctx.cache_dir / step.src
    if not src.is_file():
        raise StepError(f"{step.src} is not in the cache (download it first)")
    dest = destination(step, ctx.settings)
    if not dest.parent.is_dir():
        raise StepError(f"directory {dest.parent} does not exist")
    backup, absent = _backup_paths(ctx)
    existed = _keep_old(dest, backup, absent)
    owner = None
    if existed:
        info = backup.stat()
        owner = (info.st_uid, info.st_gid)
    _copy_into_place(src, dest, int(step.mode, 8), owner)
    return {"existed": existed, "backup": str(backup)}


async def apply(step: FileStep, ctx: StepContext) -> dict[str, Any]:
    """Keep the old ``dest``, then put the cached ``src`` in its place atomically with ``mode``."""
    backup, _absent = _backup_paths(ctx)
    await ctx.checkpoint({"backup": str(backup)})
    record = await asyncio.to_thread(_install, step, ctx)
    await ctx.log(f"installed {step.src} as {destination(step, ctx.settings)} (mode {step.mode})")
    return record


def _remove_temp_copies(path: Path) -> None:
    """Remove what a ``_copy_into_place`` to ``path`` cut short by a crash left behind."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_TEMP_TAG}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _restore(step: FileStep, ctx: StepContext) -> str:
    dest = destination(step, ctx.settings)
    backup, absent = _backup_paths(ctx)
    # An agent killed mid-copy skipped the copy's own cleanup (DESIGN 3.6: nothing half-written).
    _remove_temp_copies(dest)
    _remove_temp_copies(backup)
    if backup.exists():
        info = backup.stat()
        _copy_into_place(backup, dest, stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid))
        return f"restored the previous {dest}"
    if absent.exists():
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        fsync_dir(dest.parent)
        return f"removed {dest} (it did not exist before)"
    return f"{dest} was not touched: nothing to restore"


async def undo(step: FileStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Put the kept file back atomically (or remove ``dest`` if there was none)."""
    await ctx.log(await asyncio.to_thread(_restore, step, ctx))


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
