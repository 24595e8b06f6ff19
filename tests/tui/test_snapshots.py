"""SVG snapshots of the fleet and rollout screens at 80x24 and 120x40 (fixed clock, demo data).

Update with ``pytest tests/tui/test_snapshots.py --snapshot-update`` after reading the
report of what changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.tui.helpers import demo_app, until
from tui.app import FleetApp
from tui.screens.rollout import RolloutScreen
from tui.widgets.audit_table import AuditTable

pytest.importorskip("pytest_textual_snapshot", reason="needs the pytest-textual-snapshot plugin (test extra)")

SIZES = [(80, 24), (120, 40)]
SnapCompare = Callable[..., bool]


async def _loaded(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, FleetApp)
    await until(pilot, lambda: len(app.model.nodes) == 12 and len(app.model.rollouts) == 2, "demo data")
    await pilot.pause()


def _then(*keys: str) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _loaded(pilot)
        await pilot.press(*keys)
        screen = pilot.app.screen
        if isinstance(screen, RolloutScreen):
            audit = screen.query_one(AuditTable)
            await until(pilot, lambda: audit.entries is not None, "the audit trail")
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fleet_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    app, _feed = demo_app()
    assert snap_compare(app, terminal_size=size, run_before=_loaded)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rollouts_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    app, _feed = demo_app()
    assert snap_compare(app, terminal_size=size, run_before=_then("o"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rollout_detail_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    app, _feed = demo_app()
    assert snap_compare(app, terminal_size=size, run_before=_then("o", "enter", "down", "down", "down"))


def test_rollout_detail_audit_tab(snap_compare: SnapCompare) -> None:
    app, _feed = demo_app()
    assert snap_compare(app, terminal_size=(120, 40), run_before=_then("o", "enter", "t"))
