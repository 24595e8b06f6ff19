"""Adaptive pace with a real broker, hub and agents: waves grow after clean waves and shrink after a failure.

Seven agents; n3's health check fails (its own scripts dir), the others pass.
With ``start 1, grow_factor 2`` and ``max_failed 1`` the waves go 1 (clean,
grow), 2 (n3 fails: shrink), 1 (clean, grow), 2 (clean, grow), 1: every
decision is an audit entry with its reason, and the rollout succeeds with one
tolerated failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.integration.live_fleet import LiveFleet

pytestmark = pytest.mark.broker

NODES = [f"n{i}" for i in range(1, 8)]
PLAN: list[dict[str, Any]] = [
    {"type": "script", "name": "record.sh", "args": ["2.0"], "rollback": "record.sh"},
    {"type": "health", "check": "command", "target": "check.sh", "retries": 1, "interval_s": 0},
]


async def test_waves_grow_after_clean_waves_and_shrink_after_a_failure(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    sick = tmp_path / "scripts-sick"
    sick.mkdir()
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        fleet.add_script("check.sh", "#!/bin/sh\nexit 0\n")
        fleet.add_script("record.sh", (fleet.scripts / "record.sh").read_text(), sick)
        # Unhealthy on the new version only: the restored old one passes (FLEET_PHASE=verify).
        unhealthy = '#!/bin/sh\n[ "$FLEET_PHASE" = verify ] && exit 0\necho unhealthy\nexit 1\n'
        fleet.add_script("check.sh", unhealthy, sick)
        agents = {node: await fleet.agent(node, scripts_dir=sick if node == "n3" else None) for node in NODES}
        spec = {
            "name": "adaptive",
            "targets": NODES,
            "plan": PLAN,
            "strategy": {"adaptive": {"start": 1, "grow_factor": 2, "on_failures": "shrink"}},
            "failure": {"max_failed": 1},
        }
        plan = await fleet.ask("plan", {"spec": spec, "preflight": False})
        assert [len(w) for w in plan["waves"]] == [1, 2, 4]  # the fastest case, as planned
        assert any("adaptive pace" in w for w in plan["warnings"])
        rollout = (await fleet.ask("create_rollout", spec))["rollout"]
        summary = await fleet.wait_state(rollout, "succeeded", "rolled_back", "halted", timeout=60)
        assert summary["state"] == "succeeded"
        assert summary["detail"] == "succeeded with 1 failed nodes (max_failed 1)"
        assert summary["nodes"]["n3"]["phase"] == "rolled_back"
        paces = [(e["kind"], e["message"]) for e in fleet.audit(rollout) if e["kind"].startswith("pace_")]
        assert paces == [
            ("pace_changed", "wave 1 clean (1/1 succeeded): next wave 2 nodes (x2)"),
            ("pace_changed", "wave 2: 1 of 2 failed: next wave 1 nodes (x0.5)"),
            ("pace_changed", "wave 3 clean (1/1 succeeded): next wave 2 nodes (x2)"),
            ("pace_changed", "wave 4 clean (2/2 succeeded): next wave 4 nodes (x2)"),
        ]
        started = [e["evidence"]["nodes"] for e in fleet.audit(rollout) if e["kind"] == "wave_started"]
        assert started == [["n1"], ["n2", "n3"], ["n4"], ["n5", "n6"], ["n7"]]
        assert (summary["wave"], summary["waves"]) == (5, 5)
        for node, agent in agents.items():
            expected = ["apply record.sh 2.0"] + (["rollback record.sh 2.0"] if node == "n3" else [])
            assert agent.records() == expected, node
