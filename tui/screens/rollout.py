"""One rollout: state and progress, the node x step grid, a node's log, the audit trail."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Header, ProgressBar, Static, TabbedContent, TabPane

from tui.cells import STEP_WORDS, clock_text
from tui.context import Context
from tui.messages import HubRequest
from tui.model import Changes
from tui.screens.actions import ROLLOUT_BINDINGS, RolloutActions
from tui.screens.base import ModelScreen
from tui.widgets.audit_table import AuditTable
from tui.widgets.key_footer import KeyFooter
from tui.widgets.log_tail import LogTail
from tui.widgets.step_grid import StepGrid

__all__ = ["RolloutScreen"]

_LEGEND = "  ".join(f"{word}={state.replace('_', ' ')}" for state, (word, _) in STEP_WORDS.items())


class RolloutScreen(RolloutActions, ModelScreen):
    """Detail of one rollout, live; the audit trail is asked of the hub (``show``)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        *ROLLOUT_BINDINGS,
        Binding("r", "refresh_audit", "Refresh"),
        Binding("l", "tab('log')", "Log"),
        Binding("t", "tab('audit')", "Audit"),
    ]

    def __init__(self, ctx: Context, rollout: str) -> None:
        super().__init__(ctx)
        self.ctx_model = ctx.model
        self.rollout = rollout
        self._last_state: str | None = None

    def compose(self) -> ComposeResult:
        """Head, progress, grid, legend, log/audit tabs, footer."""
        yield Header()
        yield Static(id="rollout-head", markup=False)
        yield ProgressBar(total=None, show_eta=False, id="rollout-progress")
        yield StepGrid(id="grid")
        yield Static(id="node-steps", markup=False)
        yield Static(_LEGEND, id="legend", markup=False)
        with TabbedContent(initial="log", id="rollout-tabs"):
            with TabPane("Log (selected node)", id="log"):
                yield LogTail(utc=self.ctx.utc, id="rollout-log")
            with TabPane("Audit", id="audit"):
                yield AuditTable(utc=self.ctx.utc, id="audit-table")
        yield KeyFooter(compact=True)

    def selected_rollout(self) -> str | None:
        """This screen's rollout."""
        return self.rollout

    @property
    def grid(self) -> StepGrid:
        """The node x step grid."""
        return self.query_one(StepGrid)

    def on_mount(self) -> None:
        """Fill from the model, ask the hub for the audit trail."""
        self.title = f"fleet: rollout {self.rollout}"
        self._refresh()
        self.grid.focus()
        self._follow_selected()
        self.action_refresh_audit()

    def _refresh(self) -> None:
        view = self.ctx.model.rollouts.get(self.rollout)
        head = self.query_one("#rollout-head", Static)
        if view is None:
            head.update(f"rollout {self.rollout}: unknown (removed, or not published yet)")
            return
        summary = view.summary
        if summary is None:
            head.update(f"rollout {self.rollout}: waiting for the hub's summary")
        else:
            wave = f"wave {summary.wave}/{summary.waves}" if summary.waves else "wave -"
            detail = f"\n{summary.detail}" if summary.detail else ""
            created = clock_text(summary.created_at, self.ctx.utc)
            head.update(
                f"{summary.name}  [{summary.state}]  {wave}  created {created}  id {summary.id}{detail}"
            )
            if summary.state != self._last_state:
                # A state change writes audit entries: fetch them again.
                if self._last_state is not None:
                    self.action_refresh_audit()
                self._last_state = summary.state
        done, total = view.progress()
        self.query_one(ProgressBar).update(total=total or None, progress=done)
        self.grid.show(view)
        audit = self.query_one(AuditTable)
        if view.audit is not None and view.audit != audit.entries:
            audit.show(view.audit)

    def _follow_selected(self) -> None:
        node = self.grid.selected_node
        view = self.ctx.model.rollouts.get(self.rollout)
        line = view.node_line(node) if view is not None and node else ""
        self.query_one("#node-steps", Static).update(line)
        log = self.query_one(LogTail)
        if node != log.node:
            log.follow(self.ctx.model.nodes.get(node) if node else None, rollout=self.rollout)

    def model_changed(self, changes: Changes) -> None:
        """Update the grid and header; append the selected node's new log lines."""
        if not self.is_mounted:
            return
        if self.rollout in changes.rollouts or self.rollout in changes.removed_rollouts:
            self._refresh()
            self._follow_selected()
        log = self.query_one(LogTail)
        if log.node is not None and log.node in changes.logs:
            view = self.ctx.model.nodes.get(log.node)
            if view is not None:
                log.catch_up(view)

    def on_step_grid_node_highlighted(self, event: StepGrid.NodeHighlighted) -> None:
        """Show the highlighted node's log."""
        self._follow_selected()

    def action_refresh_audit(self) -> None:
        """Ask the hub for the rollout's audit trail (``show``)."""
        self.post_message(HubRequest("show", {"rollout": self.rollout}))

    def action_tab(self, tab: str) -> None:
        """Switch between the log and the audit tabs."""
        self.query_one(TabbedContent).active = tab
