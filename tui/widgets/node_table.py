"""The fleet table: one row per node, cells updated in place as the bus reports."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.text import Text
from textual.geometry import Size
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets._data_table import Row
from textual.widgets.data_table import CellDoesNotExist, CellKey, ColumnKey, RowKey

from tui.cells import load_text, pct_text, plain, presence_text
from tui.model import SORT_COLUMNS, Changes, FleetModel, NodeFilter, NodeView, SortColumn, versions_text

__all__ = ["COLUMNS", "NodeTable", "fit_widths"]

#: (key, header, width): versions before job and labels, so an 80-column terminal shows
#: a node's versions; the last three columns share what the terminal has left (``fit``).
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("node", "Node", 14),
    ("state", "State", 11),
    ("load", "Load", 5),
    ("mem", "Mem", 4),
    ("disk", "Disk", 4),
    ("versions", "Versions", 14),
    ("job", "Job", 12),
    ("labels", "Labels", 20),
)
#: How the spare width is handed out, stage by stage: (column, grow it up to this width).
_GROWTH = (("versions", 24), ("job", 20), ("labels", 24), ("versions", 40), ("labels", 36), ("job", 28))
#: Columns of a vertical scrollbar, kept free so the last visible column is never cut.
_SCROLLBAR = 2
_KEYS = tuple(key for key, _, _ in COLUMNS)
#: Beyond this many rows to drop, clearing the table and adding the rest back is cheaper.
_MAX_REMOVALS = 50
#: A tick refreshes the age of every row of a table this small; of a bigger one, the rows on
#: screen and this many others in turn (10,000 cell updates a second would starve the app).
_TICK_ALL_ROWS = 2000
_TICK_CHUNK = 1000


def fit_widths(total: int) -> dict[str, int]:
    """Content widths of the columns for a table ``total`` cells wide (each column adds 2 of padding).

    The fixed columns keep their width; versions grow first, then job, then labels
    (``_GROWTH``). Labels come last: at 80 columns they are off to the right (scroll).
    """
    widths = {key: width for key, _, width in COLUMNS}
    widths["labels"] = 0
    spare = total - _SCROLLBAR - sum(width + 2 for width in widths.values())
    for key, limit in _GROWTH:
        grow = max(0, min(spare, limit - widths[key]))
        if key == "labels" and widths[key] == 0 and grow < 12:
            continue  # a labels column narrower than this shows nothing useful: keep it off-screen
        widths[key] += grow
        spare -= grow
    widths["labels"] = widths["labels"] or 20
    return widths


class NodeTable(DataTable[Any]):
    """Every node that passes the filter, sorted by a column; only changed cells are touched."""

    class Opened(Message):
        """The operator chose a node (Enter)."""

        def __init__(self, node: str) -> None:
            super().__init__()
            self.node = node

    def __init__(self, model: FleetModel, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._model = model
        self._cells: dict[str, tuple[str | Text, ...]] = {}
        self._texts: dict[str, tuple[object, object, Text, Text]] = {}
        self._now = 0.0
        self.filter = NodeFilter()
        self.sort_column: SortColumn = "node"
        self.reverse = False
        self._order_dirty = False
        self._tick_next = 0

    def on_mount(self) -> None:
        """Create the columns."""
        for key, header, width in COLUMNS:
            self.add_column(header, key=key, width=width)

    def on_resize(self) -> None:
        """Share the terminal's width between versions, job and labels (80 columns show versions)."""
        widths = fit_widths(self.size.width)
        changed = False
        for key, width in widths.items():
            column = self.columns.get(ColumnKey(key))
            if column is not None and column.width != width:
                column.width = width
                changed = True
        if changed:
            self._require_update_dimensions = True
            self.refresh()

    # ------------------------------------------------------------------ rendering

    def _text_cells(self, view: NodeView) -> tuple[Text, Text]:
        """Labels and versions, re-rendered only when the node sent a new birth."""
        cached = self._texts.get(view.node)
        if cached is not None and cached[0] is view.labels and cached[1] is view.inventory:
            return cached[2], cached[3]
        labels = plain(" ".join(f"{k}={v}" for k, v in sorted(view.labels.items())))
        versions = plain(versions_text(view.inventory))
        self._texts[view.node] = (view.labels, view.inventory, labels, versions)
        return labels, versions

    def _render_row(self, view: NodeView) -> tuple[str | Text, ...]:
        labels, versions = self._text_cells(view)
        return (
            view.node,
            presence_text(view.presence(self._now), view.age(self._now)),
            load_text(view.load1),
            pct_text(view.mem_used_pct),
            pct_text(view.disk_free_pct),
            versions,
            plain(self._model.job_label(view)),
            labels,
        )

    # ------------------------------------------------------------------ 10,000 rows
    #
    # DataTable measures every new cell, and re-measures a whole column when an updated
    # cell got narrower, to size auto-width columns; every column here has a fixed
    # width (``fit_widths``) and every row one line, so nothing needs measuring. And its
    # add_row sets the cursor (a reactive, with watchers) once per row: new rows are
    # added in one batch instead. The same rows and cells, a hundred times cheaper at
    # 10,000 nodes (bench/tui_fleet.py).

    def _fixed_widths(self) -> bool:
        return not any(column.auto_width for column in self.columns.values())

    def _update_column_widths(self, updated_cells: set[CellKey]) -> None:
        if not self._fixed_widths():
            super()._update_column_widths(updated_cells)

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        if not self._fixed_widths():
            super()._update_dimensions(new_rows)
            return
        width = sum(column.get_render_width(self) for column in self.columns.values())
        header = self.header_height if self.show_header else 0
        self.virtual_size = Size(width + self._row_label_column_width, self._total_row_height + header)

    def _add_rows(self, rows: list[tuple[str, tuple[str | Text, ...]]]) -> None:
        """``add_row`` for each of ``rows`` (key, cells), with one cursor update for all."""
        if not rows:
            return
        columns = self.ordered_columns
        was_empty = not self.rows
        for key, cells in rows:
            row_key = RowKey(key)
            self._row_locations[row_key] = len(self.rows)
            self._data[row_key] = {column.key: cell for column, cell in zip(columns, cells, strict=True)}
            self.rows[row_key] = Row(row_key, 1, None, False)
            self._new_rows.add(row_key)
        self._require_update_dimensions = True
        self.cursor_coordinate = self.cursor_coordinate
        if was_empty and self.columns and self.show_cursor and self.cursor_type != "none":
            self._highlight_cursor()
        self._update_count += 1
        self.check_idle()

    def _write_row(self, view: NodeView, added: list[tuple[str, tuple[str | Text, ...]]]) -> bool:
        """Queue the node's new row in ``added`` or update its changed cells; True when a row is new."""
        new = self._render_row(view)
        old = self._cells.get(view.node)
        self._cells[view.node] = new
        if old is None:
            added.append((view.node, new))
            return True
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            if before != after:
                self.update_cell(view.node, _KEYS[index], after)
                if _KEYS[index] in self._sort_cells:
                    self._order_dirty = True
        return False

    @property
    def _sort_cells(self) -> tuple[str, ...]:
        """Columns whose change can move a row under the current sort."""
        return ("state",) if self.sort_column == "seen" else (self.sort_column,)

    def _drop_row(self, node: str) -> bool:
        self._texts.pop(node, None)
        if self._cells.pop(node, None) is None:
            return False
        self.remove_row(node)
        return True

    # ------------------------------------------------------------------ updates

    def sync(self, changes: Changes, now: float) -> None:
        """Bring the rows named by ``changes`` up to date."""
        self._now = now
        selected = self.selected_node if self._cells else None
        moved = False
        added: list[tuple[str, tuple[str | Text, ...]]] = []
        for node in changes.removed_nodes:
            moved |= self._drop_row(node)
        for node in changes.nodes | changes.added_nodes:
            view = self._model.nodes.get(node)
            if view is not None and self._model.matches(view, self.filter):
                moved |= self._write_row(view, added)
            else:
                moved |= self._drop_row(node)
        self._add_rows(added)
        if moved:
            self.resort(keep=selected)

    def _ticked_rows(self) -> list[str]:
        """The rows whose state cell a tick refreshes.

        All of a small table; of a big one, the rows on screen and the next
        ``_TICK_CHUNK`` of the others in turn (each one within a few ticks).
        """
        if len(self._cells) <= _TICK_ALL_ROWS:
            return list(self._cells)
        first = max(0, int(self.scroll_offset.y))
        keys = (
            self._row_locations.get_key(i)
            for i in range(first, min(self.row_count, first + self.size.height))
        )
        on_screen = [str(key.value) for key in keys if key is not None]
        every = list(self._cells)
        start = self._tick_next % len(every)
        self._tick_next = start + _TICK_CHUNK
        return on_screen + every[start : start + _TICK_CHUNK]

    def tick(self, now: float) -> None:
        """Refresh what time alone changes (the state cell: ages, stale nodes), re-sort if needed."""
        self._now = now
        nodes = self._model.nodes
        for node in self._ticked_rows():
            cells = self._cells.get(node)
            view = nodes.get(node)
            if cells is None or view is None:
                continue
            state = presence_text(view.presence(now), view.age(now))
            if state != cells[1]:
                self._cells[node] = (cells[0], state, *cells[2:])
                self.update_cell(node, "state", state)
                if "state" in self._sort_cells:
                    self._order_dirty = True
        if self._order_dirty:
            self.resort(self.selected_node)

    def rebuild(self, now: float) -> None:
        """Show exactly the nodes that pass the filter (after it changed).

        Rows that still match stay as they are; new matches are added. Removing
        a DataTable row costs O(rows), so many removals become one clear.
        """
        self._now = now
        selected = self.selected_node if self._cells else None
        wanted = [v for v in self._model.nodes.values() if self._model.matches(v, self.filter)]
        wanted_ids = {v.node for v in wanted}
        gone = [node for node in self._cells if node not in wanted_ids]
        if len(gone) > _MAX_REMOVALS:
            self.clear()
            self._cells.clear()
        else:
            for node in gone:
                self._drop_row(node)
        added: list[tuple[str, tuple[str | Text, ...]]] = []
        for view in wanted:
            if view.node not in self._cells:
                self._write_row(view, added)
        self._add_rows(added)
        self.resort(keep=selected)

    def resort(self, keep: str | None) -> None:
        """Order rows by the sort column, then put the cursor on ``keep`` (the top row if it is gone)."""
        model, column, now = self._model, self.sort_column, self._now
        ranks = {
            node: rank
            for rank, node in enumerate(
                sorted(
                    self._cells,
                    key=lambda n: model.sort_key(model.nodes[n], column, now),
                    reverse=self.reverse,
                )
            )
        }
        self.sort("node", key=lambda cell: ranks.get(str(cell), len(ranks)))
        self._order_dirty = False
        if keep is not None and keep in self._cells:
            self.move_cursor(row=self.get_row_index(keep), scroll=False)
        elif self.row_count:
            self.move_cursor(row=0, scroll=False)

    def cycle_sort(self) -> SortColumn:
        """Sort by the next column; return it."""
        index = SORT_COLUMNS.index(self.sort_column)
        self.sort_column = SORT_COLUMNS[(index + 1) % len(SORT_COLUMNS)]
        self.resort(self.selected_node)
        return self.sort_column

    def toggle_reverse(self) -> None:
        """Reverse the sort order."""
        self.reverse = not self.reverse
        self.resort(self.selected_node)

    @property
    def sort_label(self) -> str:
        """The sort order in words, e.g. ``load (desc)``."""
        name = "last seen" if self.sort_column == "seen" else self.sort_column
        return f"{name}{' reversed' if self.reverse else ''}"

    @property
    def selected_node(self) -> str | None:
        """The node under the cursor, if any."""
        if not self.row_count:
            return None
        try:
            key: RowKey = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except CellDoesNotExist:
            return None
        return key.value

    @property
    def visible_nodes(self) -> list[str]:
        """Row keys in display order."""
        return [str(row.key.value) for row in self.ordered_rows]

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row opens that node."""
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Opened(event.row_key.value))
