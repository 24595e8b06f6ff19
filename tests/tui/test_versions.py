"""The version drift view: grouping, the CLI's table and filters, the TUI's screen."""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from bus.messages import Inventory, NodeState
from cli.nodes import (
    matches,
    parse_version_filter,
    render_table,
    render_versions,
    summarise_rows,
    summary_line,
)
from tests.tui.helpers import demo_app, until
from tui.demo import DEMO_NOW
from tui.model import versions_text
from tui.screens.versions import VersionsScreen
from tui.versions import VersionGroup, drifting, group_versions, software_versions


def _node(name: str, app: str, online: bool = True) -> dict[str, Any]:
    return {
        "node": name,
        "online": online,
        "agent_version": "0.1.0",
        "inventory": {"services": {"demo-app": app}, "packages": {}, "drivers": {}},
    }


def test_versions_group_by_software_most_common_first() -> None:
    groups = group_versions(
        [
            ("n1", True, {"demo-app": "2.0"}),
            ("n2", True, {"demo-app": "1.0"}),
            ("n3", False, {"demo-app": "2.0"}),
        ]
    )
    assert groups == [
        VersionGroup("demo-app", "2.0", ("n1", "n3"), ("n3",)),
        VersionGroup("demo-app", "1.0", ("n2",), ()),
    ]
    assert drifting(groups) == ["demo-app"]
    assert software_versions({"a": "1"}, {"a": "0", "b": "2"}, None, "0.1.0") == {
        "fleet-agent": "0.1.0",
        "a": "1",
        "b": "2",
    }


def test_fleet_nodes_by_version_and_its_summary() -> None:
    nodes = [_node("node-1", "2.0"), _node("node-2", "2.0"), _node("node-3", "1.0", online=False)]
    table = render_versions(nodes).splitlines()
    assert table[0].split() == ["SOFTWARE", "VERSION", "NODES", "DRIFT", "WHERE"]
    assert table[1].split() == ["demo-app", "2.0", "2", "DRIFT", "node-1,", "node-2"]
    assert table[2].split() == ["demo-app", "1.0", "1", "DRIFT", "node-3", "(offline)"]
    assert table[3].split()[:5] == ["fleet-agent", "0.1.0", "3", "-", "node-1,"]
    assert table[-1] == "3 nodes: 2 online, 1 offline | drift: demo-app 2.0 x2, 1.0 x1"
    assert summary_line(nodes[:2]) == "2 nodes: 2 online, 0 offline | no version drift"


def test_a_version_its_health_check_contradicts_is_shown_everywhere_versions_are() -> None:
    nodes = [_node("n1", "2.0"), _node("n2", "1.0")]
    nodes[1]["inventory"]["health_saw"] = {"demo-app": "2.0"}
    table = render_table(nodes, now=0.0)
    assert "demo-app 1.0 (health saw 2.0)" in table
    assert "demo-app 2.0 (health" not in table
    view = render_versions(nodes)
    assert "MISMATCH n2: demo-app reports 1.0, its health check saw 2.0 answering" in view
    assert "1 reporting a version their health check contradicts" in summary_line(nodes)
    assert "contradicts" not in summary_line(nodes[:1])
    inventory = Inventory(services={"demo-app": "1.0"}, health_saw={"demo-app": "2.0"})
    assert versions_text(inventory) == "demo-app=1.0(health-saw:2.0)"


def test_fleet_nodes_filters_by_state_and_version() -> None:
    up, down = _node("a", "2.0"), _node("b", "1.0", online=False)
    assert parse_version_filter("demo-app=2.0") == ("demo-app", "2.0")
    assert parse_version_filter("demo-app") == ("demo-app", None)
    assert [n["node"] for n in (up, down) if matches(n, state="online", versions=[])] == ["a"]
    assert [n["node"] for n in (up, down) if matches(n, state=None, versions=[("demo-app", "1.0")])] == ["b"]
    assert [n["node"] for n in (up, down) if matches(n, state=None, versions=[("demo-app", None)])] == [
        "a",
        "b",
    ]
    assert not matches(up, state=None, versions=[("nginx", None)])


async def test_fleet_screen_names_drift_and_v_shows_which_versions_run_where() -> None:
    app, feed = demo_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        summary = app.screen.query_one("#fleet-summary", Static)
        await until(pilot, lambda: "DRIFT: collector" in str(summary.render()), "the drift note")
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, VersionsScreen), "the versions screen")
        screen = app.screen
        assert isinstance(screen, VersionsScreen)
        rows = screen.rows
        assert rows[0][:4] == ("DRIFT", "collector", "1.4.2", "9")
        assert rows[1][:4] == ("DRIFT", "collector", "1.5.0", "3")
        assert rows[1][4] == "edge-001, edge-002, edge-003"
        assert "edge-007 (offline)" in rows[0][4]
        assert ("-", "nginx", "1.22.1", "12", "all nodes") not in rows  # edge-007 is offline
        # A node's new birth with the new version moves it between rows, live.
        feed.push(
            NodeState(
                node="edge-004",
                state="online",
                session="s-4",
                reason="birth",
                agent_version="0.1.0",
                started_at=DEMO_NOW,
                labels={},
                inventory=Inventory(services={"collector": "1.5.0"}),
            )
        )
        await until(pilot, lambda: screen.rows[1][3] == "4", "edge-004 on 1.5.0")
        await pilot.press("escape")


def test_fleet_nodes_counts_steps_from_one() -> None:
    node = {**_node("node-1", "2.0"), "job": {"rollout": "1a7e70f1-aaaa", "step": 3}}
    assert "1a7e70f1 step 4" in render_table([node], DEMO_NOW)


def test_fleet_nodes_counts_rows_as_the_hub_counts_them() -> None:
    """``fleet nodes --summary`` on a hub that does not count: the same counts, from rows."""
    rows = [
        {"online": True, "agent_version": "0.1.0", "inventory": {"services": {"nginx": "1.24.0"}}},
        {"online": False, "agent_version": "0.1.0", "inventory": {"packages": {"nginx": "1.22.1"}}},
        {"online": True, "agent_version": "0.1.0", "inventory": {"services": {"nginx": "1.24.0"}}},
    ]
    assert summarise_rows(rows) == {
        "total": 3,
        "by_state": {"online": 2, "offline": 1},
        "by_version": {"fleet-agent": {"0.1.0": 3}, "nginx": {"1.24.0": 2, "1.22.1": 1}},
    }
