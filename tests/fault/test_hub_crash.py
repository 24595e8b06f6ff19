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
from collections import Counter
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.fault.conftest import Fleet, Observer, observing, trials

_LOGGER = logging.getLogger(__name__)

NODES = ["n1", "n2", "n3"]
PAUSE = "0.3"  # seconds each part takes to change (and to change back)


def spec(name: str, version: str) -> dict[str, Any]:
    return {
        "name": name,
        "targets": NODES,
        "plan": [
            {"type": "script", "name": "part.sh", "args": ["a", version, PAUSE], "rollback": "part.sh"},
            {"type": "script", "name": "part.sh", "args": ["b", version, PAUSE], "rollback": "part.sh"},
            {"type": "script", "name": "gate.sh", "args": ["0.1"]},
        ],
        "strategy": {"waves": [1, "100%"]},
        "node_timeout_s": 120,
    }


async def start(fleet: Fleet, observer: Observer) -> None:
    births = observer.hub_births
    fleet.start_hub()
    for node in NODES:
        fleet.start_agent(node)
    await observer.hub_ready(births)
    await observer.online(NODES)


async def crash_and_restart(fleet: Fleet, observer: Observer) -> None:
    assert fleet.hub is not None
    births = observer.hub_births
    fleet.hub.kill()
    fleet.start_hub()
    await observer.hub_ready(births)


async def check_outcome(
    fleet: Fleet, observer: Observer, rollout: str, expected: str, old: str, new: str
) -> None:
    """The promise: the expected final state, known to the hub; no node mixed; nothing run twice."""
    context = f"rollout {rollout}\n{fleet.logs()}"
    summary = await observer.final(rollout)
    shown = await observer.ok("show", {"rollout": rollout})
    assert summary.state == expected, f"{summary.state} ({summary.detail}); {context}"
    assert shown["state"] == expected, context
    node_phase = "succeeded" if expected == "succeeded" else "rolled_back"
    version = new if expected == "succeeded" else old
    for node in NODES:
        assert shown["nodes"][node]["phase"] == node_phase, f"{node}: {shown['nodes'][node]}; {context}"
        assert fleet.parts(node) == {"a": version, "b": version}, f"{node} is mixed; {context}"
        runs = Counter((row[0], row[2]) for row in fleet.records(node, rollout))
        assert all(count == 1 for count in runs.values()), f"{node} ran a step twice: {runs}; {context}"
        if expected == "succeeded":
            assert runs == {("apply", "a"): 1, ("apply", "b"): 1}, f"{node}: {runs}"
        else:
            assert {part for phase, part in runs if phase == "rollback"} == {
                part for phase, part in runs if phase == "apply"
            }, f"{node}: {runs}"
        assert fleet.agents[node].alive(), fleet.agents[node].log()
    # Nothing stale waits on the broker (DESIGN 3.2).
    await observer.wait(
        lambda: all(observer.cmds.get(node) == b"" for node in NODES) or None,
        "every retained command cleared",
    )


async def test_hub_killed_at_random_moments_of_a_rollout(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    async with observing(amqtt_broker.url, topics) as observer:
        await start(fleet, observer)
        version = "v0"
        mid_flight = 0
        for trial in range(trials(3)):
            new = f"v{trial + 1}"
            body = await observer.ok("create_rollout", spec(f"update {new}", new))
            rollout = body["rollout"]
            await asyncio.sleep(rng.uniform(0.0, 3.0))  # the wave of 1, then 2 nodes: about 2-3 s
            summary = observer.summaries.get(rollout)
            mid_flight += summary is None or summary.state not in ("succeeded",)
            started = time.monotonic()
            await crash_and_restart(fleet, observer)
            await check_outcome(fleet, observer, rollout, "succeeded", version, new)
            _LOGGER.info("trial %d: recovered in %.1f s", trial, time.monotonic() - started)
            version = new
        _LOGGER.info("hub kills mid-rollout: %d of %d trials", mid_flight, trials(3))


async def test_hub_killed_at_random_moments_of_a_coordinated_rollback(
    mosquitto_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(mosquitto_broker.url, topics)
    async with observing(mosquitto_broker.url, topics) as observer:
        await start(fleet, observer)
        mid_flight = 0
        for trial in range(trials(3)):
            broken = NODES[-1]  # in the last wave: the first wave's node is rolled back by the hub
            marker = fleet.state_dir(broken) / "broken"
            marker.write_text("")
            new = f"bad{trial}"
            seen = len(observer.statuses)
            body = await observer.ok("create_rollout", spec(f"bad update {trial}", new))
            rollout = body["rollout"]
            await observer.wait(
                lambda: any(
                    s.rollout == rollout and s.state == "failed" for s in observer.statuses[seen:]  # noqa: B023
                )
                or None,
                f"{broken}'s failure",
            )
            await asyncio.sleep(rng.uniform(0.0, 1.5))  # the rollback of 2 nodes: about 1 s
            summary = observer.summaries.get(rollout)
            mid_flight += summary is None or summary.state != "rolled_back"
            await crash_and_restart(fleet, observer)
            await check_outcome(fleet, observer, rollout, "rolled_back", "v0", new)
            marker.unlink()
        _LOGGER.info("hub kills mid-rollback: %d of %d trials", mid_flight, trials(3))


@pytest.fixture(autouse=True)
def _log_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=__name__)
