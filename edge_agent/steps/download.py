"""``download`` step: fetch a file into ``state_dir/cache`` and verify its sha256.

The cache is private (mode 700): it keeps copies of files that may be installed
with mode 600. A cache inside the scripts directory is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bus.files import fsync_dir
from bus.messages import DownloadStep
from edge_agent import system
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepContext, StepHandler
from edge_agent.steps.file import is_in_scripts_dir

__all__ = ["HANDLER", "apply", "check", "make_private_dir", "undo"]


def check(step: DownloadStep, settings: ExecutorSettings) -> str | None:
    """The URL must parse and its host be one the policy allows."""
    try:
        host = urlsplit(step.url).hostname or ""
    except ValueError as exc:  # e.g. "http://[::1": the refusal names it, not a traceback
        return f"invalid download URL {step.url[:200]!r}: {exc}"
    if not Policy.matches(settings.policy.download_hosts, host):
        return f"download host {host} is not allowed by this node's policy"
    if is_in_scripts_dir(settings.cache_dir / step.name, settings):
        return f"download {step.name} would land in the scripts directory, which steps never write"
    return None


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 700, or make an existing one private. Blocking.

    The cache holds copies of files that may be installed with mode 600 (issue 16).
    Call through asyncio.to_thread.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _has_sha256(path: Path, sha256: str) -> bool:
    """Tell whether ``path`` is a file with this sha256. Call through asyncio.to_thread."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256.lower()


async def apply(step: DownloadStep, ctx: StepContext) -> dict[str, Any]:
    """Download into the cache (streamed, hashed, size-bounded); a verified copy already there is kept."""
    await asyncio.to_thread(make_private_dir, ctx.cache_dir)
    dest = ctx.cache_dir / step.name
    cached = await asyncio.to_thread(_has_sha256, dest, step.sha256)
    await ctx.checkpoint({"cached_before": cached})
    if cached:
        await ctx.log(f"{step.name} is already in the cache with sha256 {step.sha256.lower()}")
        return {"cached_before": True}
    limit = min(step.max_bytes or ctx.settings.max_download_bytes, ctx.settings.max_download_bytes)
    size = await system.fetch(
        step.url,
        dest,
        sha256=step.sha256,
        max_bytes=limit,
        timeout=ctx.timeout,
        allowed_hosts=ctx.settings.policy.download_hosts,
    )
    await ctx.log(f"downloaded {system.redact_url(step.url)} as {step.name}: {size} bytes, sha256 ok")
    return {"cached_before": False, "size": size}


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # An agent killed mid-download never ran system.fetch's cleanup: its temp
    # file (".NAME.<random>.part" next to NAME) is still there.
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    fsync_dir(path.parent)


async def undo(step: DownloadStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Remove the downloaded file (one that was cached before this step stays)."""
    if record is not None and record.get("cached_before"):
        return
    await asyncio.to_thread(_remove, ctx.cache_dir / step.name)


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
