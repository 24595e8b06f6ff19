"""The shipped Dockerfile and docker-compose.yml, for real: build, up, a rollout end to end.

No registry is reachable, so the images come from the lab's Debian root: a Python base
(a venv and a pip configured for the lab's wheelhouse) for the Dockerfile's ``BASE`` build
argument, and deploy/mosquitto.Dockerfile on the same root (Debian's mosquitto) for
``FLEET_MOSQUITTO_IMAGE``. Everything else is the compose file and its header's steps as shipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import dockerkit, lab
from tests.lab.test_docker_real import docker as docker  # the session's dockerd

pytestmark = pytest.mark.lab

PYTHON_BASE = "fleetbus-lab/python:3.11"
MOSQUITTO_IMAGE = "fleetbus-lab/mosquitto"
NODES = ("node-1", "node-2", "node-3")


def _python_base(daemon: dockerkit.Docker, wheels: Path, context: Path) -> None:
    """A python:3.11-slim stand-in: the Debian root, a venv first on PATH, pip offline."""
    (context / "wheels").mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        if not wheel.name.startswith("fleetbus-"):  # the image installs the checkout itself
            shutil.copy2(wheel, context / "wheels" / wheel.name)
    (context / "Dockerfile").write_text(
        f"FROM {dockerkit.BASE_IMAGE}\n"
        "COPY wheels /wheels\n"
        "RUN python3 -m venv /opt/venv"
        " && printf '[global]\\nno-index = true\\nfind-links = /wheels\\n' > /etc/pip.conf\n"
        "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    daemon.build(PYTHON_BASE, context)


class Compose:
    def __init__(self, daemon: dockerkit.Docker, project: Path) -> None:
        self.daemon = daemon
        self.project = project
        self.env = {
            **daemon.env,
            "FLEET_UID": "0",
            "FLEET_GID": "0",
            "FLEET_HTTP_TOKEN": "lab-token-" + hashlib.sha256(str(project).encode()).hexdigest()[:16],
            "FLEET_BASE_IMAGE": PYTHON_BASE,
            "FLEET_MOSQUITTO_IMAGE": MOSQUITTO_IMAGE,
        }

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        argv = ["sh", "-c", f'cd "{self.project}" && exec docker-compose -p fleetlab "$@"', "compose", *args]
        return self.daemon.net.run(argv, env=self.env, timeout=timeout, check=check).stdout

    def fleet(self, *args: str, timeout: float = 300) -> tuple[int, str, str]:
        url = (self.project / "broker/credentials/tui.url").read_text().strip()
        url = url.replace("@mosquitto:", "@127.0.0.1:")  # the port compose publishes
        env = {"PATH": self.daemon.env["PATH"], "PYTHONPATH": str(lab.REPO), "FLEET_BROKER": url,
               "FLEET_NO_CONFIG_DISCOVERY": "1"}  # fmt: skip
        result = self.daemon.net.run(
            [sys.executable, "-m", "cli.main", *args], env=env, timeout=timeout, check=False
        )
        return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="session")
def compose(docker: dockerkit.Docker, lab_wheels: Path, lab_tmp: Path) -> Iterator[Compose]:
    started = time.monotonic()
    _python_base(docker, lab_wheels, lab_tmp / "python-base")
    docker.docker("build", "-q", "--network", "none", "--build-arg", f"BASE={dockerkit.BASE_IMAGE}",
                  "-f", str(lab.REPO / "deploy/mosquitto.Dockerfile"), "-t", MOSQUITTO_IMAGE,
                  str(lab.REPO / "deploy"), timeout=600)  # fmt: skip
    built = time.monotonic()
    docker.docker("build", "-q", "--network", "none", "--build-arg", f"BASE={PYTHON_BASE}",
                  "-t", "fleetbus:latest", str(lab.REPO), timeout=900)  # fmt: skip
    print(f"lab: base images {built - started:.1f} s, the Dockerfile {time.monotonic() - built:.1f} s")

    project = lab_tmp / "compose"
    project.mkdir()
    shutil.copy2(lab.REPO / "docker-compose.yml", project)
    fleet = [sys.executable, "-m", "cli.main"]
    env = {"PATH": docker.env["PATH"], "PYTHONPATH": str(lab.REPO), "FLEET_NO_CONFIG_DISCOVERY": "1"}
    # The header's steps; as root, mosquitto keeps root only when the config says so.
    lab._run([*fleet, "broker-config", "--out", str(project / "broker"), "--nodes", ",".join(NODES),
              "--host", "mosquitto", "--bind", "0.0.0.0", "--broker-dir", "/fleet/broker",
              "--broker-user", "root"], env=env)  # fmt: skip
    lab._run([*fleet, "keys", "generate", "--out", str(project / "keys")], env=env)
    stack = Compose(docker, project)
    started = time.monotonic()
    try:
        stack.run("up", "-d", "--no-build")
        yield stack
    finally:
        print(stack.run("ps", check=False))
        print(stack.run("logs", "--no-color", "--tail", "15", check=False, timeout=60))
        stack.run("down", "-v", "--timeout", "5", check=False)
        print(f"lab: compose stack lived {time.monotonic() - started:.1f} s")


def test_dockerfile_builds_from_a_local_base_and_runs_the_cli(
    docker: dockerkit.Docker, compose: Compose
) -> None:
    out = docker.docker("run", "--rm", "--network", "none", "fleetbus:latest", "--help").stdout
    assert "Update a fleet of Linux machines over MQTT." in out
    user = docker.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "id", "fleetbus:latest", "-un"
    ).stdout
    assert user.strip() == "root"  # the entrypoint drops to "fleet" itself
    assert "fleet" in docker.docker("run", "--rm", "--network", "none", "--entrypoint", "getent",
                                    "fleetbus:latest", "passwd", "fleet").stdout  # fmt: skip


def test_compose_up_runs_broker_hub_and_agents_that_pass_a_rollout(compose: Compose) -> None:
    def online() -> dict[str, bool]:
        code, out, _ = compose.fleet("nodes", "--json")
        return {n["node"]: n["online"] for n in json.loads(out)} if code == 0 else {}

    started = time.monotonic()
    lab.wait_for("the compose agents online", lambda: online() == dict.fromkeys(NODES, True), timeout=120)
    print(f"lab: compose up to 3 agents online: {time.monotonic() - started:.1f} s")

    # The artifact, served from the lab's namespace, which the compose network's gateway reaches.
    network = json.loads(compose.daemon.docker("network", "inspect", "fleetlab_default").stdout)[0]
    gateway = network["IPAM"]["Config"][0]["Gateway"]
    artifacts = compose.project / "artifacts"
    artifacts.mkdir()
    body = json.dumps({"version": "2.0"}).encode() + b"\n"
    (artifacts / "demo-app-2.0.json").write_bytes(body)
    server = compose.daemon.net.spawn(
        "compose-artifacts",
        [sys.executable, "-m", "http.server", "--bind", gateway, "8089", "--directory", str(artifacts)],
    )
    try:
        compose.daemon.net.wait_port(gateway, 8089)
        spec = {
            "name": "compose demo-app 2.0",
            "targets": {"labels": {"role": "web"}},
            "plan": [
                {"type": "download", "url": f"http://{gateway}:8089/demo-app-2.0.json",
                 "sha256": hashlib.sha256(body).hexdigest(), "name": "demo-app-2.0.json"},
                {"type": "service", "action": "stop", "name": "demo-app"},
                {"type": "file", "src": "demo-app-2.0.json", "dest": "app/version.json", "mode": "0644"},
                {"type": "service", "action": "start", "name": "demo-app"},
                {"type": "health", "check": "command", "target": "check_app.sh", "expect": "2.0",
                 "retries": 10, "interval_s": 0.5},
            ],
            "failure": {"max_failed": 0, "on_failure": "rollback"},
        }  # fmt: skip
        path = compose.project / "rollout.json"
        path.write_text(json.dumps(spec))
        code, out, err = compose.fleet("rollout", "create", str(path), "--wait")
        assert code == 0, out + err
        rollout = out.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f-]{36}", rollout), out
        code, out, err = compose.fleet("rollout", "show", rollout, "--json")
        shown = json.loads(out)
        assert shown["state"] == "succeeded", shown
        assert shown["counts"]["succeeded"] == 3
    finally:
        compose.daemon.net.stop(server)
    for node in NODES:
        service = node.replace("node-", "agent-")
        version = compose.run("exec", "-T", service, "cat", "/var/lib/fleet-agent/app/version.json")
        assert json.loads(version)["version"] == "2.0"
