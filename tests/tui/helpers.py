"""Shared bits of the TUI tests: a demo app on a list-backed feed, polling with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from textual.message import Message
from textual.notifications import Notify
from textual.pilot import Pilot

from bus.messages import Reply, Request
from tui.app import FleetApp, make_app
from tui.config import TuiConfig
from tui.demo import DEMO_NOW, demo_responder, demo_updates
from tui.feed import ListFeed, Responder
from tui.model import BusUpdate


def demo_app(
    updates: Sequence[BusUpdate] | None = None,
    responder: Responder | None = demo_responder,
    examples: Path = Path("no-examples-here"),
    batch_s: float = 0.0,
) -> tuple[FleetApp, ListFeed]:
    """The app on deterministic demo data with a fixed clock."""
    feed = ListFeed(demo_updates() if updates is None else updates, responder=responder)
    config = TuiConfig(broker="mqtt://127.0.0.1:1", utc=True, examples_dir=examples, batch_s=batch_s)
    return make_app(config, feed, clock=lambda: DEMO_NOW), feed


async def until(
    pilot: Pilot[None], predicate: Callable[[], object], what: str, timeout: float = 10.0
) -> None:
    """Let the app run until ``predicate()`` holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def notifications(seen: list[Message]) -> list[tuple[str, str]]:
    """(severity, message) of every notification the app raised."""
    return [(m.notification.severity, m.notification.message) for m in seen if isinstance(m, Notify)]


def ops(feed: ListFeed) -> list[tuple[str, dict[str, object]]]:
    """(op, body) of every request sent."""
    return [(r.op, r.body) for r in feed.requests]


def refuse(op: str, error: str) -> Responder:
    """A hub that refuses ``op`` with ``error`` and otherwise answers like the demo hub."""

    def respond(request: Request) -> Reply:
        if request.op == op:
            return Reply(request=request.id, ok=False, error=error)
        return demo_responder(request)

    return respond
