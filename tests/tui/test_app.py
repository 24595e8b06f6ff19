"""Pilot tests of every screen and action, on a list-backed feed with a fixed clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.command import CommandList
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Input, OptionList, Sparkline, Static, TextArea
from textual.widgets.data_table import ColumnKey

from bus.messages import Heartbeat, Inventory, JobRef, LogLine, NodeState, Reply, Request, StepStatus
from tests.tui.helpers import demo_app, notifications, ops, refuse, until
from tui.app import FleetApp
from tui.demo import DEMO_NOW, FAILED_ID, ROLLOUT_ID, demo_responder, demo_updates, node_id
from tui.messages import FeedBatch, RequestDone
from tui.screens.confirm import ConfirmScreen
from tui.screens.fleet import FleetScreen
from tui.screens.new_rollout import NewRolloutScreen
from tui.screens.node import NodeScreen
from tui.screens.rollout import RolloutScreen
from tui.screens.rollouts import RolloutsScreen
from tui.widgets.audit_table import AuditTable
from tui.widgets.inventory_table import InventoryTable
from tui.widgets.job_table import JobTable
from tui.widgets.log_tail import LogTail
from tui.widgets.node_table import NodeTable
from tui.widgets.rollout_table import RolloutTable
from tui.widgets.step_grid import StepGrid

SIZE = (120, 40)


def screen_of(app: FleetApp) -> Screen[object]:
    """The current screen (a call, so type checkers do not pin it between key presses)."""
    return app.screen


def cell(table: NodeTable | RolloutTable, row: str, column: str) -> str:
    return str(table.get_cell(row, column))


async def test_fleet_screen_lists_every_node_with_state_load_labels_versions_and_job() -> None:
    app, _feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        assert isinstance(screen_of(app), FleetScreen)
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        assert table.visible_nodes == [node_id(i) for i in range(1, 13)]
        assert cell(table, "edge-001", "state") == "online 0s"
        assert cell(table, "edge-007", "state") == "offline -"
        assert cell(table, "edge-004", "job") == "collector-1.5 step 3"
        assert cell(table, "edge-001", "job") == "collector-1.5 succeeded"
        assert cell(table, "edge-008", "job") == "wifi-driver-5.11 failed"
        assert cell(table, "edge-002", "labels") == "role=sensor site=c"
        assert "collector=1.4.2" in cell(table, "edge-005", "versions")
        assert "nginx=1.22.1" in cell(table, "edge-005", "versions")
        assert cell(table, "edge-003", "load") == "1.33"  # the last of three heartbeats
        summary = str(app.screen.query_one("#fleet-summary", Static).render())
        assert "12 nodes: 11 online, 0 stale, 1 offline" in summary
        assert "wave 2 of 3 started" in str(app.screen.query_one("#last-event", Static).render())
        assert any(isinstance(m, FeedBatch) for m in seen)
        assert app.sub_title == "broker connected | hub online"


async def test_live_updates_change_cells_in_place_and_keep_the_cursor() -> None:
    app, feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        await pilot.press("down", "down", "down")
        assert table.selected_node == "edge-004"
        feed.push(
            Heartbeat(
                node="edge-010",
                session="s-10",
                seq=9,
                ts=DEMO_NOW,
                load1=7.5,
                job=JobRef(rollout=ROLLOUT_ID, step=0),
            )
        )
        await until(pilot, lambda: cell(table, "edge-010", "load") == "7.50", "new load")
        assert cell(table, "edge-010", "job") == "collector-1.5 step 1"
        assert table.selected_node == "edge-004"
        assert table.row_count == 12
        # A node that appears later is added; one whose retained state is cleared goes away.
        feed.push(NodeState(node="edge-100", state="online", session="x", reason="birth"))
        await until(pilot, lambda: table.row_count == 13, "a 13th row")
        assert table.visible_nodes[-1] == "edge-100"
        from tui.model import Cleared

        feed.push(Cleared("node", "edge-100"))
        await until(pilot, lambda: table.row_count == 12, "the row removed")
        assert table.selected_node == "edge-004"


async def test_nodes_go_stale_as_the_clock_moves() -> None:
    app, _feed = demo_app()
    now = [DEMO_NOW]
    app.ctx = app.ctx.__class__(app.model, lambda: now[0], utc=True, examples_dir=app.ctx.examples_dir)
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        now[0] += 20  # 4 heartbeat periods of 5 s
        app.tick()
        assert cell(table, "edge-001", "state") == "stale 20s"
        assert "0 online, 11 stale, 1 offline" in str(app.screen.query_one("#fleet-summary", Static).render())


async def test_filter_by_words_and_labels_then_clear() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        box = app.screen.query_one("#filter", Input)
        assert box.has_class("hidden")
        await pilot.press("slash")
        assert box.has_focus
        await pilot.press(*"site=a")
        await until(pilot, lambda: table.row_count == 4, "site=a rows")
        assert table.visible_nodes == ["edge-003", "edge-006", "edge-009", "edge-012"]
        await pilot.press("space", *"gateway")
        await until(pilot, lambda: table.row_count == 1, "site=a gateway")
        assert table.visible_nodes == ["edge-009"]
        assert "filter: 1 shown" in str(app.screen.query_one("#fleet-summary", Static).render())
        await pilot.press("enter")
        assert table.has_focus
        await pilot.press("escape")
        await until(pilot, lambda: table.row_count == 12, "all rows again")
        assert box.has_class("hidden")
        assert box.value == ""


async def test_sort_key_cycles_columns_and_reverses() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        await pilot.press("s")
        assert str(table.sort_column) == "state"
        assert table.visible_nodes[0] == "edge-007"  # offline first
        await pilot.press("s", "s")
        assert str(table.sort_column) == "load"
        loads = [app.model.nodes[n].load1 or 0.0 for n in table.visible_nodes[:11]]
        assert loads == sorted(loads, reverse=True)  # busiest first
        assert table.visible_nodes[-1] == "edge-007"  # no load known: last
        assert "sort: load" in str(app.screen.query_one("#fleet-summary", Static).render())
        await pilot.press("S")
        assert table.visible_nodes[0] == "edge-007"
        assert "load reversed" in str(app.screen.query_one("#fleet-summary", Static).render())


async def test_node_screen_shows_inventory_load_sparkline_jobs_and_live_log() -> None:
    app, feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        await pilot.press("down", "down", "down", "enter")
        await until(pilot, lambda: isinstance(screen_of(app), NodeScreen), "the node screen")
        screen = app.screen
        assert isinstance(screen, NodeScreen)
        assert screen.node == "edge-004"
        inventory = screen.query_one(InventoryTable)
        rows = {tuple(str(c) for c in inventory.get_row_at(i)) for i in range(inventory.row_count)}
        assert ("service", "collector", "1.4.2") in rows
        assert ("driver", "wifi-rt", "5.10") in rows
        assert screen.query_one(Sparkline).data == list(app.model.nodes["edge-004"].loads)
        jobs = screen.query_one(JobTable)
        assert jobs.row_count == 1
        assert str(jobs.get_row_at(0)[3]) == "applying"
        log = screen.query_one(LogTail)
        assert len(log.shown) == 5
        assert log.shown[0].endswith("#1 fetching collector_1.5.0_amd64.deb")
        head = str(screen.query_one("#node-head", Static).render())
        assert "edge-004  online" in head
        assert "labels role=sensor site=b" in head
        feed.push(
            LogLine(node="edge-004", command="c-4", rollout=ROLLOUT_ID, index=3, line="started", ts=DEMO_NOW)
        )
        await until(pilot, lambda: len(log.shown) == 6, "the new log line")
        assert log.shown[-1] == "12:00:00 #4 started"
        await pilot.press("escape")
        assert isinstance(screen_of(app), FleetScreen)


async def test_rollouts_screen_lists_state_progress_and_counts_newest_first() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o")
        assert isinstance(screen_of(app), RolloutsScreen)
        table = app.screen.query_one(RolloutTable)
        assert table.visible_rollouts == [ROLLOUT_ID, FAILED_ID]
        assert table.selected_rollout == ROLLOUT_ID
        assert cell(table, ROLLOUT_ID, "state") == "running"
        assert cell(table, ROLLOUT_ID, "progress") == "#####----- 3/6"
        assert cell(table, ROLLOUT_ID, "wave") == "2/3"
        assert cell(table, ROLLOUT_ID, "counts") == "ok 3 run 2 fail 0 undone 0 wait 1"
        assert cell(table, FAILED_ID, "state") == "rolled_back"
        assert "2 rollouts, 1 active" in str(app.screen.query_one("#rollouts-summary", Static).render())
        await pilot.press("escape")
        assert isinstance(screen_of(app), FleetScreen)


async def test_rollout_detail_grid_log_and_audit_from_show() -> None:
    app, feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o", "enter")
        await until(pilot, lambda: isinstance(screen_of(app), RolloutScreen), "the rollout screen")
        screen = app.screen
        assert isinstance(screen, RolloutScreen)
        assert screen.rollout == ROLLOUT_ID
        grid = screen.query_one(StepGrid)
        assert grid.row_count == 6
        assert [grid.cell_word("edge-001", i) for i in range(5)] == ["ok"] * 5
        assert [grid.cell_word("edge-004", i) for i in range(5)] == ["ok", "ok", "run", "wait", "wait"]
        assert [grid.cell_word("edge-006", i) for i in range(5)] == ["wait"] * 5
        assert str(grid.columns[ColumnKey("step3")].label) == "4.svc"
        # The audit trail comes from the hub's `show` reply.
        await until(pilot, lambda: screen.query_one(AuditTable).entries is not None, "the audit trail")
        assert ops(feed)[0] == ("show", {"rollout": ROLLOUT_ID})
        audit = screen.query_one(AuditTable)
        assert [str(audit.get_row_at(i)[1]) for i in range(audit.row_count)] == [
            "created by fleet-tui",
            "wave 1 started",
            "wave 2 started",
        ]
        assert any(isinstance(m, RequestDone) and m.op == "show" and m.ok for m in seen)
        # The log follows the highlighted node.
        log = screen.query_one(LogTail)
        assert log.node == "edge-001"
        await pilot.press("down", "down", "down")
        await until(pilot, lambda: log.node == "edge-004", "the log of edge-004")
        assert len(log.shown) == 5
        # Live: a step finishes, the grid cell changes in place.
        feed.push(
            StepStatus(
                node="edge-004",
                command="c-4",
                rollout=ROLLOUT_ID,
                index=2,
                type="package",
                state="succeeded",
                ts=DEMO_NOW,
            )
        )
        await until(pilot, lambda: grid.cell_word("edge-004", 2) == "ok", "the step to turn ok")
        await pilot.press("t")
        assert screen.query_one("#rollout-tabs").active == "audit"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("key", "op"), [("a", "abort"), ("b", "rollback")])
async def test_abort_and_rollback_ask_first_then_request(key: str, op: str) -> None:
    app, feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o", key)
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("n")
        assert isinstance(screen_of(app), RolloutsScreen)
        await pilot.press("enter")  # Enter on "No" never confirms: this opens the rollout
        await until(pilot, lambda: isinstance(screen_of(app), RolloutScreen), "the rollout screen")
        await pilot.press(key)
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("enter")  # the focused button is "No"
        assert isinstance(screen_of(app), RolloutScreen)
        assert [o for o, _ in ops(feed)] == ["show"]
        await pilot.press(key)
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: any(isinstance(m, RequestDone) and m.op == op for m in seen), op)
        assert (op, {"rollout": ROLLOUT_ID}) in ops(feed)
        words = "abort requested" if op == "abort" else "rollback requested"
        assert ("information", f"collector-1.5: {words}") in notifications(seen)


async def test_pause_and_resume_need_no_confirmation() -> None:
    app, feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o", "p")
        await until(pilot, lambda: ("pause", {"rollout": ROLLOUT_ID}) in ops(feed), "pause")
        await until(pilot, lambda: any(isinstance(m, RequestDone) and m.op == "pause" for m in seen), "pause")
        await pilot.press("u")
        await until(pilot, lambda: ("resume", {"rollout": ROLLOUT_ID}) in ops(feed), "resume")
        await until(pilot, lambda: ("information", "collector-1.5: resumed") in notifications(seen), "note")


async def test_hub_errors_become_error_notifications_never_tracebacks() -> None:
    app, _feed = demo_app(responder=refuse("rollback", "rollout r-2f6c1a is running: [abort] it first"))
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o", "b")
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: notifications(seen), "a notification")
        assert notifications(seen) == [("error", "rollout r-2f6c1a is running: [abort] it first")]
        assert isinstance(screen_of(app), RolloutsScreen)
    assert app.return_code in (0, None)


async def test_a_silent_hub_is_reported() -> None:
    app, _feed = demo_app(responder=lambda _request: None)
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o", "p")
        await until(pilot, lambda: notifications(seen), "a notification")
        severity, text = notifications(seen)[0]
        assert severity == "error"
        assert "no reply from the hub" in text


def _write_spec(path: Path, **fields: object) -> Path:
    spec = {
        "name": "collector-1.6",
        "targets": ["edge-001", "edge-007"],
        "plan": [{"type": "service", "action": "restart", "name": "collector"}],
        **fields,
    }
    path.write_text(json.dumps(spec))
    return path


async def test_new_rollout_from_a_file_previews_then_creates(tmp_path: Path) -> None:
    spec_file = _write_spec(tmp_path / "spec.json", require_online=False, strategy={"waves": [1]})
    app, feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(screen_of(app), NewRolloutScreen), "the new-rollout screen")
        screen = app.screen
        assert isinstance(screen, NewRolloutScreen)
        screen.query_one("#spec-path", Input).value = str(spec_file)
        await pilot.press("enter")
        await until(pilot, lambda: screen.preview is not None, "a preview")
        assert screen.preview is not None
        assert screen.preview.targets == ["edge-001", "edge-007"]
        assert screen.preview.offline == ["edge-007"]
        assert screen.preview.waves == [["edge-001"], ["edge-007"]]
        text = str(screen.query_one("#preview", Static).render())
        assert "edge-007 (offline)" in text
        assert "wave 2" in text
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(screen_of(app), RolloutScreen), "the new rollout's screen")
        create = [b for o, b in ops(feed) if o == "create_rollout"]
        assert create == [json.loads(spec_file.read_text())]
        assert app.screen.rollout == "r-new"  # type: ignore[attr-defined]
        assert ("information", "rollout r-new created") in notifications(seen)


async def test_new_rollout_asks_the_hub_for_its_plan(tmp_path: Path) -> None:
    spec_file = _write_spec(tmp_path / "spec.json")
    plan = {
        "kind": "plan",
        "dry_run": True,
        "name": "collector-1.6",
        "ok": False,
        "targets": ["edge-001", "edge-007"],
        "offline": ["edge-007"],
        "waves": [["edge-001", "edge-007"]],
        "problems": ["edge-007 is offline"],
        "warnings": [],
        "preflight": {"asked": 1, "passed": 1, "failed": 0, "unanswered": 0, "nodes": {}},
    }

    def responder(request: Request) -> Reply:
        if request.op == "plan":
            return Reply(request=request.id, ok=True, body=plan)
        return demo_responder(request)

    app, feed = demo_app(responder=responder)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(screen_of(app), NewRolloutScreen), "the new-rollout screen")
        screen = app.screen
        assert isinstance(screen, NewRolloutScreen)
        screen.query_one("#spec-path", Input).value = str(spec_file)
        await pilot.press("enter")
        await until(pilot, lambda: screen.preview is not None, "a preview")
        await pilot.press("ctrl+t")
        preview = screen.query_one("#preview", Static)
        await until(pilot, lambda: "would" in str(preview.render()), "the hub's plan")
        sent = [b for o, b in ops(feed) if o == "plan"]
        assert len(sent) == 1
        assert sent[0]["spec"] == json.loads(spec_file.read_text())
        text = str(preview.render())
        assert text.startswith("PLAN (dry run)")
        assert "edge-007" in text
        assert not [o for o, _ in ops(feed) if o == "create_rollout"]


async def test_new_rollout_from_examples_and_pasted_json_and_hub_refusal(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    _write_spec(examples / "restart.json")
    app, feed = demo_app(examples=examples, responder=refuse("create_rollout", "offline targets: edge-007"))
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(screen_of(app), NewRolloutScreen), "the new-rollout screen")
        screen = app.screen
        assert isinstance(screen, NewRolloutScreen)
        options = screen.query_one(OptionList)
        await until(pilot, lambda: options.option_count == 1, "the example listed")
        options.focus()
        await pilot.press("enter")
        await until(pilot, lambda: screen.preview is not None, "a preview of the example")
        assert screen.preview is not None
        assert "! offline targets: edge-007" in screen.preview.lines()
        # Pasted JSON replaces it; a broken one says why and cannot be sent.
        editor = screen.query_one(TextArea)
        editor.text = '{"name": "x", "targets": "all"}'
        await until(pilot, lambda: screen.error is not None, "a spec error")
        assert "plan" in str(screen.query_one("#preview", Static).render())
        await pilot.press("ctrl+s")
        await until(pilot, lambda: notifications(seen), "a notification")
        assert notifications(seen)[-1][0] == "error"
        assert not isinstance(screen_of(app), ConfirmScreen)
        editor.text = json.dumps(
            {"name": "all", "targets": "all", "plan": [{"type": "module", "name": "wifi_rt"}]}
        )
        await until(pilot, lambda: screen.preview is not None, "a preview")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: ("error", "offline targets: edge-007") in notifications(seen), "refusal")
        assert isinstance(screen_of(app), NewRolloutScreen)
        assert [o for o, _ in ops(feed)] == ["create_rollout"]


async def test_unreadable_spec_file_is_a_notification(tmp_path: Path) -> None:
    app, _feed = demo_app()
    seen: list[Message] = []
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await pilot.press("n")
        await until(pilot, lambda: isinstance(screen_of(app), NewRolloutScreen), "the new-rollout screen")
        app.screen.query_one("#spec-path", Input).value = str(tmp_path / "missing.json")
        await pilot.press("enter")
        await until(pilot, lambda: notifications(seen), "a notification")
        severity, text = notifications(seen)[0]
        assert severity == "error"
        assert "missing.json" in text


async def test_command_palette_offers_the_key_bindings() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Filter (/)" in titles
        assert "Rollouts (o)" in titles
        assert "Quit (q)" in titles
        await pilot.press("ctrl+p")
        await pilot.press(*"Rollouts (o)")
        hits = app.screen.query_one(CommandList)
        await until(pilot, lambda: hits.option_count == 1, "one palette hit")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(screen_of(app), RolloutsScreen), "the rollouts screen")


async def test_q_quits_cleanly_and_closes_the_feed() -> None:
    app, feed = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        await pilot.press("o", "enter")
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, "the app to exit", timeout=5)
    assert feed.stopped
    assert app.return_code == 0


async def test_no_color_keeps_every_state_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app, _feed = demo_app()
    assert app.no_color
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        assert {cell(table, n, "state").split()[0] for n in table.visible_nodes} == {"online", "offline"}


async def test_bad_bus_input_never_breaks_the_screen() -> None:
    updates = demo_updates(3)
    hostile = NodeState(
        node="edge-001",
        state="online",
        session="s-1",
        reason="birth",
        labels={"x": "[/bold] [link=x]"},
        inventory=Inventory(services={"[red]": "[/]"}),
    )
    app, _feed = demo_app([*updates, hostile])
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: "[/bold]" in cell(table, "edge-001", "labels"), "the hostile label")
        assert cell(table, "edge-001", "versions").startswith("[red]=[/]")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(screen_of(app), NodeScreen), "the node screen")
        await pilot.pause()
