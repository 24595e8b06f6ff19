"""A half-open partition of one agent mid-job: ``lost`` for its grace, then as the failure policy says.

The agent ``p2`` reaches the broker only through a loopback TCP proxy of the
test's own. In the middle of its job the proxy freezes: it stops forwarding in
both directions without closing anything (no FIN, no RST), like a cable pulled
somewhere between two routers. The broker's keepalive check (1.5 x the
agent's 2 s) ends the connection and publishes the agent's last will; the hub
marks the node ``lost``, not failed (DESIGN 3.4, issue 15). The agent
meanwhile finishes its job alone, and its reconnects hang in the frozen proxy.

- Healed within ``offline_grace_s``: the agent reconnects, its job snapshot
  says it finished, and the rollout ends ``succeeded`` on both nodes.
- Healed after the grace: the node is a failure and the fleet rolls back; the
  coordinated rollback waits for the offline node's restore visibly ("rolling
  back: waiting for p2 (offline since ...) to restore, until ..."), up to
  ``restore_timeout_s``, then ends ``rollback_failed`` naming p2. Healed, the
  agent receives its retained abort and restores itself: the record is
  amended (audit), the rollout ``rolled_back``, both nodes on the old version.

Heartbeats are slowed to 5 s so that the hub's missed-heartbeat check (15 s)
cannot be what notices the partition: the last will does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bus.messages import RolloutSummary
from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.fault.conftest import FreezableProxy, Observer, check_outcome, observing

_LOGGER = logging.getLogger(__name__)

DIRECT, PARTED = "p1", "p2"
NODES = [DIRECT, PARTED]


def spec(**extra: Any) -> dict[str, Any]:
    return {
        "name": "update across a partition",
        "targets": NODES,
        "plan": [
            {"type": "script", "name": "part.sh", "args": ["a", "v1", "0.2"], "rollback": "part.sh"},
            {"type": "script", "name": "slow.sh", "args": ["4"], "rollback": "slow.sh"},
            {"type": "script", "name": "part.sh", "args": ["b", "v1", "0.2"], "rollback": "part.sh"},
        ],
        "node_timeout_s": 120,
        **extra,
    }


async def partition(observer: Observer, proxy: FreezableProxy, rollout: str) -> float:
    """Freeze the proxy mid-job; return once the hub shows PARTED lost (seconds it took)."""
    await observer.status(rollout, "running", index=1)  # both nodes are in their slow step
    proxy.freeze()
    frozen_at = time.monotonic()
    seen = len(observer.events)
    _, offline = await observer.wait(
        lambda: next(
            ((t, e) for t, e in observer.events[seen:] if e.kind == "node_offline" and e.node == PARTED), None
        ),
        f"{PARTED} offline at the hub",
    )
    assert "lost" in offline.message, offline  # the broker's keepalive and the last will

    def lost() -> RolloutSummary | None:
        summary = observer.summaries.get(rollout)
        return summary if summary is not None and summary.nodes[PARTED].phase == "lost" else None

    summary = await observer.wait(lost, f"{PARTED} lost in the summary")
    assert summary.state == "running", summary
    assert summary.counts.lost == 1, summary
    return time.monotonic() - frozen_at


async def start(fleet: Any, observer: Observer, proxy: FreezableProxy) -> None:
    fleet.start_hub()
    fleet.start_agent(DIRECT, heartbeat_s=5, keepalive_s=2)
    fleet.start_agent(PARTED, broker_url=proxy.url, heartbeat_s=5, keepalive_s=2)
    await observer.hub_ready(0)
    await observer.online(NODES)


async def test_a_partition_shorter_than_the_grace_is_not_a_failure(
    broker: RunningBroker, topics: Topics, make_fleet: Any, proxy_factory: Any
) -> None:
    proxy: FreezableProxy = await proxy_factory(broker.port)
    fleet = make_fleet(broker.url, topics)
    async with observing(broker.url, topics) as observer:
        await start(fleet, observer, proxy)
        rollout = (await observer.ok("create_rollout", spec(offline_grace_s=40)))["rollout"]
        detected = await partition(observer, proxy, rollout)
        assert fleet.agents[PARTED].alive()
        proxy.heal()
        healed_at = time.monotonic()
        await check_outcome(fleet, observer, rollout, NODES, frozenset({"succeeded"}), "v0", "v1")
        reconciled = time.monotonic() - healed_at
        assert proxy.connections >= 2  # the agent came back through the healed proxy
        kinds = [entry["kind"] for entry in (await observer.ok("show", {"rollout": rollout}))["audit"]]
        assert "node_lost" in kinds
        assert "node_back" in kinds
        assert "node_failed" not in kinds
    _LOGGER.info(
        "%s: partition noticed %.1f s after the freeze; succeeded %.1f s after healing",
        broker.kind, detected, reconciled,
    )  # fmt: skip


async def test_a_partition_longer_than_the_grace_rolls_back_and_the_restore_wait_shows(
    broker: RunningBroker, topics: Topics, make_fleet: Any, proxy_factory: Any
) -> None:
    proxy: FreezableProxy = await proxy_factory(broker.port)
    fleet = make_fleet(broker.url, topics)
    async with observing(broker.url, topics) as observer:
        await start(fleet, observer, proxy)
        created = await observer.ok("create_rollout", spec(offline_grace_s=3, restore_timeout_s=8))
        rollout = created["rollout"]
        await partition(observer, proxy, rollout)

        def waiting() -> RolloutSummary | None:
            summary = observer.summaries.get(rollout)
            detail = summary.detail if summary is not None else ""
            shown = detail.startswith(f"rolling back: waiting for {PARTED} (offline since ")
            return summary if shown else None

        summary = await observer.wait(waiting, "the visible restore wait")
        assert summary.state == "rolling_back", summary
        assert ") to restore, until " in summary.detail, summary
        assert "went offline mid-job" in summary.nodes[PARTED].detail, summary
        assert summary.counts.failed == 1, summary

        ended = await observer.final(rollout)
        assert ended.state == "rollback_failed", ended
        assert ended.detail.startswith(f"not restored: {PARTED} ("), ended
        assert "no restore within restore_timeout_s (8 s)" in ended.detail, ended
        assert ended.nodes[DIRECT].phase == "rolled_back", ended
        assert fleet.agents[PARTED].alive()

        # Healed, the agent takes its retained abort and restores itself: the record is amended.
        proxy.heal()

        def amended() -> RolloutSummary | None:
            summary = observer.summaries.get(rollout)
            return summary if summary is not None and summary.state == "rolled_back" else None

        await observer.wait(amended, "the amended record")
        await check_outcome(fleet, observer, rollout, NODES, frozenset({"rolled_back"}), "v0", "v1")
        audit = (await observer.ok("show", {"rollout": rollout}))["audit"]
        late = [entry for entry in audit if entry["kind"] == "late_restore"]
        assert late, audit
        assert late[0]["message"].startswith(f"{PARTED} restored after all (verified); record amended")
        assert any(entry["kind"] == "restore_wait" for entry in audit), audit


async def test_many_agents_lost_at_once_is_a_network_event_that_pauses_instead_of_failing(
    broker: RunningBroker, topics: Topics, make_fleet: Any, proxy_factory: Any
) -> None:
    # Three agents behind one proxy (a switch between them and the broker) lose it together:
    # more than half the running nodes lost within ~2 s is a network event, not 3 failures.
    proxy: FreezableProxy = await proxy_factory(broker.port)
    fleet = make_fleet(broker.url, topics)
    behind = ["m1", "m2", "m3"]
    async with observing(broker.url, topics) as observer:
        fleet.start_hub()
        for node in behind:
            fleet.start_agent(node, broker_url=proxy.url, heartbeat_s=1, keepalive_s=2)
        await observer.hub_ready(0)
        await observer.online(behind)
        body = {**spec(offline_grace_s=3), "targets": behind}
        rollout = (await observer.ok("create_rollout", body))["rollout"]
        await observer.status(rollout, "running", index=1)
        proxy.freeze()
        frozen_at = time.monotonic()

        def paused() -> RolloutSummary | None:
            summary = observer.summaries.get(rollout)
            return summary if summary is not None and "nodes lost at once" in summary.detail else None

        summary = await observer.wait(paused, "the network event")
        noticed = time.monotonic() - frozen_at
        assert summary.state == "running", summary
        # Well past the grace, nobody has failed: the rollout waits.
        await observer.wait(lambda: time.monotonic() - frozen_at > 12 or None, "12 s of partition")
        summary = observer.summaries[rollout]
        assert summary.state == "running", summary
        assert summary.counts.failed == 0, summary
        proxy.heal()
        await check_outcome(fleet, observer, rollout, behind, frozenset({"succeeded"}), "v0", "v1")
        audit = (await observer.ok("show", {"rollout": rollout}))["audit"]
        kinds = [entry["kind"] for entry in audit]
        assert "outage" in kinds, audit
        assert "node_failed" not in kinds, audit
        outage = next(entry for entry in audit if entry["kind"] == "outage")
        assert outage["message"].startswith("broker connection lost: "), outage
        assert outage["message"].endswith(" nodes lost at once; waiting"), outage
    _LOGGER.info("%s: 3 agents cut off at once: noticed as one event after %.1f s", broker.kind, noticed)
