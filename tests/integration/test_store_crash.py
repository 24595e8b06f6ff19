"""A process hammering the store is SIGKILLed at random moments: the file always parses and is consistent."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from pathlib import Path

from hub.store import AtomicJSONStorage, Store

WINDOW = 100  # after step i the table holds exactly items i-99..i

# Each step: put item i, delete item i-WINDOW, record i as the last step. Every
# commit is a snapshot between two steps, so the file must show a whole window.
CHILD = r"""
import asyncio, sys
from pathlib import Path
from hub.store import Store

WINDOW = 100

async def main(path):
    store = Store(Path(path), commit_interval_s=0.002)
    await store.open()
    last = store.get("meta", "last")
    i = last["i"] + 1 if last else 0
    print("started", i, flush=True)
    for _ in range(10_000_000):
        store.put("items", f"k{i:09d}", {"i": i, "pad": "x" * 40})
        store.delete("items", f"k{i - WINDOW:09d}")
        store.put("meta", "last", {"i": i})
        if i % 20 == 0:
            await asyncio.sleep(0)
        if i % 500 == 0:
            await store.flush()
            print("flushed", i, flush=True)
        i += 1

asyncio.run(main(sys.argv[1]))
"""


def check_consistent(path: Path) -> int:
    """The file parses and holds the state after some whole step; return that step."""
    data = AtomicJSONStorage(path).read()
    assert data is not None
    last = data["meta"]["last"]["i"]
    items = data["items"]
    expected = {f"k{j:09d}" for j in range(max(0, last - WINDOW + 1), last + 1)}
    assert set(items) == expected, f"step {last}: {len(items)} items, not a whole window"
    assert all(doc["i"] == int(key[1:]) for key, doc in items.items())
    return int(last)


async def test_sigkill_at_random_moments_never_tears_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    rng = random.Random(20240601)  # noqa: S311 - kill moments, not secrets
    previous = -1
    commits_seen = 0
    for round_ in range(20):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            started = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert started.startswith("started"), started
            await asyncio.sleep(rng.uniform(0.02, 0.3))  # the random moment of the kill
            proc.kill()
            rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        flushed = [int(n) for n in re.findall(rb"flushed (\d+)", rest)]
        if not path.exists():
            assert not flushed  # killed before its first commit
            continue
        last = check_consistent(path)
        commits_seen += 1
        # Never backwards, and everything a returned flush() promised is there.
        assert last >= previous, f"round {round_}: step {last} after {previous}"
        if flushed:
            assert last >= max(flushed)
        previous = last
    assert commits_seen >= 15
    assert previous > 0

    # The killed writer's lock is gone: the hub can open the file.
    store = Store(path)
    await store.open()
    try:
        meta = store.get("meta", "last")
        assert meta is not None
        assert meta["i"] == previous
    finally:
        await store.close()
