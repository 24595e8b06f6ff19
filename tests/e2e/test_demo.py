"""The README's walk-through, for real: `fleet demo`, the good rollout, the bad one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@dataclass
class Demo:
    root: Path
    env: dict[str, str]
    http: str
    token: str

    def fleet(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def app_version(self, node: str) -> str:
        port = (self.root / "nodes" / node / "state" / "app" / "port").read_text().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            version: str = json.load(response)["version"]
            return version


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("demo") / "fleet"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_NO_CONFIG_DISCOVERY"] = "1"
    out = root.parent / "demo.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "demo", "--nodes", "3", "--no-tui", "--dir", str(root)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while "Try, in another terminal" not in text:
            assert proc.poll() is None, f"fleet demo exited early:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"fleet demo did not come up:\n{out.read_text()}"
            time.sleep(0.2)
            text = out.read_text()
        url_file = re.search(r"FLEET_BROKER=\$\(cat (\S+)\)", text)
        assert url_file, text
        # The HTTP bridge's URL and token are in a file only its owner reads.
        info_file = root / "http.env"
        assert info_file.stat().st_mode & 0o777 == 0o600
        info = dict(line.split("=", 1) for line in info_file.read_text().splitlines())
        assert info["FLEET_HTTP_TOKEN"] in text
        env = {**env, "FLEET_BROKER": (root.parent / url_file.group(1)).read_text().strip()}
        yield Demo(root, env, info["FLEET_HTTP_URL"], info["FLEET_HTTP_TOKEN"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    # The demo ends every process it started, demo services included.
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True, check=False)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"


def test_demo_fleet_is_online_and_runs_version_1(demo: Demo) -> None:
    result = demo.fleet("nodes", "--json")
    assert result.returncode == 0, result.stderr
    nodes = {n["node"]: n for n in json.loads(result.stdout)}
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    assert all(n["online"] for n in nodes.values())
    assert nodes["node-3"]["labels"]["hw"] == "rev-a"
    assert [demo.app_version(n) for n in nodes] == ["1.0", "1.0", "1.0"]


def test_good_rollout_updates_every_node(demo: Demo) -> None:
    result = demo.fleet("rollout", "create", str(demo.root / "rollouts" / "good.json"), "--wait")
    assert result.returncode == 0, result.stderr
    rollout = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", rollout)
    assert [demo.app_version(f"node-{i}") for i in (1, 2, 3)] == ["2.0", "2.0", "2.0"]
    shown = json.loads(demo.fleet("rollout", "show", rollout, "--json").stdout)
    assert shown["state"] == "succeeded"
    assert shown["counts"]["succeeded"] == 3


def test_nodes_by_version_agrees_with_the_node_table(demo: Demo) -> None:
    # Two calls, two moments: versions may move in between (a node re-reporting), so retry.
    deadline = time.monotonic() + 20
    while True:
        nodes = json.loads(demo.fleet("nodes", "--json").stdout)
        reported = {n["node"]: n["inventory"]["services"]["demo-app"] for n in nodes}
        result = demo.fleet("nodes", "--by-version", "--json")
        assert result.returncode == 0, result.stderr
        rows = [r for r in json.loads(result.stdout) if r["software"] == "demo-app"]
        grouped = {node: row["version"] for row in rows for node in row["nodes"]}
        if grouped == reported or time.monotonic() > deadline:
            break
    assert grouped == reported
    assert all(row["drift"] == (len(rows) > 1) for row in rows)
    table = demo.fleet("nodes", "--state", "online", "--version", "demo-app")
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip().splitlines()[-1].startswith("3 nodes: 3 online, 0 offline | ")
    offline = demo.fleet("nodes", "--state", "offline")
    assert offline.stdout.strip().splitlines()[-1] == "0 nodes: 0 online, 0 offline"
    none = demo.fleet("nodes", "--version", "demo-app=9.9")
    assert none.stdout.strip().splitlines()[-1] == "0 nodes: 0 online, 0 offline"


def test_nodes_by_version_shows_the_new_version_everywhere(demo: Demo) -> None:
    # After the good rollout every node runs demo-app 2.0; the hub must hear it within seconds.
    deadline = time.monotonic() + 20
    while True:
        result = demo.fleet("nodes", "--by-version", "--json")
        assert result.returncode == 0, result.stderr
        rows = [r for r in json.loads(result.stdout) if r["software"] == "demo-app"]
        if [r["version"] for r in rows] == ["2.0"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows == [
        {
            "software": "demo-app",
            "version": "2.0",
            "nodes": ["node-1", "node-2", "node-3"],
            "offline": [],
            "drift": False,
        }
    ]


def test_bad_rollout_restores_every_node(demo: Demo) -> None:
    before = [demo.app_version(f"node-{i}") for i in (1, 2, 3)]
    result = demo.fleet("rollout", "create", str(demo.root / "rollouts" / "bad.json"), "--wait")
    assert result.returncode == 1, result.stderr
    rollout = result.stdout.strip()
    shown = json.loads(demo.fleet("rollout", "show", rollout, "--json").stdout)
    assert shown["state"] == "rolled_back"
    assert shown["counts"]["rolled_back"] == 3
    assert "node-3" in json.dumps(shown.get("audit", []))
    assert [demo.app_version(f"node-{i}") for i in (1, 2, 3)] == before


def test_http_bridge_of_the_demo_needs_its_token(demo: Demo) -> None:
    with pytest.raises(urllib.request.HTTPError) as refused:
        urllib.request.urlopen(f"{demo.http}/api/rollouts", timeout=5)
    refused.value.close()
    assert refused.value.code == 401
    request = urllib.request.Request(
        f"{demo.http}/api/rollouts", headers={"Authorization": f"Bearer {demo.token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert isinstance(json.load(response), list)


def test_broker_refuses_anonymous_clients(demo: Demo) -> None:
    port = re.search(r":(\d+)$", demo.env["FLEET_BROKER"])
    assert port is not None
    env = {**demo.env, "FLEET_BROKER": f"mqtt://127.0.0.1:{port.group(1)}"}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "nodes"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
