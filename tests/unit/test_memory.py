"""Heap trimming and the collector settings of long-running processes (bus.memory)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from bus import memory


def test_this_machine_can_trim_the_heap() -> None:
    assert memory.release_now()  # glibc (Debian): malloc_trim is there


async def test_trims_asked_for_meanwhile_are_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    monkeypatch.setattr(memory, "_TRIM", trim)
    monkeypatch.setattr(memory, "_pending_on", None)
    for _ in range(1000):  # a thousand simulated agents finishing their jobs at once
        memory.release_soon(0.05)
    await asyncio.sleep(0.15)
    assert calls == [0]
    memory.release_soon(0.05)  # a later burst gets its own trim
    await asyncio.sleep(0.15)
    assert calls == [0, 0]


def test_settle_after_start_freezes_and_raises_the_young_threshold() -> None:
    code = (
        "import gc\n"
        "from bus import memory\n"
        "before = gc.get_threshold()\n"
        "memory.settle_after_start()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (memory.YOUNG_THRESHOLD, before[1], before[2]), gc.get_threshold()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
