"""The tail of one node's step output (``log`` topic), appended as lines arrive."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import Log

from bus.messages import LogLine
from tui.cells import time_text
from tui.model import NodeView

__all__ = ["LogTail"]


class LogTail(Log):
    """Shows one node's log lines (optionally of one rollout only), newest at the bottom."""

    def __init__(self, *, utc: bool = False, id: str | None = None) -> None:
        super().__init__(max_lines=1000, auto_scroll=True, id=id)
        self._utc = utc
        self.node: str | None = None
        self.rollout: str | None = None
        self._shown_total = 0
        self.shown: list[str] = []

    def _format(self, line: LogLine) -> str:
        stream = "" if line.stream == "stdout" else f" {line.stream}"
        return f"{time_text(line.ts, self._utc)} #{line.index + 1}{stream} {line.line}"

    def _write(self, lines: Iterable[LogLine]) -> None:
        texts = [self._format(line) for line in lines if self.rollout in (None, line.rollout)]
        if texts:
            self.shown.extend(texts)
            del self.shown[: -self.max_lines if self.max_lines else 0]
            self.write_lines(texts)

    def follow(self, view: NodeView | None, rollout: str | None = None) -> None:
        """Show ``view``'s lines (of ``rollout`` only, when given) from the start."""
        self.clear()
        self.shown = []
        self.node = view.node if view else None
        self.rollout = rollout
        self._shown_total = view.log_total if view else 0
        if view is not None:
            self._write(view.log)

    def catch_up(self, view: NodeView) -> None:
        """Append the lines ``view`` received since the last call."""
        if view.node != self.node:
            return
        fresh = min(view.log_total - self._shown_total, len(view.log))
        self._shown_total = view.log_total
        if fresh > 0:
            self._write(list(view.log)[-fresh:])
