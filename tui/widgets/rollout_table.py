"""The rollout list: name, state, a progress bar and counts, newest first."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

from tui.cells import clock_text, counts_text, plain, progress_text, rollout_state_text
from tui.model import Changes, FleetModel, RolloutView

__all__ = ["RolloutTable"]

#: (key, header, width): what tells rollouts apart (name, id, creation time) fits 80 columns
#: with state and progress; the id cell holds the full id, shown cut to its first 8 characters.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("name", "Name", 18),
    ("id", "Id", 8),
    ("state", "State", 15),
    ("progress", "Progress", 16),
    ("created", "Created", 11),
    ("wave", "Wave", 5),
    ("counts", "Counts", 34),
)
_KEYS = tuple(key for key, _, _ in COLUMNS)


class RolloutTable(DataTable[Any]):
    """Every rollout the hub published, newest first, updated in place."""

    class Opened(Message):
        """The operator chose a rollout (Enter)."""

        def __init__(self, rollout: str) -> None:
            super().__init__()
            self.rollout = rollout

    def __init__(self, model: FleetModel, *, utc: bool = False, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._model = model
        self._utc = utc
        self._cells: dict[str, tuple[str | Text, ...]] = {}

    def on_mount(self) -> None:
        """Create the columns and fill them."""
        for key, header, width in COLUMNS:
            self.add_column(header, key=key, width=width)
        self.sync(Changes(rollouts=set(self._model.rollouts)))

    def _render_row(self, view: RolloutView) -> tuple[str | Text, ...]:
        summary = view.summary
        assert summary is not None  # noqa: S101 - only rollouts with a summary are listed
        done, total = view.progress()
        wave = f"{summary.wave}/{summary.waves}" if summary.waves else "-"
        return (
            plain(summary.name),
            summary.id,
            rollout_state_text(summary.state),
            progress_text(done, total),
            clock_text(summary.created_at, self._utc)[5:16],  # MM-DD HH:MM
            wave,
            counts_text(summary.counts),
        )

    def sync(self, changes: Changes) -> None:
        """Bring changed rollouts up to date; new ones go to the top."""
        added = False
        selected = self.selected_rollout if self._cells else None
        # On the newest row the operator watches "the latest": a newer rollout takes the cursor.
        # Anywhere else the cursor stays on the rollout it is on.
        follow_newest = self.cursor_row == 0
        for rollout in changes.removed_rollouts:
            if self._cells.pop(rollout, None) is not None:
                self.remove_row(rollout)
        for rollout in changes.rollouts:
            view = self._model.rollouts.get(rollout)
            if view is None or view.summary is None:
                continue
            new = self._render_row(view)
            old = self._cells.get(rollout)
            self._cells[rollout] = new
            if old is None:
                self.add_row(*new, key=rollout)
                added = True
                continue
            for index, (before, after) in enumerate(zip(old, new, strict=True)):
                if before != after:
                    self.update_cell(rollout, _KEYS[index], after)
        if added:
            order = {view.id: rank for rank, view in enumerate(self._model.rollouts_newest_first())}
            self.sort("id", key=lambda cell: order.get(str(cell), len(order)))
            if follow_newest:
                self.move_cursor(row=0, scroll=False)
            elif selected is not None and selected in self._cells:
                self.move_cursor(row=self.get_row_index(selected), scroll=False)

    @property
    def selected_rollout(self) -> str | None:
        """The rollout under the cursor, if any."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except CellDoesNotExist:
            return None

    @property
    def visible_rollouts(self) -> list[str]:
        """Row keys in display order."""
        return [str(row.key.value) for row in self.ordered_rows]

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row opens that rollout."""
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Opened(event.row_key.value))
