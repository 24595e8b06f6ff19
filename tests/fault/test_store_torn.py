"""The hub's TinyDB file is never torn: the hub killed -9 during bursts of writes (DESIGN section 6).

``tests/integration/test_store_crash.py`` kills a process that drives ``Store``
directly; here the real ``fleet hub`` is killed while it writes what it writes
in service: a burst of node births (the ``nodes`` table) and rollouts created
on those nodes (``rollouts`` and ``audit``, each record flushed before its
command goes out). After every kill the file must parse as a TinyDB database,
every record must load (rollouts through the engine's own check, nodes through
the registry), nothing committed may be lost (counts never go backwards, and
every rollout whose id the hub handed out is on disk), and the hub must start
again on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

import pytest

from bus.messages import NodeState, encode
from bus.topics import Topics
from hub.core.engine import check_record
from hub.core.registry import Registry
from hub.store import AtomicJSONStorage
from tests.conftest import RunningBroker
from tests.fault.conftest import Fleet, Observer, observing, trials

_LOGGER = logging.getLogger(__name__)

TRIALS = trials(10)
BURST = 150  # births per trial
ROLLOUTS = 3  # rollouts per trial, 10 of the new nodes each


async def burst(observer: Observer, trial: int, created: list[str]) -> None:
    """Births of BURST new nodes, then rollouts on some of them (each id kept once the hub gives it)."""
    names = [f"t{trial}-n{i:03d}" for i in range(BURST)]
    for name in names:
        birth = NodeState(
            node=name, state="online", session=str(uuid.uuid4()), reason="birth", heartbeat_s=3600,
            labels={"trial": str(trial)},
        )  # fmt: skip
        await observer.client.publish(observer.topics.node(name, "state"), encode(birth), qos=1, retain=True)
    await observer.online(names[: ROLLOUTS * 10])
    for r in range(ROLLOUTS):
        spec = {
            "name": f"burst {trial}.{r}",
            "targets": names[r * 10 : (r + 1) * 10],
            "plan": [{"type": "script", "name": "part.sh", "args": ["a", "v1"], "rollback": "part.sh"}],
        }
        reply = await observer.rpc.call("create_rollout", spec, timeout=10)
        if reply.ok:
            created.append(reply.body["rollout"])


def check_file(fleet: Fleet, created: list[str]) -> tuple[int, int]:
    """The file parses, every record loads, every handed-out rollout is there; (nodes, rollouts)."""
    data = AtomicJSONStorage(fleet.db).read()  # raises on a torn or corrupt file
    assert data is not None
    rollouts = data.get("rollouts", {})
    for key, record in rollouts.items():
        assert check_record(record) is None, f"rollout {key}: {check_record(record)}"
    missing = [rid for rid in created if rid not in rollouts]
    assert not missing, f"rollouts handed out but not on disk: {missing}"
    nodes = list(data.get("nodes", {}).values())
    assert Registry(5.0).restore(nodes, time.time()) == len(nodes)
    return len(nodes), len(rollouts)


@pytest.mark.timeout(60 + 30 * TRIALS)
async def test_hub_killed_during_bursts_of_writes_never_tears_its_file(
    mosquitto_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(mosquitto_broker.url, topics)
    created: list[str] = []
    last = (0, 0)
    kills_mid_burst = 0
    async with observing(mosquitto_broker.url, topics) as observer:
        for trial in range(TRIALS):
            births = observer.hub_births
            hub = fleet.start_hub("--commit-interval-s", "0.01")
            await observer.hub_ready(births)
            writing = asyncio.create_task(burst(observer, trial, created))
            await asyncio.sleep(rng.uniform(0.0, 0.8))  # a burst takes the hub about 0.5 s
            hub.kill()
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
            if not fleet.db.exists():
                assert not created, "rollouts handed out, but no database on disk"
                continue
            counts = check_file(fleet, created)
            assert counts >= last, f"trial {trial}: {counts} after {last}: committed writes lost"
            # Killed before every write of the burst was on disk: the kill hit the writing.
            kills_mid_burst += counts < ((trial + 1) * BURST, (trial + 1) * ROLLOUTS)
            last = counts
        # The last file opens in a hub, which serves what it holds.
        births = observer.hub_births
        fleet.start_hub()
        await observer.hub_ready(births)
        listed = {summary["id"] for summary in await observer.ok("list")}
        assert set(created) <= listed
    _LOGGER.info(
        "%d kills (%d mid-burst); the file held %d nodes and %d rollouts at the end",
        TRIALS, kills_mid_burst, *last,
    )  # fmt: skip
