"""edge_agent.preflight on a node of its own: what each step would meet, with nothing changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from bus.messages import Step
from bus.signing import public_key_of
from edge_agent.intake import check_command
from edge_agent.preflight import Check, run_preflight, summarize
from edge_agent.settings import ExecutorSettings, Policy, ProcessService
from edge_agent.steps import HANDLERS, StepHandler
from edge_agent.tools import SystemTools

STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])
SHA = "a" * 64

# dnf's --assumeno: shows the transaction, answers "no": "Operation aborted.", exit 1;
# "Nothing to do." exit 0; an unknown package: "Error: Unable to find a match", exit 1.
FAKE_DNF = """#!/bin/sh
[ "$1" = "--assumeno" ] || { echo "expected --assumeno first, got $1" >&2; exit 2; }
[ "$2" = "install" ] || exit 2
case "$3" in
  app-2.0) echo "Installing: app-2.0-1.x86_64"; echo "Operation aborted."; exit 1 ;;
  app-1.0) echo "Package app-1.0-1.x86_64 is already installed."; echo "Nothing to do."; exit 0 ;;
  *) echo "No match for argument: $3" >&2; echo "Error: Unable to find a match: $3" >&2; exit 1 ;;
esac
"""


def plan(*steps: dict[str, Any]) -> list[Step]:
    return STEPS.validate_python(list(steps))


def settings(tmp_path: Path, **extra: Any) -> ExecutorSettings:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    for name in ("install.sh", "rollback.sh"):
        (scripts / name).write_text("#!/bin/sh\nexit 0\n")
        (scripts / name).chmod(0o755)
    fields: dict[str, Any] = {
        "node": "n1",
        "state_dir": tmp_path / "state",
        "scripts_dir": scripts,
        "services": {"app": ProcessService(command=["sleep", "60"])},
        **extra,
    }
    return ExecutorSettings(**fields)


def by_step(checks: list[Check]) -> dict[int | str, Check]:
    return {c.index if c.index >= 0 else c.type: c for c in checks}


async def test_a_sound_plan_passes_every_check_and_changes_nothing(tmp_path: Path) -> None:
    node = settings(tmp_path)
    steps = plan(
        {"type": "service", "action": "stop", "name": "app"},
        {"type": "script", "name": "install.sh", "rollback": "rollback.sh"},
        {"type": "health", "check": "command", "target": "install.sh"},
    )
    checks = await run_preflight(steps, node)
    assert [(c.index, c.type, c.state) for c in checks] == [
        (0, "service", "succeeded"),
        (1, "script", "succeeded"),
        (2, "health", "succeeded"),
        (-1, "disk", "succeeded"),
    ]
    assert summarize(checks) == ("succeeded", "4 passed, 0 failed, 0 not checked")
    assert not node.state_dir.exists()  # not even the state dir was made


async def test_each_refusal_is_named_per_step(tmp_path: Path) -> None:
    node = settings(tmp_path, policy=Policy(step_types=["script", "service", "file", "download"]))
    steps = plan(
        {"type": "script", "name": "missing.sh"},
        {"type": "service", "action": "start", "name": "unknown-svc"},
        {"type": "module", "name": "e1000e"},
        {"type": "file", "src": "app.conf", "dest": "/etc/app.conf"},
        {"type": "file", "src": "never-downloaded", "dest": "conf/app.conf"},
        {"type": "script", "name": "install.sh", "rollback": "gone.sh"},
    )
    found = by_step(await run_preflight(steps, node))
    assert found[0].state == "failed"
    assert "missing.sh not found" in found[0].detail
    assert "not defined for the process manager" in found[1].detail
    assert "step type module is not allowed" in found[2].detail
    assert "outside the agent's state dir" in found[3].detail
    assert found[4].detail == "never-downloaded is neither in the cache nor downloaded first"
    assert "gone.sh not found" in found[5].detail
    state, summary = summarize(list(found.values()))
    assert state == "failed"
    assert summary.startswith("1 passed, 6 failed, 0 not checked; first: step 0 (script)")


async def test_a_file_may_come_from_an_earlier_download(tmp_path: Path) -> None:
    node = settings(tmp_path)
    steps = plan(
        {"type": "file", "src": "app.conf", "dest": "conf/app.conf"},
        {"type": "download", "url": "http://127.0.0.1:9/app.conf", "sha256": SHA, "name": "app.conf"},
        {"type": "file", "src": "app.conf", "dest": "conf/app.conf"},
    )
    found = by_step(await run_preflight(steps, node))
    assert found[0].state == "failed"  # used before it is downloaded
    assert found[1].state == "failed"  # nothing listens on port 9
    assert "127.0.0.1:9" in found[1].detail
    assert (found[2].state, found[2].detail) == ("succeeded", "app.conf comes from step 1")


async def test_free_disk_against_declared_download_sizes(tmp_path: Path) -> None:
    node = settings(tmp_path)
    cache = node.cache_dir
    cache.mkdir(parents=True)
    body = b"x" * 10
    digest = hashlib.sha256(body).hexdigest()
    (cache / "small.bin").write_bytes(body)
    steps = plan(
        # Cached with the right sha256: no fetch, no space needed.
        {"type": "download", "url": "http://127.0.0.1:9/small.bin", "sha256": digest, "name": "small.bin"},
    )
    found = by_step(await run_preflight(steps, node))
    assert (found[0].state, found[0].detail) == ("succeeded", "small.bin is already in the cache (sha256 ok)")
    assert found["disk"].state == "succeeded"
    free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
    huge = plan(
        {
            "type": "download",
            "url": "http://127.0.0.1:9/big",
            "sha256": SHA,
            "name": "big",
            "max_bytes": free * 4,
        },
    )
    # The URL does not answer either, but the disk check is decided on its own.
    found = by_step(await run_preflight(huge, node))
    assert found["disk"].state == "failed"
    assert "only" in found["disk"].detail
    assert str(cache.parent) in found["disk"].detail or str(cache) in found["disk"].detail


async def test_dnf_simulation_with_assumeno(tmp_path: Path) -> None:
    dnf = tmp_path / "bin" / "dnf"
    dnf.parent.mkdir()
    dnf.write_text(FAKE_DNF)
    dnf.chmod(0o755)
    rpm = tmp_path / "bin" / "rpm"
    rpm.write_text("#!/bin/sh\nexit 0\n")
    rpm.chmod(0o755)
    node = settings(tmp_path, tools=SystemTools(dnf=str(dnf), rpm=str(rpm)))
    steps = plan(
        {"type": "package", "manager": "dnf", "name": "app", "version": "2.0"},
        {"type": "package", "manager": "dnf", "name": "app", "version": "1.0"},
        {"type": "package", "manager": "dnf", "name": "app", "version": "9.9"},
        {"type": "package", "manager": "dnf", "name": "app", "src": "app-3.0.rpm"},
    )
    found = by_step(await run_preflight(steps, node))
    assert (found[0].state, found[0].detail) == ("succeeded", "dnf --assumeno: the install would proceed")
    assert found[1].state == "succeeded"  # nothing to do is fine
    assert found[2].state == "failed"
    assert "Unable to find a match: app-9.9" in found[2].detail
    assert found[3].detail == "app-3.0.rpm is neither in the cache nor downloaded first"


async def test_missing_package_manager_and_busy_agent(tmp_path: Path) -> None:
    node = settings(tmp_path, tools=SystemTools(dnf=str(tmp_path / "no-dnf"), rpm=str(tmp_path / "no-rpm")))
    steps = plan({"type": "package", "manager": "dnf", "name": "app", "version": "2.0"})
    found = by_step(await run_preflight(steps, node, busy_with="r-7"))
    assert "is not installed on this node" in found[0].detail
    assert found["busy"].state == "failed"
    assert found["busy"].detail == "busy with rollout r-7: an apply now would be refused"


async def test_custom_handlers_are_checked_but_not_probed(tmp_path: Path) -> None:
    async def apply(_step: Any, _ctx: Any) -> dict[str, Any]:
        return {}

    async def undo(_step: Any, _ctx: Any, _record: Any) -> None:
        return None

    handlers = {**HANDLERS, "download": StepHandler(apply=apply, undo=undo)}
    steps = plan({"type": "download", "url": "http://127.0.0.1:9/x", "sha256": SHA, "name": "x"})
    found = by_step(await run_preflight(steps, settings(tmp_path), handlers))
    assert (found[0].state, found[0].detail) == ("succeeded", "allowed (not probed: a custom handler)")
    handlers.pop("download")
    found = by_step(await run_preflight(steps, settings(tmp_path), handlers))
    assert found[0].detail == "step type download is not supported by this agent"


async def test_lock_probe_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    async def held() -> str | None:
        return "lock file /run/app.lock"

    steps = plan({"type": "script", "name": "install.sh"})
    found = by_step(await run_preflight(steps, settings(tmp_path), lock=held))
    assert (found["lock"].state, found["lock"].detail) == (
        "skipped",
        "update lock held (lock file /run/app.lock): an apply would wait",
    )
    assert summarize(list(found.values()))[0] == "succeeded"


@pytest.mark.parametrize("action", ["preflight"])
def test_intake_accepts_a_preflight_older_than_the_last_command(tmp_path: Path, action: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bus.messages import Command, encode
    from bus.signing import sign_command
    from bus.topics import Topics

    key = Ed25519PrivateKey.generate()
    node = settings(tmp_path, trusted_keys=(public_key_of(key),))
    topics = Topics("fleet/v1")
    command = Command(
        id="p1",
        node="n1",
        rollout="plan-1",
        action=action,
        issued_at=100.0,
        expires_at=200.0,
        plan=plan({"type": "script", "name": "missing.sh"}),
    )
    payload = encode(sign_command(command, key))
    verdict = check_command(
        topics.node("n1", "cmd"),
        payload,
        settings=node,
        topics=topics,
        handlers=HANDLERS,
        now=150.0,
        seen=set(),
        last_issued_at=500.0,
    )
    # Not held to the issued_at floor, and its plan is not refused here: the pre-flight reports each step.
    assert type(verdict).__name__ == "Accepted"
    expired = check_command(
        topics.node("n1", "cmd"),
        payload,
        settings=node,
        topics=topics,
        handlers=HANDLERS,
        now=250.0,
        seen=set(),
        last_issued_at=0.0,
    )
    assert type(expired).__name__ == "Rejected"
