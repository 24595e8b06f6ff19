"""What a node reports it runs: services, packages, drivers and OS, with versions."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable

from bus.messages import Inventory
from tui.cells import plain

__all__ = ["InventoryTable"]


class InventoryTable(DataTable[Any]):
    """One row per inventory item: kind, name, version."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._shown: Inventory | None = None

    def on_mount(self) -> None:
        """Create the columns."""
        self.add_column("Kind", key="kind", width=7)
        self.add_column("Name", key="name", width=14)
        self.add_column("Version", key="version", width=14)

    def show(self, inventory: Inventory) -> None:
        """Show ``inventory``; does nothing when it did not change."""
        if inventory == self._shown:
            return
        self._shown = inventory
        self.clear()
        for kind, group in (
            ("service", inventory.services),
            ("package", inventory.packages),
            ("driver", inventory.drivers),
            ("os", inventory.os),
        ):
            for name, version in sorted(group.items()):
                self.add_row(kind, plain(name), plain(version))
        if not self.row_count:
            self.add_row("", "(nothing reported)", "")
