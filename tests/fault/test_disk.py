"""An agent whose state dir is full or read-only: the step fails with a clear reason, nothing half-written.

The agent runs in a mount namespace of its own (``unshare -rm``, no privilege
needed where user namespaces are allowed) in which its state dir is a 1 MiB
tmpfs (a real ENOSPC) or a read-only bind mount (a real EROFS); the test looks
into that namespace through ``/proc/<pid>/root``. Where user namespaces are not
allowed, the file-size limit (``prlimit --fsize``, EFBIG) stands in for a full
disk and the namespace cases are skipped.

- A download larger than the free space: the step fails naming the cause, the
  node restores itself (part ``a`` goes back), no partial file is left.
- A disk already full when the command arrives: the command is refused with
  the cause (the agent cannot journal, so it must not start), nothing changes;
  once space is freed the same node updates fine.
- A read-only state dir: refused with the cause, nothing changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.fault.conftest import Fleet, Observer, Proc, SlowWeb, observing

NODE = "d1"
LIMIT = 1024 * 1024


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || exit 1"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="unprivileged mount namespaces are not allowed here"
)

# Mount over the state dir, keeping what it held (sh -c SCRIPT STATE_DIR ARGV...).
_TMPFS = (
    'keep=$(mktemp -d) && cp -a "$0"/. "$keep"/ && mount -t tmpfs -o size={size} tmpfs "$0" '
    '&& cp -a "$keep"/. "$0"/ && rm -rf "$keep" && exec "$@"'
)
_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def inside(proc: Proc, path: Path) -> Path:
    """``path`` as the process (in its own mount namespace) sees it."""
    return Path(f"/proc/{proc.pid}/root") / path.relative_to("/")


def parts(proc: Proc, state: Path) -> dict[str, str]:
    directory = inside(proc, state / "parts")
    return {p.name: p.read_text().strip() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            for _ in range(4 * LIMIT // 4096):
                os.write(fd, b"\0" * 4096)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def leftovers(directory: Path) -> list[str]:
    """Temp and partial files (a half-written anything)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith((".tmp", ".part")))


def start_agent(fleet: Fleet, how: str) -> Proc:
    state = fleet.prepare_node(NODE)
    if how == "tmpfs":
        wrapper = ["unshare", "-rm", "sh", "-c", _TMPFS.replace("{size}", str(LIMIT)), str(state)]
    elif how == "read-only":
        wrapper = ["unshare", "-rm", "sh", "-c", _READ_ONLY, str(state)]
    else:
        wrapper = ["prlimit", f"--fsize={LIMIT}"]
    return fleet.start_agent(NODE, wrapper=wrapper)


async def rollout(observer: Observer, plan: list[dict[str, Any]], name: str) -> str:
    body = await observer.ok("create_rollout", {"name": name, "targets": [NODE], "plan": plan})
    rid: str = body["rollout"]
    return rid


PART_A: dict[str, Any] = {"type": "script", "name": "part.sh", "args": ["a", "v1"], "rollback": "part.sh"}
PART_B: dict[str, Any] = {"type": "script", "name": "part.sh", "args": ["b", "v1"], "rollback": "part.sh"}


