"""A rollout's node x step grid: each cell says pending, running, ok, failed or undone."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

from tui.cells import phase_text, step_text
from tui.model import RolloutView

__all__ = ["StepGrid"]

#: Short step-type names for the column headers, so five steps fit in 80 columns.
_SHORT = {
    "download": "fetch",
    "service": "svc",
    "package": "pkg",
    "container": "ctr",
    "file": "file",
    "script": "script",
    "module": "mod",
    "health": "health",
}


class StepGrid(DataTable[Any]):
    """Rows are target nodes, columns the plan's steps; rebuilt only when its shape changes."""

    class NodeHighlighted(Message):
        """The cursor moved to a node's row."""

        def __init__(self, node: str) -> None:
            super().__init__()
            self.node = node

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._shape: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._cells: dict[str, tuple[str | Text, ...]] = {}

    @staticmethod
    def _headers(view: RolloutView, steps: int) -> tuple[str, ...]:
        return tuple(
            f"{index + 1}.{_SHORT.get(kind, kind[:6])}"
            for index, kind in ((i, view.step_types.get(i, "step")) for i in range(steps))
        )

    @staticmethod
    def _render_row(view: RolloutView, node: str, steps: int) -> tuple[str | Text, ...]:
        summary = view.summary.nodes.get(node) if view.summary else None
        phase = phase_text(summary.phase) if summary else Text("-")
        return (node, phase, *(step_text(view.cell(node, index).state) for index in range(steps)))

    def show(self, view: RolloutView) -> None:
        """Bring the grid up to date with ``view``: in place when the shape is unchanged."""
        steps = view.step_count
        headers = self._headers(view, steps)
        nodes = tuple(view.node_ids)
        if (headers, nodes) != self._shape:
            self._rebuild(view, headers, nodes)
            return
        for node in nodes:
            new = self._render_row(view, node, steps)
            old = self._cells.get(node)
            self._cells[node] = new
            if old is None:
                continue
            for index, (before, after) in enumerate(zip(old, new, strict=True)):
                if before != after:
                    self.update_cell_at(Coordinate(self.get_row_index(node), index), after)

    def _rebuild(self, view: RolloutView, headers: tuple[str, ...], nodes: tuple[str, ...]) -> None:
        selected = self.selected_node
        self.clear(columns=True)
        self._cells.clear()
        self.add_column("Node", key="node", width=14)
        self.add_column("Phase", key="phase", width=12)
        for index, header in enumerate(headers):
            self.add_column(header, key=f"step{index}", width=max(6, len(header)))
        for node in nodes:
            cells = self._render_row(view, node, len(headers))
            self._cells[node] = cells
            self.add_row(*cells, key=node)
        self._shape = (headers, nodes)
        if selected in self._cells:
            self.move_cursor(row=self.get_row_index(selected), scroll=False)

    @property
    def selected_node(self) -> str | None:
        """The node under the cursor, if any."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except CellDoesNotExist:
            return None

    def cell_word(self, node: str, index: int) -> str:
        """The word shown for step ``index`` of ``node`` (for tests and screen readers)."""
        return str(self._cells[node][2 + index])

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Tell the screen which node is under the cursor."""
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.NodeHighlighted(event.row_key.value))
