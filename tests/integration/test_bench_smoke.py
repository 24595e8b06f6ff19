"""Every benchmark script runs at a tiny size and prints one JSON object with its figures.

Not a timed test: the figures are only checked for shape and sanity (the
README's table comes from full-size runs). Each script starts and ends its own
broker, hub, simulator and agents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

pytestmark = pytest.mark.e2e

COMMON = {"bench", "broker", "nodes", "seconds", "python", "cpus", "at"}


def run_bench(script: str, *args: str, timeout: float = 100) -> dict[str, Any]:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (.ci/run installs it)")
        pytest.skip("mosquitto not installed")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "BENCH_PROFILE"},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object, nothing else on stdout
    result: dict[str, Any] = json.loads(lines[0])
    assert set(result) >= COMMON, set(result)
    return result


def test_rollout_latency_with_the_fleet_over_two_simulators() -> None:
    result = run_bench(
        "rollout_latency.py", "--nodes", "5", "--repeat", "1", "--raw-repeat", "1", "--simulators", "2"
    )
    assert result["ok"] is True
    assert result["simulators"] == 2
    (run,) = result["runs"]
    assert run["step_reports"] == 5 * 2 * 2  # every node of both processes reported every step
    assert set(run["cpu_s"]) == {"hub", "simulate", "mosquitto", "wall"}


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_rollout_latency_smoke(broker: str) -> None:
    result = run_bench(
        "rollout_latency.py", "--broker", broker, "--nodes", "5", "--repeat", "1", "--raw-repeat", "1"
    )
    assert result["bench"] == "rollout_latency"
    assert result["broker"] == broker
    assert result["nodes"] == 5
    assert result["ok"] is True
    assert result["seconds"] > 0
    assert result["raw_seconds"] > 0
    assert result["ratio"] > 0
    (run,) = result["runs"]
    assert run["state"] == "succeeded"
    assert run["every_step_reported"] is True
    assert run["step_reports"] == 5 * 2 * 2
    assert run["summary_publishes"] >= 1
    assert run["messages_per_s"] > 0
    assert run["store_rewrites"] >= 1
    assert result["hub_rss_mib"] > 0


def test_hub_ingest_smoke() -> None:
    result = run_bench("hub_ingest.py", "--nodes", "5", "--seconds", "2", "--heartbeat-s", "0.5")
    assert result["bench"] == "hub_ingest"
    assert result["online"] == 5
    assert result["keeps_up"] is True
    assert result["expected_per_s"] == 10
    assert result["messages_per_s"] > 0
    assert 0 <= result["hub_cpu_pct"] < 100
    assert result["hub_rss_mib"] > 0


def test_dead_node_smoke() -> None:
    result = run_bench(
        "dead_node.py", "--nodes", "5", "--kills", "1", "--freezes", "1", "--heartbeat-s", "0.5"
    )
    assert result["bench"] == "dead_node"
    assert result["kills"] == 1
    assert result["freezes"] == 1
    # A killed agent is reported by its will, a frozen one by its missed heartbeats.
    assert result["detected_by"] == {"lost": 1, "missed heartbeats": 1}
    assert 0 < result["kill_max_s"] < result["freeze_max_s"]
    assert result["agent_rss_mib"] > 0


def test_rss_smoke() -> None:
    result = run_bench("rss.py", "--nodes", "5", "--heartbeat-s", "0.5")
    assert result["bench"] == "rss"
    assert result["agent_job"] == "succeeded"
    for key in (
        "hub_rss_mib",
        "hub_idle_rss_mib",
        "agent_rss_mib",
        "agent_plain_rss_mib",
        "sim_rss_mib",
        "broker_rss_mib",
    ):
        assert result[key] > 0, key


def test_rollback_latency_smoke() -> None:
    result = run_bench("rollback_latency.py", "--nodes", "5", "--repeat", "1", "--heartbeat-s", "0.5")
    assert result["bench"] == "rollback_latency"
    assert result["ok"] is True
    (run,) = result["runs"]
    assert run["state"] == "rolled_back"
    assert run["nodes_reporting_rolled_back"] == 5
    assert run["counts"]["rolled_back"] == 5
    assert 0 < result["seconds"] <= result["total_seconds"]


def test_ten_thousand_smoke() -> None:
    result = run_bench(
        "ten_thousand.py",
        *("--nodes", "6", "--simulators", "2", "--seconds", "2", "--heartbeat-s", "1"),
        *("--kills", "1", "--freezes", "0"),
        timeout=200,
    )
    assert result["bench"] == "ten_thousand"
    assert result["ingest"]["online"] == 6
    rollout = result["rollout"]
    assert rollout["state"] == "succeeded"
    assert rollout["counts"]["succeeded"] == 6
    assert rollout["summary_publishes"] >= 1
    assert rollout["change_messages"] >= 1  # per-node changes on rollout/{id}/nodes
    assert rollout["summary_nodes_total"] is None  # six nodes: the summary names them all
    surfaces = result["surfaces"]
    assert surfaces["fleet_nodes_summary"]["total"] == 6
    assert surfaces["fleet_nodes_filter_rows"] == 3  # sim-a-*: the first simulator's half
    assert surfaces["http_nodes"]["all"]["bytes"] > 0
    assert result["dead_node"]["kills"] == 1
    assert result["hub_rss_mib"] > 0