@pytest.mark.parametrize("how", [pytest.param("tmpfs", marks=needs_namespaces), "fsize-limit"])
async def test_download_larger_than_the_free_space(
    how: str, amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, slow_web: SlowWeb
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    url, sha = slow_web.add("/big.bin", os.urandom(2 * LIMIT))
    state = fleet.state_dir(NODE)
    async with observing(amqtt_broker.url, topics) as observer:
        fleet.start_hub()
        agent = start_agent(fleet, how)
        await observer.hub_ready(0)
        await observer.online([NODE])
        plan = [PART_A, {"type": "download", "url": url, "sha256": sha, "name": "big.bin"}, PART_B]
        rid = await rollout(observer, plan, "too big")
        summary = await observer.final(rid)
        node = summary.nodes[NODE]
        cause = "No space left on device" if how == "tmpfs" else "File too large"
        assert summary.state == "rolled_back", f"{summary}\n{fleet.logs()}"
        assert node.phase == "rolled_back", node
        assert cause in node.detail, node.detail
        assert "step 2 (download)" in node.detail, node.detail  # numbered from 1
        assert parts(agent, state) == {"a": "v0", "b": "v0"}
        assert not inside(agent, state / "cache" / "big.bin").exists()
        assert leftovers(inside(agent, state)) == []
        assert agent.alive()


@needs_namespaces
async def test_disk_already_full_refuses_then_recovers(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    state = fleet.state_dir(NODE)
    async with observing(amqtt_broker.url, topics) as observer:
        fleet.start_hub()
        agent = start_agent(fleet, "tmpfs")
        await observer.hub_ready(0)
        await observer.online([NODE])
        filler = inside(agent, state / "filler")
        fill(filler)
        journal = inside(agent, state / "journal.json")
        journal_before = journal.read_bytes() if journal.exists() else None

        rid = await rollout(observer, [PART_A, PART_B], "on a full disk")
        summary = await observer.final(rid)
        node = summary.nodes[NODE]
        assert summary.state == "rolled_back", f"{summary}\n{fleet.logs()}"
        assert node.phase == "rejected", node
        assert "No space left on device" in node.detail, node.detail
        assert parts(agent, state) == {"a": "v0", "b": "v0"}
        assert fleet.records(NODE) == []
        assert (journal.read_bytes() if journal.exists() else None) == journal_before
        assert leftovers(inside(agent, state)) == []

        filler.unlink()  # space again: the same node updates
        rid = await rollout(observer, [PART_A, PART_B], "after freeing space")
        summary = await observer.final(rid)
        assert summary.state == "succeeded", f"{summary}\n{fleet.logs()}"
        assert parts(agent, state) == {"a": "v1", "b": "v1"}


@needs_namespaces
async def test_step_that_fills_the_disk_is_undone(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    state = fleet.state_dir(NODE)
    async with observing(amqtt_broker.url, topics) as observer:
        fleet.start_hub()
        agent = start_agent(fleet, "tmpfs")
        await observer.hub_ready(0)
        await observer.online([NODE])
        fill_step = {"type": "script", "name": "fill.sh", "rollback": "fill.sh"}
        rid = await rollout(observer, [PART_A, fill_step, PART_B], "an install that fills the disk")
        summary = await observer.final(rid)
        node = summary.nodes[NODE]
        assert summary.state == "rolled_back", f"{summary}\n{fleet.logs()}"
        assert node.phase == "rolled_back", node
        assert "step 2 (script)" in node.detail, node.detail  # numbered from 1
        assert parts(agent, state) == {"a": "v0", "b": "v0"}
        assert not inside(agent, state / "blob").exists()
        assert leftovers(inside(agent, state)) == []
        journal = json.loads(inside(agent, state / "journal.json").read_text())
        assert journal["active"] is None
        (entry,) = journal["applies"].values()
        # The node's own word: its step failed, and it restored itself (DESIGN 3.4).
        assert entry["phase"] == "failed", entry
        assert "node restored" in entry["detail"], entry


@needs_namespaces
async def test_read_only_state_dir_refuses_with_the_cause(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    state = fleet.state_dir(NODE)
    async with observing(amqtt_broker.url, topics) as observer:
        fleet.start_hub()
        agent = start_agent(fleet, "read-only")
        await observer.hub_ready(0)
        await observer.online([NODE])
        rid = await rollout(observer, [PART_A, PART_B], "read-only")
        summary = await observer.final(rid)
        node = summary.nodes[NODE]
        assert summary.state == "rolled_back", f"{summary}\n{fleet.logs()}"
        assert node.phase == "rejected", node
        assert "Read-only file system" in node.detail, node.detail
        assert parts(agent, state) == {"a": "v0", "b": "v0"}
        assert not (state / "journal.json").exists()
        assert leftovers(state) == []
        assert agent.alive()
