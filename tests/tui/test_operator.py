"""What an operator relies on: the hub's step record in a fresh TUI, confirmations that name
the rollout, a cursor that stays put, the hub's plan that stays, Ctrl-C, the help screen, 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

from textual.message import Message
from textual.widgets import Input, Static

from bus.messages import NodeSummary, Reply, Request, RolloutCounts, RolloutSummary, StepStatus
from tests.tui.helpers import demo_app, ops, until
from tui.app import FleetApp
from tui.cells import counts_text, phase_text
from tui.demo import DEMO_NOW, demo_responder, demo_updates
from tui.model import FleetModel, RolloutView
from tui.screens.about import AboutScreen, read_http_info
from tui.screens.confirm import ConfirmScreen
from tui.screens.new_rollout import NewRolloutScreen
from tui.screens.rollout import RolloutScreen
from tui.screens.rollouts import RolloutsScreen
from tui.widgets.node_table import NodeTable, fit_widths
from tui.widgets.rollout_table import RolloutTable
from tui.widgets.step_grid import StepGrid

FINISHED = "0c7e7f10-5a5e-4c55-9a36-000000000001"
_STEPS = ("download", "service", "file", "service", "health")


def _finished_summary(created: float = DEMO_NOW - 600, rollout: str = FINISHED) -> RolloutSummary:
    return RolloutSummary(
        id=rollout,
        name="demo-app 2.1",
        state="rolled_back",
        created_at=created,
        updated_at=created + 30,
        counts=RolloutCounts(failed=1, rolled_back=2),
        nodes={
            "node-1": NodeSummary(phase="rolled_back"),
            "node-2": NodeSummary(phase="rolled_back"),
            "node-3": NodeSummary(phase="failed", step=4, detail="health check failed"),
        },
        wave=1,
        waves=1,
    )


def _recorded(state: str, detail: str = "") -> list[dict[str, object]]:
    cells: list[dict[str, object]] = [
        {"index": i, "type": kind, "state": "rolled_back", "detail": ""} for i, kind in enumerate(_STEPS[:4])
    ]
    cells.append({"index": 4, "type": "health", "state": state, "detail": detail})
    return cells


def _hub_with_record(request: Request) -> Reply:
    """A hub whose ``show`` carries every node's recorded steps (the agreed ``steps`` field)."""
    if request.op == "show" and request.body.get("rollout") == FINISHED:
        body = _finished_summary().model_dump(mode="json")
        body["audit"] = []
        body["steps"] = {
            "node-1": _recorded("rolled_back"),
            "node-2": _recorded("rolled_back"),
            "node-3": _recorded(
                "failed", "starting demo-app\nTraceback (most recent call last):\nexpected 2.1, got 1.0"
            ),
        }
        return Reply(request=request.id, ok=True, body=body)
    return demo_responder(request)


def screen_of(app: FleetApp) -> object:
    return app.screen


async def test_a_fresh_tui_draws_a_finished_rollout_from_the_hubs_record() -> None:
    # Nothing live: only the retained summary, as a TUI opened after the rollout sees.
    app, feed = demo_app(updates=[_finished_summary()], responder=_hub_with_record)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: FINISHED in app.model.rollouts, "the rollout")
        await pilot.press("o", "enter")
        await until(pilot, lambda: isinstance(screen_of(app), RolloutScreen), "the rollout screen")
        grid = app.screen.query_one(StepGrid)
        await until(
            pilot, lambda: grid.row_count == 3 and grid.cell_word("node-3", 4) == "FAIL", "the record"
        )
        assert [grid.cell_word("node-3", i) for i in range(5)] == ["undone"] * 4 + ["FAIL"]
        assert grid.cell_word("node-1", 4) == "undone"
        headers = [str(column.label) for column in grid.columns.values()]
        assert headers == ["Node", "Phase", "1.fetch", "2.svc", "3.file", "4.svc", "5.health"]
        await pilot.press("down", "down")
        line = app.screen.query_one("#node-steps", Static)
        # 1-based, and the meaningful line of the output (its last), not all of it.
        await until(pilot, lambda: "node-3" in str(line.render()), "the selected node's line")
        assert str(line.render()) == "node-3: step 5 (health) failed: expected 2.1, got 1.0"
        # Live reports keep updating the grid after the record.
        feed.push(
            StepStatus(
                node="node-1",
                command="c-9",
                rollout=FINISHED,
                index=0,
                type="download",
                state="running",
                ts=DEMO_NOW,
            )
        )
        await until(pilot, lambda: grid.cell_word("node-1", 0) == "run", "a live report")


