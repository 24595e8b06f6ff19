"""The version drift view: which versions of what run where, across the fleet."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Header, Static

from tui.model import Changes, FleetModel
from tui.screens.base import ModelScreen
from tui.versions import VersionGroup, drifting, group_versions, software_versions
from tui.widgets.key_footer import KeyFooter

__all__ = ["VersionsScreen", "fleet_versions"]

#: Nodes named in a row before "+N more".
_NAMED = 12


def fleet_versions(model: FleetModel, now: float) -> list[VersionGroup]:
    """The model's nodes grouped by software and version (offline ones with their last report)."""
    return group_versions(
        (
            view.node,
            view.presence(now) != "offline",
            software_versions(
                view.inventory.services, view.inventory.packages, view.inventory.drivers, view.agent_version
            ),
        )
        for view in model.nodes.values()
    )


class VersionsScreen(ModelScreen):
    """One row per software and version: how many nodes, which ones; drifting software first."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def compose(self) -> ComposeResult:
        """Header, summary, table, footer."""
        yield Header()
        yield Static(id="versions-summary", markup=False)
        yield DataTable[Any](id="versions", cursor_type="row")
        yield KeyFooter(compact=True)

    def on_mount(self) -> None:
        """Columns, first fill."""
        self.title = "fleet: versions"
        table = self.query_one("#versions", DataTable)
        for key, label, width in (
            ("drift", "Drift", 5),
            ("software", "Software", 18),
            ("version", "Version", 12),
            ("count", "Nodes", 5),
            ("where", "Where", 60),
        ):
            table.add_column(label, key=key, width=width)
        table.focus()
        self._fill()

    def _fill(self) -> None:
        groups = fleet_versions(self.ctx.model, self.ctx.clock())
        drift = set(drifting(groups))
        total = len(self.ctx.model.nodes)
        table = self.query_one("#versions", DataTable)
        table.clear()
        ordered = sorted(
            groups, key=lambda g: (g.software not in drift, g.software, -len(g.nodes), g.version)
        )
        for group in ordered:
            names = [f"{n} (offline)" if n in group.offline else n for n in group.nodes]
            more = f" +{len(names) - _NAMED} more" if len(names) > _NAMED else ""
            where = (
                "all nodes" if len(group.nodes) == total and not group.offline else ", ".join(names[:_NAMED])
            )
            table.add_row(
                Text("DRIFT", style="bold yellow") if group.software in drift else Text("-", style="dim"),
                Text(group.software),
                Text(group.version),
                str(len(group.nodes)),
                Text(where + more),
            )
        summary = (
            f"{len(drift)} of {len({g.software for g in groups})} programs run in more than one version: "
            + ", ".join(sorted(drift))
            if drift
            else f"no version drift: every program runs one version on all {total} nodes that report it"
        )
        self.query_one("#versions-summary", Static).update(summary)

    @property
    def rows(self) -> list[tuple[str, ...]]:
        """The table as text (for tests and screen readers)."""
        table = self.query_one("#versions", DataTable)
        return [tuple(str(cell) for cell in table.get_row_at(i)) for i in range(table.row_count)]

    def model_changed(self, changes: Changes) -> None:
        """A node's birth (new versions) or removal changes the view."""
        if self.is_mounted and (changes.added_nodes or changes.removed_nodes or changes.nodes):
            self._fill()
