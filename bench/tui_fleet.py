"""The TUI's fleet screen with N nodes, driven by Textual's Pilot: render, heartbeats, filter, sort, scroll.

    python bench/tui_fleet.py --nodes 10000

The app runs headless (``run_test``) on a list-backed feed (``tui.feed.ListFeed``)
with N births, then rounds of N heartbeats. Measured (wall seconds):
first render (births pushed -> every row in the table), a round of N heartbeats
applied (and the longest batch), one key press while a round is applied, a
filter typed (``/`` then ``site=site-3``, a tenth of the nodes), clearing it, a
sort by load, and scrolling (page down x20, end, home). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import emit, rounded
from textual.pilot import Pilot

from bus.messages import Heartbeat, Inventory, NodeState
from tui.app import make_app
from tui.config import TuiConfig
from tui.demo import DEMO_NOW, demo_responder
from tui.feed import ListFeed
from tui.widgets.node_table import NodeTable


def _births(nodes: int) -> list[NodeState]:
    return [
        NodeState(
            node=f"node-{i:05d}",
            state="online",
            session=f"s{i}",
            reason="birth",
            heartbeat_s=5.0,
            labels={"site": f"site-{i % 10}", "role": "gw" if i % 5 == 0 else "sensor"},
            inventory=Inventory(
                services={"collector": "1.4.2" if i % 7 else "1.5.0"}, packages={"nginx": "1.22.1"}
            ),
        )
        for i in range(nodes)
    ]


def _round(nodes: int, seq: int) -> list[Heartbeat]:
    return [
        Heartbeat(
            node=f"node-{i:05d}",
            session=f"s{i}",
            seq=seq,
            ts=DEMO_NOW + seq,
            load1=((i * 7 + seq * 13) % 400) / 100,
            mem_used_pct=float((i + seq) % 100),
            disk_free_pct=50.0,
        )
        for i in range(nodes)
    ]


async def _until(
    pilot: Pilot[None], predicate: Callable[[], object], what: str, timeout: float = 300
) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await pilot.pause(0.01)
    return time.perf_counter() - started


async def measure(nodes: int, rounds: int) -> dict[str, Any]:
    feed = ListFeed([], responder=demo_responder)
    config = TuiConfig(
        broker="mqtt://127.0.0.1:1", utc=True, examples_dir=Path("no-examples-here"), batch_s=0.05
    )
    app = make_app(config, feed, clock=lambda: DEMO_NOW)
    figures: dict[str, Any] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one(NodeTable)
        started = time.perf_counter()
        feed.push(*_births(nodes))
        await _until(pilot, lambda: table.row_count == nodes, f"{nodes} rows")
        figures["first_render_s"] = time.perf_counter() - started
        app.batch_seconds.clear()
        key_s: list[float] = []
        round_s: list[float] = []
        for seq in range(1, rounds + 1):
            beats = _round(nodes, seq)
            last = beats[-1].load1
            started = time.perf_counter()
            feed.push(*beats)
            pressed = time.perf_counter()
            await pilot.press("down")
            key_s.append(time.perf_counter() - pressed)
            await _until(pilot, lambda: app.model.nodes[f"node-{nodes - 1:05d}"].loads[-1] == last, "a round")  # noqa: B023
            round_s.append(time.perf_counter() - started)
        figures["heartbeat_round_s_median"] = statistics.median(round_s)
        figures["batch_ms_max"] = max(app.batch_seconds) * 1000 if app.batch_seconds else None
        figures["key_during_round_s_max"] = max(key_s)
        started = time.perf_counter()
        await pilot.press("s", "s", "s")  # node -> state -> seen -> load
        await pilot.pause()
        figures["sort_3_columns_s"] = time.perf_counter() - started
        started = time.perf_counter()
        await pilot.press("slash", *"site=site-3", "enter")
        await _until(pilot, lambda: table.row_count == nodes // 10, "the filter")
        figures["filter_s"] = time.perf_counter() - started
        started = time.perf_counter()
        await pilot.press("escape")
        app.screen.action_clear_filter()  # type: ignore[attr-defined]
        await _until(pilot, lambda: table.row_count == nodes, "every row back")
        figures["clear_filter_s"] = time.perf_counter() - started
        table.focus()
        started = time.perf_counter()
        for _ in range(20):
            await pilot.press("pagedown")
        await pilot.pause()
        figures["page_down_x20_s"] = time.perf_counter() - started
        started = time.perf_counter()
        await pilot.press("end")
        await pilot.pause()
        await pilot.press("home")
        await pilot.pause()
        figures["end_home_s"] = time.perf_counter() - started
        figures["rows"] = table.row_count
    return {k: rounded(v) if isinstance(v, float) else v for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.nodes, args.rounds))
    emit({"bench": "tui_fleet", "nodes": args.nodes, "rounds": args.rounds, **figures}, args.out)


if __name__ == "__main__":
    main()
