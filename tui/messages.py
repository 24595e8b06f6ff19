"""Textual messages that carry bus traffic and hub replies into the app."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from bus.messages import Reply
from tui.model import BusUpdate

__all__ = ["FeedBatch", "FeedStatus", "RequestDone"]


class FeedBatch(Message):
    """Updates that arrived within one feed interval, in arrival order."""

    def __init__(self, updates: list[BusUpdate]) -> None:
        super().__init__()
        self.updates = updates


class FeedStatus(Message):
    """The feed connected, or failed to (``reason`` says why)."""

    def __init__(self, connected: bool, reason: str) -> None:
        super().__init__()
        self.connected = connected
        self.reason = reason


class RequestDone(Message):
    """A hub request finished; ``reply`` is None when it could not be sent or timed out."""

    def __init__(self, op: str, body: dict[str, Any], reply: Reply | None) -> None:
        super().__init__()
        self.op = op
        self.body = body
        self.reply = reply

    @property
    def ok(self) -> bool:
        """True when the hub accepted the request."""
        return self.reply is not None and self.reply.ok
