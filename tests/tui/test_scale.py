"""1000 nodes, several heartbeats each: the table holds them all and the app stays responsive.

Timing is measured and logged (``-o log_cli=true --log-cli-level=INFO`` shows it), never
asserted tightly: the machine is shared. Only a generous hang guard is asserted.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

from bus.messages import (
    Heartbeat,
    Inventory,
    JobSnapshot,
    NodeState,
    NodeSummary,
    RolloutCounts,
    RolloutSummary,
    StepState,
    StepStatus,
)
from tests.tui.helpers import demo_app, until
from tui.demo import DEMO_NOW
from tui.screens.rollout import RolloutScreen
from tui.widgets.node_table import NodeTable
from tui.widgets.step_grid import StepGrid

_LOGGER = logging.getLogger(__name__)

NODES = 1000
ROUNDS = 5
PLAN = ("download", "service", "package")


def _births() -> list[NodeState]:
    return [
        NodeState(
            node=f"node-{i:04d}",
            state="online",
            session=f"s{i}",
            reason="birth",
            heartbeat_s=5.0,
            labels={"site": f"site-{i % 10}", "role": "gw" if i % 5 == 0 else "sensor"},
            inventory=Inventory(services={"collector": "1.4.2"}, packages={"nginx": "1.22.1"}),
        )
        for i in range(NODES)
    ]


def _round(seq: int) -> list[Heartbeat]:
    return [
        Heartbeat(
            node=f"node-{i:04d}",
            session=f"s{i}",
            seq=seq,
            ts=DEMO_NOW + seq,
            load1=((i * 7 + seq * 13) % 400) / 100,
            mem_used_pct=float((i + seq) % 100),
            disk_free_pct=50.0,
        )
        for i in range(NODES)
    ]


async def test_a_thousand_nodes_update_in_place_and_stay_responsive(
    record_property: Callable[[str, object], None],
) -> None:
    app, feed = demo_app(_births(), batch_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == NODES, "1000 rows", timeout=60)
        first_fill = list(app.batch_seconds)
        await pilot.press("down", "down")
        assert table.selected_node == "node-0002"
        clears = 0
        original_clear = table.clear

        def counting_clear(columns: bool = False) -> NodeTable:
            nonlocal clears
            clears += 1
            return original_clear(columns)

        table.clear = counting_clear  # type: ignore[method-assign]
        app.batch_seconds.clear()
        key_seconds: list[float] = []
        for seq in range(1, ROUNDS + 1):
            feed.push(*_round(seq))
            started = time.perf_counter()
            await pilot.press("down", "up")  # keys are served while a round is applied
            key_seconds.append(time.perf_counter() - started)
            expected = _round(seq)[-1].load1
            await until(
                pilot,
                lambda: app.model.nodes["node-0999"].loads[-1] == expected,  # noqa: B023
                f"round {seq}",
                timeout=60,
            )
        last = f"{_round(ROUNDS)[-1].load1:.2f}"
        await until(pilot, lambda: str(table.get_cell("node-0999", "load")) == last, "last round", timeout=30)
        assert table.row_count == NODES
        assert clears == 0  # cells were updated in place, the table was never rebuilt
        assert table.selected_node == "node-0002"
        assert len(app.model.nodes["node-0500"].loads) == ROUNDS
        # Sorting 1000 rows by load, then filtering, are interactive operations.
        started = time.perf_counter()
        await pilot.press("s", "s", "s")
        sort_s = time.perf_counter() - started
        top = [app.model.nodes[n].load1 or 0.0 for n in table.visible_nodes[:50]]
        assert top == sorted(top, reverse=True)
        started = time.perf_counter()
        app.screen.action_filter()  # type: ignore[attr-defined]
        await pilot.press(*"site=site-3")
        await until(pilot, lambda: table.row_count == NODES // 10, "the filter", timeout=30)
        filter_s = time.perf_counter() - started
    figures = {
        "first_fill_s": round(sum(first_fill), 3),
        "batch_ms_median": round(statistics.median(app.batch_seconds) * 1000, 1),
        "batch_ms_max": round(max(app.batch_seconds) * 1000, 1),
        "batches": len(app.batch_seconds),
        "key_ms_max": round(max(key_seconds) * 1000, 1),
        "sort3_s": round(sort_s, 3),
        "filter_s": round(filter_s, 3),
    }
    for name, value in figures.items():
        record_property(name, value)
    _LOGGER.info("1000-node figures: %s", figures)
    assert max(key_seconds) < 30  # a hang guard, not a performance check


async def test_a_thousand_node_rollout_grid_updates_in_place(
    record_property: Callable[[str, object], None],
) -> None:
    nodes = [f"node-{i:04d}" for i in range(NODES)]
    summary = RolloutSummary(
        id="r-big",
        name="big",
        state="running",
        created_at=DEMO_NOW,
        updated_at=DEMO_NOW,
        counts=RolloutCounts(running=NODES),
        nodes={n: NodeSummary(phase="applying", step=0) for n in nodes},
    )
    snapshots = [
        JobSnapshot(
            node=n,
            id=f"c-{n}",
            rollout="r-big",
            action="apply",
            phase="applying",
            steps=[StepState(index=i, type=t) for i, t in enumerate(PLAN)],
        )
        for n in nodes
    ]
    app, feed = demo_app([*_births(), summary, *snapshots], batch_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(
            pilot, lambda: len(app.model.nodes) == NODES and "r-big" in app.model.rollouts, "data", timeout=60
        )
        await app.push_screen(RolloutScreen(app.ctx, "r-big"))
        grid = app.screen.query_one(StepGrid)
        await until(pilot, lambda: grid.row_count == NODES, "1000 grid rows", timeout=60)
        app.batch_seconds.clear()
        feed.push(
            *(
                StepStatus(
                    node=n,
                    command=f"c-{n}",
                    rollout="r-big",
                    index=1,
                    type="service",
                    state="running",
                    ts=DEMO_NOW,
                )
                for n in nodes
            )
        )
        await until(pilot, lambda: grid.cell_word("node-0999", 1) == "run", "the running steps", timeout=60)
        assert grid.cell_word("node-0000", 1) == "run"
        assert grid.cell_word("node-0000", 2) == "wait"
    grid_ms = round(max(app.batch_seconds) * 1000, 1)
    record_property("grid_batch_ms_max", grid_ms)
    _LOGGER.info("1000-node rollout grid: a batch of 1000 step reports took %s ms at most", grid_ms)
