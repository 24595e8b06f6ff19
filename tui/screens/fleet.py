"""The fleet screen: every node, its presence, load, versions and current job."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.timer import Timer
from textual.widgets import Header, Input, Static

from tui.cells import time_text
from tui.context import Context
from tui.model import Changes, parse_filter
from tui.screens.base import ModelScreen
from tui.screens.node import NodeScreen
from tui.screens.versions import VersionsScreen, fleet_versions
from tui.versions import drifting
from tui.widgets.key_footer import KeyFooter
from tui.widgets.node_table import NodeTable

__all__ = ["FleetScreen"]

#: The filter applies once typing pauses this long (or on Enter).
FILTER_DELAY_S = 0.25


class FleetScreen(ModelScreen):
    """The first screen: the fleet table with a filter box and a summary line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("v", "versions", "Versions"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._filter_timer: Timer | None = None
        self._drift: tuple[int, list[str]] = (-1, [])

    def compose(self) -> ComposeResult:
        """Header, summary, filter box (hidden until ``/``), table, last event, footer."""
        yield Header()
        yield Static(id="fleet-summary", markup=False)
        yield Input(placeholder="filter: words, or label=value (Esc clears)", id="filter", classes="hidden")
        yield NodeTable(self.ctx.model, id="nodes")
        yield Static(id="last-event", markup=False)
        yield KeyFooter(compact=True)

    @property
    def table(self) -> NodeTable:
        """The node table."""
        return self.query_one(NodeTable)

    def on_mount(self) -> None:
        """Title, first fill, focus the table."""
        self.title = "fleet: nodes"
        self.table.rebuild(self.ctx.clock())
        self.table.focus()
        self._summarize()
        self._show_last_event()

    def model_changed(self, changes: Changes) -> None:
        """Update changed rows in place, the summary, the last event line."""
        if not self.is_mounted:
            return
        if changes.nodes or changes.added_nodes or changes.removed_nodes:
            self.table.sync(changes, self.ctx.clock())
            self._summarize()
        if changes.events:
            self._show_last_event()

    def _show_last_event(self) -> None:
        if self.ctx.model.events:
            event = self.ctx.model.events[-1]
            self.query_one("#last-event", Static).update(
                f"{time_text(event.ts, self.ctx.utc)} {event.kind}: {event.message}"
            )

    def tick(self) -> None:
        """Ages move, nodes go stale."""
        if self.is_mounted and self.query(NodeTable):  # not while the app is tearing the screen down
            self.table.tick(self.ctx.clock())
            self._summarize()

    def _summarize(self) -> None:
        now = self.ctx.clock()
        counts = {"online": 0, "stale": 0, "offline": 0}
        for view in self.ctx.model.nodes.values():
            counts[view.presence(now)] += 1
        total = len(self.ctx.model.nodes)
        shown = self.table.row_count
        text = (
            f"{total} nodes: {counts['online']} online, {counts['stale']} stale, "
            f"{counts['offline']} offline | sort: {self.table.sort_label}"
        )
        if self.table.filter:
            text += f" | filter: {shown} shown"
        drift = self._drifting(now)
        if drift:
            text += f" | DRIFT: {', '.join(drift[:3])}{' ...' if len(drift) > 3 else ''} (v)"
        self.query_one("#fleet-summary", Static).update(text)

    # ------------------------------------------------------------------ actions

    def action_filter(self) -> None:
        """Show and focus the filter box."""
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    def action_clear_filter(self) -> None:
        """Empty and hide the filter box."""
        box = self.query_one("#filter", Input)
        if not box.value and box.has_class("hidden"):
            return
        box.value = ""
        box.add_class("hidden")
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        self.table.filter = parse_filter("")
        self.table.rebuild(self.ctx.clock())
        self.table.focus()
        self._summarize()

    def on_input_changed(self, event: Input.Changed) -> None:
        """Filter as the operator types, once typing pauses (a refilter of 1000 rows is not free)."""
        if event.input.id != "filter":
            return
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self._filter_timer = self.set_timer(FILTER_DELAY_S, self._apply_filter)

    def _apply_filter(self) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        wanted = parse_filter(self.query_one("#filter", Input).value)
        if wanted != self.table.filter:
            self.table.filter = wanted
            self.table.rebuild(self.ctx.clock())
            self._summarize()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter applies the filter now and goes back to the table."""
        if event.input.id == "filter":
            self._apply_filter()
            if not event.value.strip():
                event.input.add_class("hidden")
            self.table.focus()

    def action_sort(self) -> None:
        """Cycle the sort column."""
        self.table.cycle_sort()
        self._summarize()

    def action_reverse(self) -> None:
        """Reverse the sort order."""
        self.table.toggle_reverse()
        self._summarize()

    def _drifting(self, now: float) -> list[str]:
        """Software in more than one version; recomputed only when reported versions changed."""
        epoch = self.ctx.model.versions_epoch
        if self._drift[0] != epoch:
            self._drift = (epoch, drifting(fleet_versions(self.ctx.model, now)))
        return self._drift[1]

    def action_versions(self) -> None:
        """The version drift view: which versions run where."""
        self.app.push_screen(VersionsScreen(self.ctx))

    def on_node_table_opened(self, event: NodeTable.Opened) -> None:
        """Open the node's detail screen."""
        self.app.push_screen(NodeScreen(self.ctx, event.node))
