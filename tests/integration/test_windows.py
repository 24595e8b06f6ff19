"""Maintenance windows and start_deadline_s with a real broker, hub and agents.

The window opens at the current minute (UTC) for an hour, so it is open now
for a node in UTC and closed for a node labelled ``tz=Asia/Tokyo`` (the same
wall-clock time there was nine hours ago): the first gets its apply at once,
the second waits, and the plan says when its window opens.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.integration.live_fleet import RECORD_PLAN, LiveFleet, until

pytestmark = pytest.mark.broker


def window_now() -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return {"cron": f"{now.minute} {now.hour} * * *", "duration_s": 3600}


async def test_each_node_starts_inside_its_own_window(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        utc = await fleet.agent("utc-1", labels={"tz": "UTC"})
        tokyo = await fleet.agent("tokyo-1", labels={"tz": "Asia/Tokyo"})
        spec = {
            "name": "nightly",
            "targets": ["utc-1", "tokyo-1"],
            "plan": RECORD_PLAN,
            "windows": [window_now()],
        }
        plan = await fleet.ask("plan", {"spec": spec, "preflight": False})
        zones = plan["schedule"]["zones"]
        assert zones["UTC"]["open_now"] is True
        assert zones["Asia/Tokyo"]["open_now"] is False
        assert zones["Asia/Tokyo"]["next_open_local"].endswith("Asia/Tokyo")
        assert plan["estimate"]["starts_in_s"] == 0
        assert any(line.startswith("window    Asia/Tokyo: opens ") for line in plan["schedule_lines"])
        rollout = (await fleet.ask("create_rollout", spec))["rollout"]
        await until(lambda: utc.records() == ["apply record.sh 2.0"], "the UTC node to apply in its window")
        await until(lambda: fleet.summary(rollout)["nodes"]["utc-1"]["phase"] == "succeeded", "utc-1 done")
        summary = fleet.summary(rollout)
        assert summary["state"] == "running"
        assert summary["nodes"]["tokyo-1"]["phase"] == "pending"
        assert tokyo.records() == []
        waits = [e["message"] for e in fleet.audit(rollout) if e["kind"] == "window_wait"]
        assert waits
        assert "Asia/Tokyo" in waits[-1]
        await fleet.ask("abort", {"rollout": rollout})
        done = await fleet.wait_state(rollout)
        assert done["state"] == "rolled_back"
        assert utc.records() == ["apply record.sh 2.0", "rollback record.sh 2.0"]
        assert tokyo.records() == []


async def test_start_deadline_separates_never_started_from_failed(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        up = await fleet.agent("up-1")
        gone = await fleet.agent("gone-1")
        await gone.stop()
        await fleet.wait_online("gone-1", online=False)
        spec = {
            "name": "with deadline",
            "targets": ["up-1", "gone-1"],
            "plan": RECORD_PLAN,
            "require_online": False,
            "start_deadline_s": 1,
        }
        rollout = (await fleet.ask("create_rollout", spec))["rollout"]
        done = await fleet.wait_state(rollout)
        assert done["state"] == "succeeded"
        assert done["nodes"]["gone-1"] == {
            "phase": "not_started",
            "step": None,
            "detail": "not started within start_deadline_s (1 s): queued: node offline",
        }
        assert (done["counts"]["not_started"], done["counts"]["failed"]) == (1, 0)
        assert up.records() == ["apply record.sh 2.0"]
        # Its withdrawn command does not run when it comes back.
        back = await fleet.agent("gone-1")
        await until(lambda: back.agent.ready.is_set(), "gone-1 back")
        plan = await fleet.ask("plan", {"spec": {**spec, "name": "probe"}, "preflight_timeout_s": 10})
        assert plan["preflight"]["nodes"]["gone-1"]["state"] == "passed"  # answered: it is idle
        assert back.records() == []
