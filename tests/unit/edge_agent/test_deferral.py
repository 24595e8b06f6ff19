"""edge_agent.deferral: lock files and the defer-check script, and waiting for them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edge_agent.deferral import busy_reason, wait_until_free
from edge_agent.settings import ExecutorSettings


def node(tmp_path: Path) -> ExecutorSettings:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    return ExecutorSettings(node="n1", state_dir=tmp_path / "state", scripts_dir=scripts)


def check_script(settings: ExecutorSettings, body: str) -> None:
    path = settings.scripts_dir / "defer-check"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


async def test_free_without_locks_or_check(tmp_path: Path) -> None:
    assert await busy_reason(node(tmp_path)) is None


async def test_lock_files_make_the_node_busy(tmp_path: Path) -> None:
    settings = node(tmp_path)
    locks = settings.state_dir / "locks"
    locks.mkdir(parents=True)
    assert await busy_reason(settings) is None  # an empty locks dir is no lock
    for name in ("surgery.lock", "backup.lock", "db.lock", "video.lock"):
        (locks / name).touch()
    assert await busy_reason(settings) == (
        "update lock held: locks/backup.lock, locks/db.lock, locks/surgery.lock (+1 more)"
    )


async def test_the_check_script_decides_with_its_exit_status(tmp_path: Path) -> None:
    settings = node(tmp_path)
    settings.state_dir.mkdir(parents=True)
    check_script(settings, 'echo "checking $FLEET_ROLLOUT"\necho "printing a job"\nexit 1')
    assert await busy_reason(settings, {"FLEET_ROLLOUT": "r1"}) == "defer-check says busy: printing a job"
    check_script(settings, 'test "$FLEET_NODE" = n1 && exit 0\nexit 3')
    assert await busy_reason(settings) is None
    (settings.scripts_dir / "defer-check").chmod(0o644)  # not executable: not a check
    check_script(settings, "exit 1")
    (settings.scripts_dir / "defer-check").chmod(0o644)
    assert await busy_reason(settings) is None


async def test_wait_returns_when_the_lock_goes(tmp_path: Path) -> None:
    settings = node(tmp_path)
    lock = settings.state_dir / "locks" / "app.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    said: list[str] = []

    async def busy(reason: str) -> None:
        said.append(reason)

    async def release() -> None:
        await asyncio.sleep(0.2)
        lock.unlink()

    releaser = asyncio.create_task(release())
    started = time.monotonic()
    result = await wait_until_free(settings, time.time() + 30, poll_s=0.05, on_busy=busy)
    await releaser
    assert result is None
    assert said == ["update lock held: locks/app.lock"]  # reported once, not every poll
    assert time.monotonic() - started < 20


async def test_wait_gives_up_at_its_deadline_with_the_reason(tmp_path: Path) -> None:
    settings = node(tmp_path)
    lock = settings.state_dir / "locks" / "app.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    held = "update lock held: locks/app.lock"
    assert await wait_until_free(settings, time.time() + 0.2, poll_s=0.05) == held
    # A deadline already passed: one look, no waiting.
    assert await wait_until_free(settings, 0.0) == "update lock held: locks/app.lock"
