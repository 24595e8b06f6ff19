"""The broker restarted in the middle of a rollout: it completes or rolls back cleanly (DESIGN 3.6).

Both brokers of ``restartable_broker``: mosquitto with persistence (retained
commands, snapshots and sessions survive) and the embedded amqtt, restarted as
a new broker on the same port (it keeps nothing). The hub, three agents and
the test's observer all reconnect by themselves. Whatever the moment of the
restart, the rollout must end ``succeeded`` or ``rolled_back`` with every node
wholly on the version that state says, nothing run twice, and nothing left
retained.
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

NODES = ["b1", "b2", "b3"]
OUTCOMES = frozenset({"succeeded", "rolled_back"})
TRIALS = trials(1, cap=10)


@pytest.mark.timeout(90 + 120 * TRIALS)
async def test_broker_restarted_mid_rollout(
    restartable_broker: RestartableBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    broker = restartable_broker
    fleet = make_fleet(broker.url, topics)
    outcomes: list[str] = []
    async with observing(broker.url, topics) as observer:
        await start_fleet(fleet, observer, NODES)
        version = "v0"
        for trial in range(TRIALS):
            await observer.online(NODES)  # after a restart, every node is back before the next rollout
            new = f"v{trial + 1}"
            # A short node timeout: what an amqtt restart loses (retained commands) ends as a
            # timed-out node and a coordinated rollback rather than a wait of half an hour.
            spec = parts_spec(f"update {new}", new, NODES, node_timeout_s=30)
            rollout = (await observer.ok("create_rollout", spec))["rollout"]
            await asyncio.sleep(rng.uniform(0.0, 2.5))
            await asyncio.to_thread(broker.stop)
            down = rng.uniform(0.2, 2.0)
            await asyncio.sleep(down)
            started = time.monotonic()
            await asyncio.to_thread(broker.start)
            state = await check_outcome(fleet, observer, rollout, NODES, OUTCOMES, version, new, timeout=120)
            _LOGGER.info(
                "%s trial %d: broker down %.1f s, rollout %s %.1f s after the restart",
                broker.kind, trial, down, state, time.monotonic() - started,
            )  # fmt: skip
            outcomes.append(state)
            if state == "succeeded":
                version = new
    _LOGGER.info("%s restarts: %s", broker.kind, outcomes)


@pytest.fixture(autouse=True)
def _log_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=__name__)
