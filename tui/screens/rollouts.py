"""The rollout list: every rollout with its state, progress and counts."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Header, Static

from tui.context import Context
from tui.model import Changes
from tui.screens.actions import ROLLOUT_BINDINGS, RolloutActions
from tui.screens.base import ModelScreen
from tui.screens.rollout import RolloutScreen
from tui.widgets.key_footer import KeyFooter
from tui.widgets.rollout_table import RolloutTable

__all__ = ["RolloutsScreen"]


class RolloutsScreen(RolloutActions, ModelScreen):
    """Rollouts, newest first; act on the one under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back"), *ROLLOUT_BINDINGS]

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.ctx_model = ctx.model

    def compose(self) -> ComposeResult:
        """Header, summary line, table, footer."""
        yield Header()
        yield Static(id="rollouts-summary", markup=False)
        yield RolloutTable(self.ctx.model, utc=self.ctx.utc, id="rollouts")
        yield KeyFooter(compact=True)

    @property
    def table(self) -> RolloutTable:
        """The rollout table."""
        return self.query_one(RolloutTable)

    def on_mount(self) -> None:
        """Title and focus."""
        self.title = "fleet: rollouts"
        self.table.focus()
        self._summarize()

    def _summarize(self) -> None:
        views = self.ctx.model.rollouts_newest_first()
        busy = ("pending", "running", "paused", "rolling_back", "aborting")
        active = sum(1 for v in views if v.summary and v.summary.state in busy)
        self.query_one("#rollouts-summary", Static).update(
            f"{len(views)} rollouts, {active} active | Enter: detail"
        )

    def model_changed(self, changes: Changes) -> None:
        """Update changed rows in place."""
        if self.is_mounted and (changes.rollouts or changes.removed_rollouts):
            self.table.sync(changes)
            self._summarize()

    def selected_rollout(self) -> str | None:
        """The rollout under the cursor."""
        return self.table.selected_rollout

    def on_rollout_table_opened(self, event: RolloutTable.Opened) -> None:
        """Open the rollout's detail screen."""
        self.app.push_screen(RolloutScreen(self.ctx, event.rollout))
