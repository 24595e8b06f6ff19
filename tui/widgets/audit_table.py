"""A rollout's audit trail from the hub's ``show`` reply: when, what, on what evidence."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from textual.widgets import DataTable

from tui.cells import clock_text, plain
from tui.model import AuditEntry

__all__ = ["AuditTable"]


def _evidence_text(evidence: Any) -> str:
    if evidence is None:
        return ""
    if isinstance(evidence, str):
        return evidence
    return json.dumps(evidence, sort_keys=True, separators=(",", ":"), default=str)[:500]


class AuditTable(DataTable[Any]):
    """Audit entries, oldest first; a placeholder row until the hub answered."""

    def __init__(self, *, utc: bool = False, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row")
        self._utc = utc
        self.entries: list[AuditEntry] | None = None

    def on_mount(self) -> None:
        """Create the columns."""
        self.add_column("Time", key="ts", width=19)
        self.add_column("Message", key="message", width=40)
        self.add_column("Evidence", key="evidence", width=60)
        self.show(self.entries)

    def show(self, entries: Sequence[AuditEntry] | None) -> None:
        """Replace the rows (an audit trail is read whole, on request)."""
        self.entries = None if entries is None else list(entries)
        if not self.columns:
            return
        self.clear()
        if entries is None:
            self.add_row("", "(asking the hub...)", "")
            return
        if not entries:
            self.add_row("", "(no audit entries)", "")
        for entry in entries:
            self.add_row(
                clock_text(entry.ts, self._utc), plain(entry.message), plain(_evidence_text(entry.evidence))
            )
