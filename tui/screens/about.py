"""Help and connection details: the keys, the broker, and the hub's HTTP bridge (URL and token)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

__all__ = ["AboutScreen", "read_http_info"]

_KEYS = """Keys
  f fleet   o rollouts   n new rollout   / filter   s sort   Enter open
  a abort   b rollback   p pause   u resume (each asks first)   esc back
  ctrl+t the hub's plan of a spec   ctrl+s create   q or ctrl+c quit"""
#: Longest info file read (it holds two short lines).
_MAX_INFO_BYTES = 4096


def read_http_info(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of the HTTP info file ``fleet demo`` writes. Call through asyncio.to_thread.

    Returns an empty dict when the file is missing or unreadable.
    """
    try:
        with path.open("rb") as handle:
            text = handle.read(_MAX_INFO_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.isidentifier():
            info[key] = value.strip().strip("'\"")
    return info


def about_text(broker: str, prefix: str, info_file: Path | None, info: Mapping[str, str]) -> str:
    """What the about screen says (pure, for tests)."""
    lines = [f"Broker  {broker}   prefix {prefix}", ""]
    url, token = info.get("FLEET_HTTP_URL"), info.get("FLEET_HTTP_TOKEN")
    if url:
        lines += [
            "HTTP bridge",
            f"  URL    {url}   (API docs: {url}/docs)",
            f"  token  {token or '(none)'}",
            f"  both are in {info_file} (mode 600); in a shell:",
            f"    . {info_file}",
            '    curl -H "Authorization: Bearer $FLEET_HTTP_TOKEN" \\',
            '      "$FLEET_HTTP_URL/api/nodes"',
            "",
        ]
    elif info_file is not None:
        lines += [f"HTTP bridge: {info_file} not found or unreadable", ""]
    lines.append(_KEYS)
    return "\n".join(lines)


class AboutScreen(ModalScreen[None]):
    """Keys, broker and HTTP bridge; any of esc, ?, q closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss_screen", "Close"),
        Binding("question_mark", "dismiss_screen", "Close", show=False),
        Binding("q", "dismiss_screen", "Close", show=False),
    ]

    def __init__(self, broker: str, prefix: str, info_file: Path | None) -> None:
        super().__init__()
        self.broker = broker
        self.prefix = prefix
        self.info_file = info_file

    def compose(self) -> ComposeResult:
        """One scrollable text box."""
        with VerticalScroll(id="about-box"):
            yield Static(about_text(self.broker, self.prefix, None, {}), id="about-text", markup=False)

    async def on_mount(self) -> None:
        """Read the HTTP info file (off the event loop) and show it."""
        info = {} if self.info_file is None else await asyncio.to_thread(read_http_info, self.info_file)
        self.query_one("#about-text", Static).update(
            about_text(self.broker, self.prefix, self.info_file, info)
        )

    def action_dismiss_screen(self) -> None:
        """Close."""
        self.dismiss(None)
