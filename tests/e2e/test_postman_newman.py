"""The Postman collection, run by newman against a real hub (``fleet demo``): every check passes.

newman comes from npm: ``npm install --prefix .cache/newman newman@6`` (or set NEWMAN to
its path, or have it on PATH); without node or newman the test skips, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "docs" / "fleetbus.postman_collection.json"


def _newman() -> str | None:
    for candidate in (
        os.environ.get("NEWMAN"),
        shutil.which("newman"),
        str(REPO / ".cache" / "newman" / "node_modules" / ".bin" / "newman"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def newman() -> str:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (apt-get install nodejs npm)")
    found = _newman()
    if found is None:
        pytest.skip("newman is not installed: npm install --prefix .cache/newman newman@6 (or set NEWMAN)")
    return found


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real hub with two real agents labelled role=web: `fleet demo --no-tui`."""
    root = tmp_path_factory.mktemp("newman") / "fleet"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_NO_CONFIG_DISCOVERY"] = "1"
    out = root.parent / "demo.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "demo", "--nodes", "2", "--no-tui", "--dir", str(root)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "Try, in another terminal" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        yield dict(line.split("=", 1) for line in (root / "http.env").read_text().splitlines())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _run(
    newman: str, hub: dict[str, str], token: str, report: Path
) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    result = subprocess.run(
        [
            newman,
            "run",
            str(COLLECTION),
            "--env-var",
            f"baseUrl={hub['FLEET_HTTP_URL']}",
            "--env-var",
            f"token={token}",
            "--reporters",
            "cli,json",
            "--reporter-json-export",
            str(report),
            "--timeout-request",
            "60000",
            "--disable-unicode",
            "--color",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert report.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    return result, json.loads(report.read_text())


def test_every_request_of_the_collection_passes_its_checks(
    newman: str, hub: dict[str, str], tmp_path: Path
) -> None:
    result, report = _run(newman, hub, hub["FLEET_HTTP_TOKEN"], tmp_path / "run.json")
    run = report["run"]
    executions = run["executions"]
    names = [e["item"]["name"] for e in executions]
    assert names[:2] == ["Start a rollout: script", "Start a rollout: package"], names
    # 11 requests; a create's pre-request script may poll the previous rollout (more executions).
    assert run["stats"]["items"]["total"] == len(dict.fromkeys(names)) == 11
    # Every request made at least two checks (status and body), and none failed.
    for execution in executions:
        assert len(execution.get("assertions", [])) >= 2, execution["item"]["name"]
    assert run["stats"]["assertions"]["failed"] == 0, result.stdout[-4000:]
    assert result.returncode == 0, result.stdout[-4000:]
    codes = {e["item"]["name"]: e["response"]["code"] for e in executions}
    assert codes["Start a rollout: script"] == 202
    assert codes["Show a rollout"] == 200  # never 404: the create came first


def test_the_checks_fail_when_the_api_says_no(newman: str, hub: dict[str, str], tmp_path: Path) -> None:
    result, report = _run(newman, hub, "not-the-token", tmp_path / "refused.json")
    assert result.returncode != 0
    failed = report["run"]["stats"]["assertions"]["failed"]
    # Health needs no token and passes; every other request's status check fails on 401.
    assert failed >= 10, result.stdout[-4000:]
