from __future__ import annotations

import asyncio
import contextlib

import pytest
from textual.message import Message

from bus.errors import BusError
from bus.messages import (
    Event,
    Heartbeat,
    HubState,
    LogLine,
    NodeState,
    Reply,
    Request,
    RolloutNodes,
    RolloutSummary,
    encode,
)
from bus.topics import Topics
from hub.rollouts import changes_payloads
from tui.feed import ListFeed, parse_message, pump
from tui.messages import FeedBatch, FeedStatus
from tui.model import Cleared

T = Topics("fleet-t-unit/v1")


def test_parse_every_topic_the_tui_reads() -> None:
    birth = NodeState(node="n1", state="online", session="s", reason="birth")
    assert parse_message(T, T.node("n1", "state"), encode(birth)) == birth
    beat = Heartbeat(node="n1", session="s", seq=1, ts=1.0)
    assert parse_message(T, T.node("n1", "heartbeat"), encode(beat)) == beat
    line = LogLine(node="n1", command="c", rollout="r", index=0, line="hi", ts=1.0)
    assert parse_message(T, T.node("n1", "log"), encode(line)) == line
    summary = RolloutSummary(id="r1", name="x", state="running", created_at=1, updated_at=1)
    assert parse_message(T, T.rollout("r1"), encode(summary)) == summary
    (changes,) = changes_payloads(
        "r1", 7, 1.0, {"n1": ("failed", 1, "exit 1", True), "n2": ("pending", None, "", False)}
    )
    parsed = parse_message(T, T.rollout_nodes("r1"), changes)
    assert isinstance(parsed, RolloutNodes)
    assert parsed.model_dump() == {
        "v": 1,
        "rollout": "r1",
        "seq": 7,
        "ts": 1.0,
        "nodes": {
            "n1": {"phase": "failed", "step": 1, "detail": "exit 1"},
            "n2": {"phase": "pending", "step": None, "detail": ""},
        },
    }
    assert parse_message(T, T.rollout_nodes("r2"), changes) is None  # names another rollout
    hub = HubState(state="online", session="h")
    assert parse_message(T, T.hub_state, encode(hub)) == hub
    event = Event(ts=1.0, kind="k", message="m")
    assert parse_message(T, T.events, encode(event)) == event


def test_empty_retained_payloads_clear_nodes_and_rollouts() -> None:
    assert parse_message(T, T.node("n1", "state"), b"") == Cleared("node", "n1")
    assert parse_message(T, T.rollout("r1"), b"") == Cleared("rollout", "r1")
    assert parse_message(T, T.node("n1", "job"), b"") is None


def test_foreign_invalid_and_mismatched_messages_are_dropped() -> None:
    birth = encode(NodeState(node="n2", state="online", session="s", reason="birth"))
    assert parse_message(T, T.node("n1", "state"), birth) is None  # names another node
    assert parse_message(T, T.node("n1", "cmd"), b"{}") is None  # commands are not the TUI's
    assert parse_message(T, T.node("n1", "state"), b"{not json") is None
    assert parse_message(T, "other/v1/node/n1/state", birth) is None
    summary = encode(RolloutSummary(id="r2", name="x", state="running", created_at=1, updated_at=1))
    assert parse_message(T, T.rollout("r1"), summary) is None


async def test_list_feed_batches_what_arrives_within_the_window() -> None:
    updates = [Event(ts=float(i), kind="k", message=str(i)) for i in range(10)]
    feed = ListFeed(updates)
    await feed.start()
    first = await feed.next_batch(window=0.0, limit=4)
    assert [u.message for u in first] == ["0", "1", "2", "3"]  # type: ignore[union-attr]
    rest = await feed.next_batch(window=0.0)
    assert len(rest) == 6
    feed.push(updates[0])
    assert await feed.next_batch(window=0.01) == [updates[0]]


async def test_list_feed_records_requests_and_reports_a_silent_hub() -> None:
    def responder(request: Request) -> Reply | None:
        return None if request.op == "abort" else Reply(request=request.id, ok=True, body={"n": 1})

    feed = ListFeed(responder=responder)
    reply = await feed.call("list", {})
    assert reply.ok
    assert reply.body == {"n": 1}
    with pytest.raises(BusError, match="no reply"):
        await feed.call("abort", {"rollout": "r1"})
    assert [(r.op, r.body) for r in feed.requests] == [("list", {}), ("abort", {"rollout": "r1"})]


class _Unreachable(ListFeed):
    def __init__(self, failures: int) -> None:
        super().__init__([Event(ts=1.0, kind="k", message="up")])
        self.failures = failures

    async def start(self) -> None:
        if self.failures:
            self.failures -= 1
            raise BusError("no connection to mqtt://127.0.0.1:9 within 1 s")
        await super().start()


async def test_pump_reports_broker_trouble_retries_then_posts_batches() -> None:
    posted: list[Message] = []
    got_batch = asyncio.Event()

    def post(message: Message) -> bool:
        posted.append(message)
        if isinstance(message, FeedBatch):
            got_batch.set()
        return True

    task = asyncio.create_task(pump(_Unreachable(2), post, window=0.0, retry=(0.01, 0.02)))
    try:
        await asyncio.wait_for(got_batch.wait(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    statuses = [(m.connected, m.reason) for m in posted if isinstance(m, FeedStatus)]
    assert statuses[:2] == [(False, "no connection to mqtt://127.0.0.1:9 within 1 s")] * 2
    assert statuses[2] == (True, "")
    batch = next(m for m in posted if isinstance(m, FeedBatch))
    assert [u.message for u in batch.updates] == ["up"]  # type: ignore[union-attr]
