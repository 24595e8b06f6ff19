"""The TUI against a real broker: retained state shows up, requests reach a (test) hub."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from textual.message import Message

from bus.messages import (
    Heartbeat,
    NodeState,
    NodeSummary,
    Reply,
    Request,
    RolloutCounts,
    RolloutSummary,
    decode,
    encode,
)
from bus.mqtt import MqttClient
from bus.topics import Topics
from tests.conftest import RunningBroker, free_port
from tests.tui.helpers import notifications, until
from tui.app import make_app
from tui.config import TuiConfig
from tui.feed import MqttFeed
from tui.messages import RequestDone
from tui.screens.rollout import RolloutScreen
from tui.widgets.audit_table import AuditTable
from tui.widgets.node_table import NodeTable

pytestmark = pytest.mark.broker

NOW = 1714564800.0


def _summary() -> RolloutSummary:
    return RolloutSummary(
        id="r-broker",
        name="agent-0.2",
        state="running",
        created_at=NOW,
        updated_at=NOW,
        counts=RolloutCounts(running=1, pending=1),
        nodes={"n-1": NodeSummary(phase="applying", step=0), "n-2": NodeSummary(phase="pending")},
        wave=1,
        waves=2,
    )


async def _fake_hub(client: MqttClient, topics: Topics, requests: list[Request]) -> None:
    """Answer every request like a hub: ``show`` with an audit trail, anything else ok."""
    async for message in client.messages():
        if message.topic != topics.hub_request:
            continue
        request = decode(Request, message.payload)
        requests.append(request)
        body: object = {}
        if request.op == "show":
            body = {
                **_summary().model_dump(mode="json"),
                "audit": [{"ts": NOW, "message": "created", "evidence": {"by": "test"}}],
            }
        reply = Reply(request=request.id, ok=True, body=body)
        await client.publish(topics.parse_reply_to(request.reply_to), encode(reply), qos=1)


async def test_retained_state_appears_and_requests_reach_the_hub(
    amqtt_broker: RunningBroker, topics: Topics
) -> None:
    url = amqtt_broker.url
    requests: list[Request] = []
    agents_client = MqttClient(url, client_id=f"test-agents-{topics.prefix[7:17]}")
    hub_client = MqttClient(url, client_id=f"test-hub-{topics.prefix[7:17]}")
    async with agents_client as agents, hub_client as hub:
        await hub.subscribe(topics.hub_request, qos=1)
        for i in (1, 2, 3):
            birth = NodeState(
                node=f"n-{i}",
                state="online",
                session=f"s{i}",
                reason="birth",
                labels={"site": "lab"},
                heartbeat_s=5.0,
            )
            await agents.publish(topics.node(f"n-{i}", "state"), encode(birth), qos=1, retain=True, wait=True)
        await agents.publish(topics.rollout("r-broker"), encode(_summary()), qos=1, retain=True, wait=True)
        hub_task = asyncio.create_task(_fake_hub(hub, topics, requests))
        app = make_app(TuiConfig(broker=url, prefix=topics.prefix, utc=True), MqttFeed(url, topics))
        seen: list[Message] = []
        try:
            async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
                table = app.screen.query_one(NodeTable)
                await until(pilot, lambda: table.row_count == 3, "3 retained nodes", timeout=20)
                await until(pilot, lambda: "r-broker" in app.model.rollouts, "the rollout", timeout=20)
                assert str(table.get_cell("n-2", "state")) == "online 0s"
                # Live, not retained: a heartbeat published now reaches the table.
                beat = Heartbeat(node="n-2", session="s2", seq=1, ts=NOW, load1=3.25)
                await agents.publish(topics.node("n-2", "heartbeat"), encode(beat), qos=0)
                await until(
                    pilot, lambda: str(table.get_cell("n-2", "load")) == "3.25", "the heartbeat", timeout=20
                )
                # A request goes out on hub/request and the reply comes back.
                await pilot.press("o", "enter")
                await until(pilot, lambda: isinstance(app.screen, RolloutScreen), "the rollout screen")
                audit = app.screen.query_one(AuditTable)
                await until(pilot, lambda: audit.entries is not None, "the audit trail", timeout=20)
                assert [e.message for e in audit.entries or []] == ["created"]
                await pilot.press("p")
                await until(
                    pilot,
                    lambda: any(isinstance(m, RequestDone) and m.op == "pause" for m in seen),
                    "the pause reply",
                    timeout=20,
                )
                assert [(r.op, r.body) for r in requests] == [
                    ("show", {"rollout": "r-broker"}),
                    ("pause", {"rollout": "r-broker"}),
                ]
                assert requests[0].reply_to == app.feed._hub.reply_topic  # type: ignore[attr-defined]
                assert ("information", "agent-0.2: paused") in notifications(seen)
                # A will clears the node's online state.
                will = NodeState(node="n-3", state="offline", session="s3", reason="lost")
                await agents.publish(topics.node("n-3", "state"), encode(will), qos=1, retain=True)
                await pilot.press("f")
                await until(
                    pilot,
                    lambda: str(table.get_cell("n-3", "state")).startswith("offline"),
                    "n-3 offline",
                    timeout=20,
                )
        finally:
            hub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub_task


async def test_an_unreachable_broker_is_a_notification_not_a_crash() -> None:
    url = f"mqtt://fleet:secret@127.0.0.1:{free_port()}"
    feed = MqttFeed(url, Topics("fleet-t-nobroker/v1"), connect_timeout=0.5)
    app = make_app(TuiConfig(broker=url), feed)
    seen: list[Message] = []
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await until(pilot, lambda: notifications(seen), "a broker notification", timeout=20)
        severity, text = notifications(seen)[0]
        assert severity == "error"
        assert "no connection to mqtt://fleet:***@127.0.0.1" in text
        assert "NOT CONNECTED" in app.sub_title
        await pilot.press("q")
    assert "secret" not in repr(notifications(seen))


async def test_quitting_while_still_connecting_leaves_no_client_behind() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    feed = MqttFeed(url, Topics("fleet-t-nobroker/v1"), connect_timeout=30)
    app = make_app(TuiConfig(broker=url), feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)  # the feed worker is inside MqttClient.start, retrying
        await pilot.press("q")
    await asyncio.sleep(0)
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("mqtt-")]
    assert left == []
