"""The broker restarted in the middle of a rollout is a transient fault: the rollout succeeds (issue 15).

Both brokers of ``restartable_broker``: mosquitto with persistence (retained
commands, snapshots and sessions survive) and the embedded amqtt, restarted as
a new broker on the same port (it keeps nothing). The hub, four agents and
the test's observer all reconnect by themselves. The hub sees its own
connection drop and every node's will (a broker publishes the wills of its
clients when it stops): a broker event, not node failures (DESIGN 3.4). The
agents carry on from their journals while the broker is away and report when
they are back; the hub publishes an open command again to a node that
reconnects (amqtt lost it). Whatever the moment of the restart, the rollout
must end ``succeeded`` with every node on the new version, no step run twice,
and nothing left retained.

``FLEET_FAULT_TRIALS=N`` runs N seeded trials per broker (default 1).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RestartableBroker
from tests.fault.conftest import check_outcome, observing, parts_spec, start_fleet, trials

_LOGGER = logging.getLogger(__name__)

NODES = ["b1", "b2", "b3", "b4"]
OUTCOMES = frozenset({"succeeded"})
TRIALS = trials(1, cap=50)


@pytest.mark.timeout(90 + 120 * TRIALS)
async def test_broker_restarted_mid_rollout_succeeds(
    restartable_broker: RestartableBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    broker = restartable_broker
    fleet = make_fleet(broker.url, topics)
    outcomes: list[str] = []
    midway = 0  # trials whose rollout was still running when the broker stopped
    events = 0  # trials whose audit says the hub took it as a broker event
    async with observing(broker.url, topics) as observer:
        await start_fleet(fleet, observer, NODES)
        version = "v0"
        for trial in range(TRIALS):
            await observer.online(NODES)  # after a restart, every node is back before the next rollout
            new = f"v{trial + 1}"
            # Each part takes 1 s: a restart 0.2-2 s after the start lands mid-job.
            spec = parts_spec(f"update {new}", new, NODES, pause="1.0", strategy={"waves": ["100%"]})
            rollout = (await observer.ok("create_rollout", spec))["rollout"]
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            summary = observer.summaries.get(rollout)
            midway += summary is None or summary.state == "running"
            await asyncio.to_thread(broker.stop)
            down = rng.uniform(0.2, 2.0)
            await asyncio.sleep(down)
            started = time.monotonic()
            await asyncio.to_thread(broker.start)
            state = await check_outcome(fleet, observer, rollout, NODES, OUTCOMES, version, new, timeout=120)
            audit = (await observer.ok("show", {"rollout": rollout}))["audit"]
            kinds = {entry["kind"] for entry in audit}
            assert "node_failed" not in kinds, audit  # a broker event, never a node failure
            events += "outage" in kinds
            _LOGGER.info(
                "%s trial %d: broker down %.1f s, rollout %s %.1f s after the restart",
                broker.kind, trial, down, state, time.monotonic() - started,
            )  # fmt: skip
            outcomes.append(state)
            version = new
    _LOGGER.info(
        "%s restarts: %d trials (%d stopped mid-rollout, %d audited as a broker event): %s",
        broker.kind, len(outcomes), midway, events, outcomes,
    )  # fmt: skip
