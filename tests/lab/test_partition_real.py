"""A real link that drops mid-rollout, shorter than the rollout's ``offline_grace_s``.

The node's agent keeps working through the partition (its link is down, nothing closes its
connection: a half-open partition, seen by the broker's keepalive). When the link comes back
within the grace, the hub must take the node's true end state: succeeded, not "went offline
mid-job". This needs the hub's ``offline_grace_s`` (the truth issue; branch truth-hub).
"""

from __future__ import annotations

import pytest

from tests.lab import hostkit, lab
from tests.lab.hostkit import LabFleet, served, spec

pytestmark = pytest.mark.lab


def test_link_drop_mid_rollout_shorter_than_the_grace_ends_succeeded(lab_fleet: LabFleet) -> None:
    h1, h2 = lab_fleet.hosts["h1"], lab_fleet.hosts["h2"]
    plan = hostkit.stop_file_start(lab_fleet.artifacts, "7.0", "7.0")
    plan.insert(0, {"type": "script", "name": "pause.sh"})
    rollout, _ = lab_fleet.fleet.rollout(spec(["h1", "h2"], plan, offline_grace_s=120), wait=False)
    try:
        lab.wait_for(
            "h1 to start", lambda: "step 0 (script) running" in h1.journal("fleet-agent"), timeout=60
        )
        h1.link(up=False)
        lab_fleet.fleet.wait_online(["h1"], online=False, timeout=60)
    finally:
        h1.link(up=True)
    shown = lab_fleet.fleet.wait_state(
        rollout, ("succeeded", "failed", "rolled_back", "rollback_failed"), timeout=240
    )
    assert [served(h) for h in (h1, h2)] == ["7.0", "7.0"] or shown["state"] != "succeeded"
    assert shown["state"] == "succeeded", shown["nodes"]
