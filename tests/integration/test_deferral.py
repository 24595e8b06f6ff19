"""Deferral with a real broker, hub and agents: a node whose update lock is held waits, then applies or
is reported "not started" (never "failed"); an abort ends the wait; the pre-flight warns about the lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.integration.live_fleet import RECORD_PLAN, LiveFleet, until

pytestmark = pytest.mark.broker


def spec(**changes: Any) -> dict[str, Any]:
    return {"name": "app 2.0", "targets": ["n1", "n2"], "plan": RECORD_PLAN, **changes}


def lock(fleet: LiveFleet, node: str, name: str = "surgery.lock") -> Path:
    path = fleet.agents[node].state_dir / "locks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


async def test_a_locked_node_waits_then_applies_when_the_lock_goes(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1, n2 = await fleet.agent("n1"), await fleet.agent("n2")
        held = lock(fleet, "n2")
        plan = await fleet.ask("plan", spec())
        lock_check = [c for c in plan["preflight"]["nodes"]["n2"]["checks"] if c["type"] == "lock"]
        assert lock_check == [
            {
                "index": -1,
                "type": "lock",
                "state": "skipped",
                "detail": "update lock held (update lock held: locks/surgery.lock): an apply would wait",
            }
        ]
        assert plan["ok"] is True  # a lock is a warning: the node will wait for it
        rollout = (await fleet.ask("create_rollout", spec(max_defer_s=120)))["rollout"]
        await until(lambda: fleet.summary(rollout)["nodes"]["n2"]["phase"] == "deferred", "n2 to defer")
        summary = fleet.summary(rollout)
        assert summary["nodes"]["n2"]["detail"] == "update lock held: locks/surgery.lock"
        assert (summary["counts"]["deferred"], summary["counts"]["failed"]) == (1, 0)
        assert summary["state"] == "running"
        await until(lambda: n1.records() == ["apply record.sh 2.0"], "n1 to apply")
        assert n2.records() == []
        held.unlink()
        done = await fleet.wait_state(rollout)
        assert done["state"] == "succeeded"
        assert n2.records() == ["apply record.sh 2.0"]
        kinds = [e["kind"] for e in fleet.audit(rollout)]
        assert "node_deferred" in kinds


async def test_a_lock_that_outlasts_max_defer_s_means_not_started_not_failed(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1, n2 = await fleet.agent("n1"), await fleet.agent("n2")
        lock(fleet, "n2")
        rollout = (await fleet.ask("create_rollout", spec(max_defer_s=1)))["rollout"]
        done = await fleet.wait_state(rollout)
        assert done["state"] == "succeeded"
        assert done["detail"] == "succeeded on 2 nodes; 1 not started (deferred or offline: not failures)"
        node = done["nodes"]["n2"]
        assert node["phase"] == "not_started"
        assert node["detail"] == (
            "not started: update lock held: locks/surgery.lock (the rollout allows waiting 1 s)"
        )
        assert (done["counts"]["not_started"], done["counts"]["failed"]) == (1, 0)
        assert n1.records() == ["apply record.sh 2.0"]
        assert n2.records() == []


async def test_the_defer_check_script_and_an_abort_while_deferred(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    own = tmp_path / "scripts-n2"
    own.mkdir()
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        fleet.add_script("record.sh", (fleet.scripts / "record.sh").read_text(), own)
        fleet.add_script("defer-check", '#!/bin/sh\necho "printer busy for $FLEET_ROLLOUT"\nexit 1\n', own)
        n1, n2 = await fleet.agent("n1"), await fleet.agent("n2", scripts_dir=own)
        rollout = (await fleet.ask("create_rollout", spec(max_defer_s=300)))["rollout"]
        await until(lambda: fleet.summary(rollout)["nodes"]["n2"]["phase"] == "deferred", "n2 to defer")
        said = fleet.summary(rollout)["nodes"]["n2"]["detail"]
        assert said == f"defer-check says busy: printer busy for {rollout}"
        await until(lambda: fleet.summary(rollout)["nodes"]["n1"]["phase"] == "succeeded", "n1 to apply")
        await fleet.ask("abort", {"rollout": rollout})
        done = await fleet.wait_state(rollout)
        assert done["state"] == "rolled_back"
        assert n1.records() == ["apply record.sh 2.0", "rollback record.sh 2.0"]
        assert n2.records() == []  # it never started: nothing to undo
        # The agent is free again: a new rollout without the check runs on it.
        (own / "defer-check").unlink()
        again = (await fleet.ask("create_rollout", spec(name="app 2.1")))["rollout"]
        assert (await fleet.wait_state(again))["state"] == "succeeded"
        assert n2.records() == ["apply record.sh 2.0"]