def test_a_recorded_pending_never_hides_a_state_heard_live() -> None:
    model = FleetModel()
    model.apply(
        StepStatus(
            node="n", command="c", rollout="r", index=0, type="download", state="succeeded", ts=DEMO_NOW
        ),
        DEMO_NOW,
    )
    model.set_detail(
        "r",
        {
            "steps": {
                "n": [
                    {"index": 0, "type": "download", "state": "pending"},
                    {"index": 1, "type": "health", "state": "failed", "detail": "x"},
                    {"index": "bad"},
                    "junk",
                ],
                7: [],
            }
        },
    )
    view = model.rollouts["r"]
    assert view.cell("n", 0).state == "succeeded"
    assert view.cell("n", 1).state == "failed"
    assert view.step_types == {0: "download", 1: "health"}
    assert view.node_line("n") == "n: step 2 (health) failed: x"


async def test_confirmations_name_id_and_creation_time_of_rollouts_sharing_a_name() -> None:
    twin = _finished_summary(created=DEMO_NOW - 60, rollout="1a7e70f1-0000-4000-8000-000000000002")
    app, feed = demo_app(updates=[_finished_summary(), twin])
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "both rollouts")
        await pilot.press("o", "down", "b")
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        question = str(app.screen.query_one("#confirm-question", Static).render())
        assert question == "Roll back rollout demo-app 2.1 (id 0c7e7f10, created 2024-05-01 11:50:00)?"
        await pilot.press("escape", "up", "a")
        await until(pilot, lambda: isinstance(screen_of(app), ConfirmScreen), "the confirmation")
        question = str(app.screen.query_one("#confirm-question", Static).render())
        assert question == "Abort rollout demo-app 2.1 (id 1a7e70f1, created 2024-05-01 11:59:00)?"
        await pilot.press("y")
        await until(pilot, lambda: ("abort", {"rollout": twin.id}) in ops(feed), "the abort of the newer one")


async def test_rollouts_cursor_follows_the_newest_only_from_the_top_row() -> None:
    app, feed = demo_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: len(app.model.rollouts) == 2, "rollouts")
        await pilot.press("o")
        await until(pilot, lambda: isinstance(screen_of(app), RolloutsScreen), "the rollouts screen")
        table = app.screen.query_one(RolloutTable)
        await until(pilot, lambda: table.row_count == 2, "two rows")
        top = table.selected_rollout
        # On the top row: a newer rollout appears above and takes the cursor.
        newer = _finished_summary(created=DEMO_NOW - 1, rollout="r-newer")
        feed.push(newer)
        await until(pilot, lambda: table.row_count == 3, "the new row")
        assert table.visible_rollouts[0] == "r-newer"
        assert table.selected_rollout == "r-newer"
        # What tells same-named rollouts apart is on screen at 80 columns: id and creation time.
        assert [str(c.label) for c in table.columns.values()][:5] == [
            "Name",
            "Id",
            "State",
            "Progress",
            "Created",
        ]
        assert str(table.get_cell("r-newer", "created")) == "05-01 11:59"
        # Elsewhere: the cursor stays on the rollout the operator chose.
        await pilot.press("down")
        chosen = table.selected_rollout
        assert chosen == top
        feed.push(_finished_summary(created=DEMO_NOW, rollout="r-newest"))
        await until(pilot, lambda: table.row_count == 4, "another row")
        assert table.selected_rollout == chosen


