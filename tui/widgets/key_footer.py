"""The key footer, drawn whether or not the app has the input focus (``fleet tui --serve``)."""

from __future__ import annotations

from textual.screen import Screen
from textual.widgets import Footer

__all__ = ["KeyFooter"]


class KeyFooter(Footer):
    """Textual's footer skips drawing its keys while the app is blurred.

    A browser page (textual-serve's web driver) starts blurred, so the footer stayed
    blank until the operator clicked into the page: draw the keys regardless.
    """

    def bindings_changed(self, screen: Screen[object]) -> None:
        """Redraw the keys of ``screen`` when they change, focused or not."""
        self._bindings_ready = True
        if self.is_attached and screen is self.screen:
            self.call_after_refresh(self.recompose)
