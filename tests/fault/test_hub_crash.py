"""The hub killed -9 at seeded random moments of a rollout and of a coordinated rollback (DESIGN 3.6).

Three real agents update two "parts" of their node one step at a time
(``part.sh``, which records every run), so a node left between two versions
shows. Each trial creates a rollout, kills the hub at a random moment, starts
it again on the same database and checks that the rollout ends in the state
it would have reached without the crash (the restarted hub says so too), that
every node is wholly on the old or wholly on the new version, that no step ran
twice, and that no command stays retained on the broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.fault.conftest import Fleet, Observer, check_outcome, observing, parts_spec, start_fleet, trials

_LOGGER = logging.getLogger(__name__)

NODES = ["n1", "n2", "n3"]
TRIALS = trials(3)


async def crash_and_restart(fleet: Fleet, observer: Observer) -> None:
    assert fleet.hub is not None
    births = observer.hub_births
    fleet.hub.kill()
    fleet.start_hub()
    await observer.hub_ready(births)


@pytest.mark.timeout(60 + 60 * TRIALS)
async def test_hub_killed_at_random_moments_of_a_rollout(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    async with observing(amqtt_broker.url, topics) as observer:
        await start_fleet(fleet, observer, NODES)
        version = "v0"
        mid_flight = 0
        for trial in range(TRIALS):
            new = f"v{trial + 1}"
            body = await observer.ok("create_rollout", parts_spec(f"update {new}", new, NODES))
            rollout = body["rollout"]
            await asyncio.sleep(rng.uniform(0.0, 3.0))  # the wave of 1, then 2 nodes: about 2-3 s
            summary = observer.summaries.get(rollout)
            mid_flight += summary is None or summary.state not in ("succeeded",)
            started = time.monotonic()
            await crash_and_restart(fleet, observer)
            await check_outcome(fleet, observer, rollout, NODES, frozenset({"succeeded"}), version, new)
            _LOGGER.info("trial %d: recovered in %.1f s", trial, time.monotonic() - started)
            version = new
        _LOGGER.info("hub kills mid-rollout: %d of %d trials", mid_flight, TRIALS)


@pytest.mark.timeout(60 + 60 * TRIALS)
async def test_hub_killed_at_random_moments_of_a_coordinated_rollback(
    mosquitto_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(mosquitto_broker.url, topics)
    async with observing(mosquitto_broker.url, topics) as observer:
        await start_fleet(fleet, observer, NODES)
        mid_flight = 0
        for trial in range(TRIALS):
            # The broken node is in the last wave: the first wave's node is rolled back by the hub.
            marker = fleet.state_dir(NODES[-1]) / "broken"
            marker.write_text("")
            new = f"bad{trial}"
            seen = len(observer.statuses)
            body = await observer.ok("create_rollout", parts_spec(f"bad update {trial}", new, NODES))
            rollout = body["rollout"]
            await observer.status(rollout, "failed", after=seen)  # the broken node's gate
            await asyncio.sleep(rng.uniform(0.0, 1.0))  # the rollback of 2 nodes: about 1 s
            summary = observer.summaries.get(rollout)
            mid_flight += summary is None or summary.state != "rolled_back"
            await crash_and_restart(fleet, observer)
            await check_outcome(fleet, observer, rollout, NODES, frozenset({"rolled_back"}), "v0", new)
            marker.unlink()
        _LOGGER.info("hub kills mid-rollback: %d of %d trials", mid_flight, TRIALS)


@pytest.mark.timeout(120)
async def test_an_answer_the_broker_lost_while_the_hub_was_down_is_asked_for_again(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any
) -> None:
    """A broker can lose a retained job snapshot it acknowledged (a NATS cluster electing new
    leaders after a server died). The hub, back, sends the awaited command again; the node
    runs nothing twice and answers with its snapshot, and the rollout succeeds rather than
    waiting out its node timeout and rolling back."""
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    async with observing(amqtt_broker.url, topics) as observer:
        await start_fleet(fleet, observer, ["n1"])
        spec = parts_spec("update v1", "v1", ["n1"], pause="1", node_timeout_s=40)
        rollout = (await observer.ok("create_rollout", spec))["rollout"]
        await observer.status(rollout, "running", index=0)
        assert fleet.hub is not None
        fleet.hub.kill()
        await observer.job_end("n1", rollout)
        # The broker loses the answer: the job's retained snapshot is gone.
        job = topics.node("n1", "job")
        await observer.client.publish(job, b"", qos=1, retain=True, wait=True)
        births = observer.hub_births
        fleet.start_hub()
        await observer.hub_ready(births)
        await check_outcome(fleet, observer, rollout, ["n1"], frozenset({"succeeded"}), "v0", "v1")
        agent = next(p for p in fleet.procs if p.name == "n1")
        assert "sent again: its latest snapshot published again" in agent.log(), fleet.logs()