async def test_the_hubs_plan_stays_until_the_spec_changes(tmp_path: Path) -> None:
    spec = {
        "name": "collector-1.6",
        "targets": ["edge-001", "edge-002"],
        "plan": [{"type": "service", "action": "restart", "name": "collector"}],
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    plan = {
        "kind": "plan",
        "dry_run": True,
        "name": "collector-1.6",
        "ok": True,
        "targets": ["edge-001", "edge-002"],
        "waves": [["edge-001", "edge-002"]],
    }

    def responder(request: Request) -> Reply:
        if request.op == "plan":
            return Reply(request=request.id, ok=True, body=plan)
        return demo_responder(request)

    app, feed = demo_app(responder=responder)
    async with app.run_test(size=(120, 40)) as pilot:
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
        await until(pilot, lambda: "looks good" in str(preview.render()), "the hub's plan")
        # Heartbeats re-draw the local preview; the hub's plan stays above it.
        feed.push(*[u for u in demo_updates(heartbeats=2) if type(u).__name__ == "Heartbeat"])
        await until(pilot, lambda: app.model.nodes["edge-001"].seen_at is not None, "heartbeats")
        await pilot.pause(0.2)
        text = str(preview.render())
        assert "HUB PLAN" in text
        assert "looks good" in text
        assert "LOCAL PREVIEW" in text
        # An edited spec is not the planned one: the plan goes, the preview stays.
        screen.query_one("#spec-json").text = json.dumps({**spec, "name": "collector-1.7"})  # type: ignore[attr-defined]
        await until(pilot, lambda: "HUB PLAN" not in str(preview.render()), "the plan dropped")
        assert "collector-1.7" in str(preview.render())
        assert [o for o, _ in ops(feed)].count("plan") == 1


async def test_ctrl_c_quits() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: len(app.model.nodes) == 12, "nodes")
        await pilot.press("ctrl+c")
        await until(pilot, lambda: app._exit, "the app to quit")  # Textual's exit flag


async def test_help_screen_shows_the_http_url_and_token(tmp_path: Path) -> None:
    info = tmp_path / "http.env"
    info.write_text("FLEET_HTTP_URL=http://127.0.0.1:8765\nFLEET_HTTP_TOKEN=tok-123_abc\n")
    expected = {"FLEET_HTTP_URL": "http://127.0.0.1:8765", "FLEET_HTTP_TOKEN": "tok-123_abc"}
    assert read_http_info(info) == expected
    assert read_http_info(tmp_path / "missing") == {}
    app, _feed = demo_app()
    app.config = app.config.model_copy(update={"http_info": info})
    seen: list[Message] = []
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(screen_of(app), AboutScreen), "the help screen")
        text = app.screen.query_one("#about-text", Static)
        await until(pilot, lambda: "tok-123_abc" in str(text.render()), "the token")
        shown = str(text.render())
        assert "http://127.0.0.1:8765" in shown
        assert f". {info}" in shown
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(screen_of(app), AboutScreen), "closed")


def test_fleet_columns_fit_80_with_versions_before_labels() -> None:
    widths = fit_widths(80)
    keys = list(widths)
    assert keys.index("versions") < keys.index("labels")
    visible = sum(w + 2 for k, w in widths.items() if k != "labels")
    assert visible <= 80 - 2  # the scrollbar's columns stay free
    wide = fit_widths(120)
    assert sum(w + 2 for w in wide.values()) <= 120 - 2
    assert wide["versions"] > widths["versions"]


async def test_fleet_table_shows_versions_at_80_columns() -> None:
    app, _feed = demo_app()
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one(NodeTable)
        await until(pilot, lambda: table.row_count == 12, "12 rows")
        await pilot.pause()
        x = 0
        spans = {}
        for column in table.columns.values():
            width = column.get_render_width(table)
            spans[str(column.key.value)] = (x, x + width)
            x += width
        assert spans["versions"][1] <= 80
        assert spans["job"][1] <= 80


def test_new_phases_and_counts_are_shown_in_words() -> None:
    counts = RolloutCounts(failed=1, rolled_back=2, rollback_failed=1, not_started=2)
    text = str(counts_text(counts))
    assert text == "ok 0 run 0 fail 1 undone 2 wait 0 RB-FAIL 1 not started 2"
    assert str(counts_text(RolloutCounts(succeeded=3))) == "ok 3 run 0 fail 0 undone 0 wait 0"
    assert phase_text("rollback_failed").style == "bold red reverse"
    summary = _finished_summary().model_copy(update={"counts": counts})
    # Progress comes from the nodes, not the counts: those overlap (a failed node restored is in both).
    assert RolloutView("r", summary=summary).progress() == (len(summary.nodes), len(summary.nodes))
