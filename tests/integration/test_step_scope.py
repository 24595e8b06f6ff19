"""A step's processes, daemons that left its session included, are killed and gone before its undo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from edge_agent import system

# A start script as init scripts write them: the daemon double-forks, leaves the session
# (setsid) and writes its pidfile only after a delay; the script itself returns at once.
DAEMONIZE = """
(setsid sh -c 'sleep "$1"; echo $$ > "$2"; exec sleep 300' daemon "$1" "$2" </dev/null >/dev/null 2>&1 &) &
sleep "$3"
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _with_marker(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"{system.SCOPE_ENV}={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _sessions(token: str) -> set[int]:
    found = set()
    for pid in _with_marker(token):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            found.add(int(stat[stat.rfind(")") + 2 :].split()[3]))
    return found


async def _poll(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["cgroup", "marker"])
def scope_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "marker":  # a node where the agent may not create cgroups
        monkeypatch.setattr(system._CGROUPS, "checked", True)
        monkeypatch.setattr(system._CGROUPS, "home", None)
    elif system._cgroup2_home() is None:
        pytest.skip("no cgroup v2 hierarchy here")
    return str(request.param)


async def test_the_daemon_of_a_step_is_found_after_it_left_the_session(
    tmp_path: Path, scope_kind: str
) -> None:
    pidfile = tmp_path / "daemon.pid"
    scope = system.open_scope("test-escape")
    leaders: list[int] = []

    async def started(pid: int) -> None:
        leaders.append(pid)

    work = asyncio.ensure_future(
        system.in_scope(
            scope,
            system.run(
                ["sh", "-c", DAEMONIZE, "start", "0.5", str(pidfile), "60"], timeout=60, on_start=started
            ),
        )
    )
    await _poll(lambda: leaders and _sessions(scope.token) - {leaders[0]})  # the daemon left the session
    assert (scope.cgroup is not None) == (scope_kind == "cgroup")  # made with the first process
    os.killpg(leaders[0], signal.SIGKILL)  # what killing the step's process group alone does
    result = await work
    assert result.returncode == -signal.SIGKILL
    assert _with_marker(scope.token), "the daemon left the session and outlived its script"
    killed = await scope.kill()
    assert killed
    assert _with_marker(scope.token) == []
    await asyncio.sleep(0.8)  # past the daemon's delay: it never got to write its pidfile
    assert not pidfile.exists()
    if scope.cgroup is not None:
        assert not scope.cgroup.exists()  # removed once empty


@pytest.mark.parametrize("delay_ms", [0, 10, 40, 150])
async def test_a_cancelled_step_leaves_no_daemon_behind(
    tmp_path: Path, scope_kind: str, delay_ms: int
) -> None:
    pidfile = tmp_path / "daemon.pid"
    scope = system.open_scope("test-cancel")
    work = asyncio.ensure_future(
        system.in_scope(
            scope, system.run(["sh", "-c", DAEMONIZE, "start", "0.5", str(pidfile), "60"], timeout=60)
        )
    )
    await asyncio.sleep(delay_ms / 1000)  # the abort lands while the daemon is on its way
    began = time.monotonic()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    assert time.monotonic() - began < 5.0  # nothing waited for the daemon's pipes or the script
    assert _with_marker(scope.token) == []
    await asyncio.sleep(0.8)
    assert not pidfile.exists()
    await scope.kill()


async def test_what_a_successful_step_started_keeps_running(tmp_path: Path, scope_kind: str) -> None:
    pidfile = tmp_path / "daemon.pid"
    scope = system.open_scope("test-success")
    result = await system.in_scope(
        scope, system.run(["sh", "-c", DAEMONIZE, "start", "0", str(pidfile), "0"], timeout=60)
    )
    assert result.ok
    await _poll(pidfile.exists)
    await _poll(lambda: pidfile.read_text().strip() != "")
    pid = int(pidfile.read_text())
    scope.release()
    try:
        await asyncio.sleep(0.2)
        assert _alive(pid), "a service a successful step started must keep running"
        assert pid in _with_marker(scope.token)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await _poll(lambda: not _alive(pid))
    system.open_scope("next").release()  # the next scope removes the emptied cgroup
    if scope.cgroup is not None:
        assert not scope.cgroup.exists()


async def test_a_step_that_starts_no_process_costs_no_cgroup_and_no_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scope = system.open_scope("no-process")

    def scan() -> set[int]:
        raise AssertionError("a scope without processes must not walk /proc")

    monkeypatch.setattr(scope, "members", scan)
    assert await scope.kill() == []
    scope.release()
    assert scope.cgroup is None
