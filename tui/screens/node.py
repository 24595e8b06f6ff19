"""One node: inventory, a load sparkline from its heartbeats, recent jobs and its log."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Header, Sparkline, Static

from tui.cells import age_text, load_text, pct_text
from tui.context import Context
from tui.model import Changes
from tui.screens.base import ModelScreen
from tui.widgets.inventory_table import InventoryTable
from tui.widgets.job_table import JobTable
from tui.widgets.key_footer import KeyFooter
from tui.widgets.log_tail import LogTail

__all__ = ["NodeScreen"]


class NodeScreen(ModelScreen):
    """Detail of one node, live."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, ctx: Context, node: str) -> None:
        super().__init__(ctx)
        self.node = node

    def compose(self) -> ComposeResult:
        """Head line, inventory | load sparkline + jobs, log tail."""
        yield Header()
        yield Static(id="node-head", markup=False)
        with Horizontal(id="node-body"):
            yield InventoryTable(id="inventory")
            with Vertical(id="node-side"):
                yield Static("load (last heartbeats)", id="load-label")
                yield Sparkline([], id="load")
                yield JobTable(self.ctx.model, utc=self.ctx.utc, id="jobs")
        yield LogTail(utc=self.ctx.utc, id="node-log")
        yield KeyFooter(compact=True)

    def on_mount(self) -> None:
        """Fill everything once."""
        self.title = f"fleet: node {self.node}"
        view = self.ctx.model.nodes.get(self.node)
        self.query_one(LogTail).follow(view)
        self._refresh_all()

    def _refresh_all(self) -> None:
        view = self.ctx.model.nodes.get(self.node)
        head = self.query_one("#node-head", Static)
        if view is None:
            head.update(f"{self.node}: no longer known (its retained state was cleared)")
            return
        now = self.ctx.clock()
        labels = " ".join(f"{k}={v}" for k, v in sorted(view.labels.items())) or "-"
        uptime = age_text(view.uptime_s) if view.uptime_s is not None else "-"
        head.update(
            f"{view.node}  {view.presence(now)} (seen {age_text(view.age(now))} ago, {view.reason or '-'})"
            f"  agent {view.agent_version or '-'}  up {uptime}\n"
            f"load {load_text(view.load1)}  mem {pct_text(view.mem_used_pct)}  "
            f"disk free {pct_text(view.disk_free_pct)}  job {self.ctx.model.job_label(view) or '-'}\n"
            f"labels {labels}"
        )
        self.query_one(InventoryTable).show(view.inventory)
        self.query_one("#load", Sparkline).data = list(view.loads)
        self.query_one(JobTable).show(view)

    def model_changed(self, changes: Changes) -> None:
        """Refresh when this node moved; append its new log lines."""
        if not self.is_mounted:
            return
        if self.node in changes.nodes or self.node in changes.removed_nodes:
            self._refresh_all()
        if self.node in changes.logs:
            view = self.ctx.model.nodes.get(self.node)
            if view is not None:
                self.query_one(LogTail).catch_up(view)

    def tick(self) -> None:
        """The last-seen age moves."""
        if self.is_mounted:
            self._refresh_all()
