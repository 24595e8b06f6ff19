"""A half-open partition of one agent mid-job: detected by keepalive, a failure, reconciled on healing.

The agent ``p2`` reaches the broker only through a loopback TCP proxy of the
test's own. In the middle of its job the proxy freezes: it stops forwarding in
both directions without closing anything (no FIN, no RST), like a cable pulled
somewhere between two routers. The broker's keepalive check (1.5 x the
agent's 2 s) ends the connection and publishes the agent's last will; the hub
counts the node as failed ("went offline mid-job") and rolls the fleet back.
The agent meanwhile finishes its job alone, its own keepalive fails, and its
reconnects hang in the frozen proxy. When the proxy heals, the agent
reconnects, receives the retained abort and restores itself: the rollout ends
``rolled_back`` with both nodes on the old version.

Heartbeats are slowed to 5 s so that the hub's missed-heartbeat check (15 s)
cannot be what notices the partition: the last will does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from bus.messages import RolloutSummary
from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.fault.conftest import FreezableProxy, check_outcome, observing

_LOGGER = logging.getLogger(__name__)

DIRECT, PARTED = "p1", "p2"
NODES = [DIRECT, PARTED]


def spec() -> dict[str, Any]:
    return {
        "name": "update across a partition",
        "targets": NODES,
        "plan": [
            {"type": "script", "name": "part.sh", "args": ["a", "v1", "0.2"], "rollback": "part.sh"},
            {"type": "script", "name": "slow.sh", "args": ["4"], "rollback": "slow.sh"},
            {"type": "script", "name": "part.sh", "args": ["b", "v1", "0.2"], "rollback": "part.sh"},
        ],
        "node_timeout_s": 120,
    }


async def test_half_open_partition_of_one_agent(
    broker: RunningBroker, topics: Topics, make_fleet: Any, proxy_factory: Any
) -> None:
    proxy: FreezableProxy = await proxy_factory(broker.port)
    fleet = make_fleet(broker.url, topics)
    async with observing(broker.url, topics) as observer:
        fleet.start_hub()
        fleet.start_agent(DIRECT, heartbeat_s=5, keepalive_s=2)
        fleet.start_agent(PARTED, broker_url=proxy.url, heartbeat_s=5, keepalive_s=2)
        await observer.hub_ready(0)
        await observer.online(NODES)
        rollout = (await observer.ok("create_rollout", spec()))["rollout"]
        await observer.status(rollout, "running", index=1)  # both nodes are in their slow step

        proxy.freeze()
        frozen_at = time.monotonic()
        seen = len(observer.events)
        at, offline = await observer.wait(
            lambda: next(
                ((t, e) for t, e in observer.events[seen:] if e.kind == "node_offline" and e.node == PARTED),
                None,
            ),
            f"{PARTED} offline at the hub",
        )
        detected = at - frozen_at
        assert "lost" in offline.message, offline  # the broker's keepalive and the last will

        def rolling_back() -> RolloutSummary | None:
            summary = observer.summaries.get(rollout)
            return summary if summary is not None and summary.state == "rolling_back" else None

        summary = await observer.wait(rolling_back, "the coordinated rollback")
        assert summary.nodes[PARTED].phase == "offline", summary
        assert "went offline mid-job" in summary.nodes[PARTED].detail, summary
        assert fleet.agents[PARTED].alive()

        proxy.heal()
        healed_at = time.monotonic()
        await check_outcome(fleet, observer, rollout, NODES, frozenset({"rolled_back"}), "v0", "v1")
        reconciled = time.monotonic() - healed_at
        assert proxy.connections >= 2  # the agent came back through the healed proxy
    _LOGGER.info(
        "%s: partition noticed by the hub %.1f s after the freeze; reconciled %.1f s after healing",
        broker.kind, detected, reconciled,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _log_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=__name__)
