"""Issue 24 items 1 and 2 on a real systemd host: the undo of a restart, and systemd's start limit.

1. A "file, then restart" plan rolled back must leave the unit serving the old version: the
   unit reads its version when it starts, so a restart undone before the file is restored
   leaves it serving the new version while its file says the old one.
2. A fast rollout and rollback of a unit with systemd's default start limit (5 starts in
   10 s) must still restore it (``systemctl reset-failed`` before starting it again).
"""

from __future__ import annotations

import json

import pytest

from tests.lab import hostkit
from tests.lab.hostkit import LabFleet, served, spec

pytestmark = pytest.mark.lab


def test_file_then_restart_plan_rolled_back_serves_the_old_version(lab_fleet: LabFleet) -> None:
    host = lab_fleet.hosts["h1"]
    hostkit.install_demo_web(host, "1.0", name="demo-restart", port=8001)
    src = "demo-restart-2.0.json"
    plan = [
        lab_fleet.artifacts.add(src, json.dumps({"version": "2.0"}) + "\n"),
        {"type": "file", "src": src, "dest": "/srv/demo/demo-restart.json"},
        {"type": "service", "action": "restart", "name": "demo-restart"},
        hostkit.health_http("2.0", 8001),
    ]
    rollout, shown = lab_fleet.fleet.rollout(spec(["h1"], plan))
    assert shown["state"] == "succeeded", shown
    assert served(host, 8001) == "2.0"

    result = lab_fleet.fleet.fleet("rollout", "rollback", rollout)
    assert result.returncode in (0, 1), result.stderr
    shown = lab_fleet.fleet.wait_state(rollout, ("rolled_back", "rollback_failed", "failed"), timeout=120)

    assert hostkit.file_on_disk(host, "demo-restart") == "1.0"
    assert (shown["state"], served(host, 8001)) == ("rolled_back", "1.0"), shown["nodes"]


def test_fast_rollout_and_rollback_past_the_start_limit_still_restores(lab_fleet: LabFleet) -> None:
    host = lab_fleet.hosts["h2"]
    hostkit.install_demo_web(host, "1.0", name="demo-limit", port=8002, start_limit=True)
    assert host.unit_prop("demo-limit", "StartLimitBurst") == "5"
    # 1 start at install, 4 restarts, a failed check, then the undo starts it again: > 5 in 10 s.
    plan = hostkit.stop_file_start(lab_fleet.artifacts, "2.0", "2.0", name="demo-limit", port=8002)
    plan[4:4] = [{"type": "service", "action": "restart", "name": "demo-limit"}] * 3
    plan[-1] = hostkit.health_http("9.9", 8002)  # the new version never passes
    _, shown = lab_fleet.fleet.rollout(spec(["h2"], plan))
    journal = host.journal("fleet-agent")
    print("agent journal, last lines:\n" + "\n".join(journal.splitlines()[-25:]))
    assert hostkit.file_on_disk(host, "demo-limit") == "1.0"
    assert (shown["state"], host.systemctl("is-active", "demo-limit", check=False), served(host, 8002)) == (
        "rolled_back",
        "active",
        "1.0",
    ), shown["nodes"]
