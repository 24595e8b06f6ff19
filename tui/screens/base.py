"""The screen base class: what the app calls when the model moved or time passed."""

from __future__ import annotations

from textual.screen import Screen

from tui.context import Context
from tui.model import Changes

__all__ = ["ModelScreen"]


class ModelScreen(Screen[None]):
    """A screen that shows part of the fleet model."""

    def __init__(self, ctx: Context, *, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.ctx = ctx

    def model_changed(self, changes: Changes) -> None:
        """Update what ``changes`` touched; called once per feed batch."""

    def tick(self) -> None:
        """Refresh what time alone changes (ages); called every second."""
