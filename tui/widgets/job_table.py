"""A node's recent jobs (commands): rollout, action, phase, step states."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from tui.cells import phase_text, plain, step_text, time_text
from tui.model import FleetModel, NodeView

__all__ = ["JobTable"]


class JobTable(DataTable[Any]):
    """Newest job first; steps as their grid words."""

    def __init__(self, model: FleetModel, *, utc: bool = False, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._model = model
        self._utc = utc
        self._rows: list[tuple[str, tuple[str | Text, ...]]] | None = None

    def on_mount(self) -> None:
        """Create the columns."""
        self.add_column("Updated", key="updated", width=8)
        self.add_column("Rollout", key="rollout", width=14)
        self.add_column("Action", key="action", width=6)
        self.add_column("Phase", key="phase", width=10)
        self.add_column("Steps", key="steps", width=32)

    def show(self, view: NodeView) -> None:
        """Rebuild from ``view``'s jobs when they changed (ten at most, so a rebuild is cheap)."""
        rows: list[tuple[str, tuple[str | Text, ...]]] = []
        for job in reversed(view.jobs.values()):
            rollout = self._model.rollouts.get(job.rollout)
            steps = Text(" ").join(step_text(job.steps[i].state) for i in sorted(job.steps))
            cells: tuple[str | Text, ...] = (
                time_text(job.updated_at, self._utc) if job.updated_at else "-",
                plain(rollout.name if rollout else job.rollout),
                plain(job.action),
                phase_text(job.phase),
                steps,
            )
            rows.append((job.command, cells))
        if rows == self._rows:
            return
        self._rows = rows
        self.clear()
        for command, cells in rows:
            self.add_row(*cells, key=command)
        if not self.row_count:
            self.add_row("", "(no jobs seen)", "", "", "")
