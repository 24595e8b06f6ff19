"""Textual messages that carry bus traffic and hub replies into the app."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from bus.messages import Reply, RequestOp
from tui.model import BusUpdate

__all__ = ["FeedBatch", "FeedStatus", "HubRequest", "RequestDone"]


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


class HubRequest(Message):
    """A screen asks the app to send one hub request (DESIGN section 2 ``Request``)."""

    def __init__(self, op: RequestOp, body: dict[str, Any]) -> None:
        super().__init__()
        self.op: RequestOp = op
        self.body = body


class RequestDone(Message):
    """A hub request finished; ``reply`` is None when it could not be sent or timed out."""

    def __init__(self, op: RequestOp, body: dict[str, Any], reply: Reply | None) -> None:
        super().__init__()
        self.op: RequestOp = op
        self.body = body
        self.reply = reply

    @property
    def ok(self) -> bool:
        """True when the hub accepted the request."""
        return self.reply is not None and self.reply.ok
