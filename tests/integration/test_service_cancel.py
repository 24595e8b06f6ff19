"""An abort that lands while a process service is being launched leaves nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from edge_agent import system


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("launcher", ["sh", "python"])
@pytest.mark.parametrize("delay_ms", [0, 5, 15, 30, 60, 120, 250, 450])
async def test_cancel_during_start_then_stop_leaves_no_process(
    tmp_path: Path, delay_ms: int, launcher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow machine: the launch takes 0.2 s between spawning the service and
    # writing its pidfile, so the cancel lands in that window for some delays.
    if launcher == "python":  # the fallback where setsid is missing
        monkeypatch.setattr(system, "_launch_tools", lambda: None)
        pause = 'import time; time.sleep(0.2)\ntmp = spec["pidfile"]'
        slow = system._LAUNCHER.replace('tmp = spec["pidfile"]', pause)
        assert slow != system._LAUNCHER
        monkeypatch.setattr(system, "_LAUNCHER", slow)
    else:
        assert system._launch_tools() is not None, "sh, setsid and env are installed here"
        record = system._record_service

        def slow_record(pidfile: Path, pid: int) -> None:
            time.sleep(0.2)
            record(pidfile, pid)

        monkeypatch.setattr(system, "_record_service", slow_record)
    marker = f"fleet-cancel-marker-{os.getpid()}-{delay_ms}"
    argv = [sys.executable, "-c", "import time, sys; time.sleep(60)", marker]
    start = asyncio.ensure_future(
        system.start_service("app", argv=argv, cwd=tmp_path, env={}, state_dir=tmp_path, settle_s=0.3)
    )
    await asyncio.sleep(delay_ms / 1000)
    start.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await start
    # The step's undo: stop whatever the cancelled start left.
    await system.stop_service("app", state_dir=tmp_path, grace_s=5)
    for _ in range(100):  # poll against a 5 s deadline: a SIGTERMed process takes a moment
        if not _processes_with(marker):
            break
        await asyncio.sleep(0.05)
    left = _processes_with(marker)
    for pid in left:  # never leave one behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert left == []
