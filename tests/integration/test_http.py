"""The HTTP bridge end to end: a real `fleet hub --http` process, a real broker, real `fleet agent`s.

One fleet per module (amqtt): the hub with its bridge on a free loopback port
and a bearer token, three agents labelled ``group=live`` whose scripts
directory holds ``record.sh`` (appends "<phase> <script> <args>" to the node's
``record.log``) and ``slow.sh`` (sleeps), one node that went offline, and one
node that trusts no key (it rejects every command). Tests run in file order
and each leaves the fleet idle: every rollout it starts ends in a final state.
A last test repeats a rollout and its rollback on mosquitto.

Figures (POST to "succeeded" for three agents) go to the JUnit properties and
the log; the assertions keep generous deadlines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.signing import generate_keypair
from tests.conftest import RunningBroker, free_port

pytestmark = pytest.mark.broker

_LOGGER = logging.getLogger(__name__)

TOKEN = "bridge-test-token-0123456789"  # noqa: S105
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE = 45.0  # generous: the machine is shared; figures are recorded separately
FINAL = {"succeeded", "halted", "rolled_back", "rollback_failed", "aborted"}
LIVE = ["web-1", "web-2", "web-3"]
GONE = "gone-1"
DOUBTER = "doubter-1"

SCRIPTS = {
    "record.sh": (
        '#!/bin/sh\necho "$FLEET_PHASE $(basename "$0") $*" >> "$FLEET_STATE_DIR/record.log"\necho "did $*"\n'
    ),
    "slow.sh": (
        "#!/bin/sh\n"
        'echo "$FLEET_PHASE $(basename "$0") $*" >> "$FLEET_STATE_DIR/record.log"\n'
        'sleep "${1:-60}" &\n'
        'echo "$!" > "$FLEET_STATE_DIR/slow.child"\n'
        "wait\n"
    ),
}

T = TypeVar("T")


def poll(get: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Call ``get`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def clean_env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**environ, "FLEET_NO_CONFIG_DISCOVERY": "1", "FLEET_LOG_LEVEL": "INFO"}


def fleet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


@dataclass
class Fleet:
    """A running hub with its HTTP bridge and agents, all child processes of the test."""

    broker: RunningBroker
    root: Path
    prefix: str
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    def state(self, node: str) -> Path:
        return self.root / f"state-{node}"

    def records(self, node: str) -> list[str]:
        path = self.state(node) / "record.log"
        return path.read_text().splitlines() if path.exists() else []

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, env={**clean_env(), **env}, cwd=self.root)
        self.procs[name] = proc
        return proc

    def start_hub(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key, self.pub = generate_keypair(self.root / "keys")
        self.scripts.mkdir(exist_ok=True)
        for name, text in SCRIPTS.items():
            (self.scripts / name).write_text(text)
            (self.scripts / name).chmod(0o755)
        self._spawn(
            "hub",
            fleet_argv(
                "hub",
                "--broker",
                self.broker.url,
                "--prefix",
                self.prefix,
                "--db",
                str(self.root / "hub.json"),
                "--signing-key",
                str(self.key),
                "--http",
                f"127.0.0.1:{self.port}",
                "--http-token",
                TOKEN,
                "--client-id",
                f"hub-{uuid.uuid4().hex[:8]}",
                "--heartbeat-s",
                "1",
            ),
        )
        with httpx.Client(base_url=self.base, timeout=5) as http:

            def healthy() -> bool | None:
                self.check_alive("hub")
                try:
                    return http.get("/api/health").status_code == 200 or None
                except httpx.TransportError:
                    return None

            poll(healthy, "the hub's HTTP bridge")

    def start_agent(
        self, node: str, *, trust: bool = True, labels: tuple[str, ...] = ("group=live",)
    ) -> None:
        argv = fleet_argv(
            "agent",
            "--broker",
            self.broker.url,
            "--prefix",
            self.prefix,
            "--node-id",
            node,
            "--state-dir",
            str(self.state(node)),
            "--scripts-dir",
            str(self.scripts),
            "--heartbeat-s",
            "1",
        )
        if trust:
            argv += ["--trust", str(self.pub)]
        for label in labels:
            argv += ["--label", label]
        # As deploy/fleet-agent.service runs it: without docstrings and asserts.
        self._spawn(node, argv, PYTHONOPTIMIZE="2")

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def wait_online(self, http: httpx.Client, nodes: list[str], online: bool = True) -> None:
        def ready() -> bool | None:
            for name in nodes:
                if online:
                    self.check_alive(name)
            table = {n["node"]: n for n in http.get("/api/nodes").json()}
            return all(table.get(n, {}).get("online") is online for n in nodes) or None

        poll(ready, f"{nodes} {'online' if online else 'offline'}")

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            with contextlib.suppress(ProcessLookupError):
                self.stop(name)


@contextlib.contextmanager
def running_fleet(broker: RunningBroker, root: Path) -> Iterator[Fleet]:
    fleet = Fleet(broker, root, f"fleet-t-{uuid.uuid4().hex[:10]}/v1")
    try:
        fleet.start_hub()
        yield fleet
    finally:
        fleet.stop_all()


@pytest.fixture(scope="module")
def fleet(amqtt_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(amqtt_broker, tmp_path_factory.mktemp("http-fleet")) as fleet:
        for node in LIVE:
            fleet.start_agent(node)
        fleet.start_agent(GONE, labels=("group=gone",))
        fleet.start_agent(DOUBTER, trust=False, labels=())
        with httpx.Client(base_url=fleet.base, headers=AUTH, timeout=10) as http:
            fleet.wait_online(http, [*LIVE, GONE, DOUBTER])
            fleet.stop(GONE)
            fleet.wait_online(http, [GONE], online=False)
        yield fleet


@pytest.fixture
def http(fleet: Fleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.base, headers=AUTH, timeout=30) as client:
        yield client


def spec(title: str, targets: Any = None, **step: Any) -> dict[str, Any]:
    """One step: ``record.sh TITLE``, undone by ``record.sh`` (step fields overridable)."""
    plan_step = {"type": "script", "name": "record.sh", "args": [title], "rollback": "record.sh", **step}
    return {"name": title, "targets": LIVE if targets is None else targets, "plan": [plan_step]}


def create(http: httpx.Client, body: dict[str, Any]) -> str:
    response = http.post("/api/updates", json=body)
    assert response.status_code == 202, response.text
    rollout: str = response.json()["rollout"]
    return rollout


def follow(
    http: httpx.Client, rollout: str, until: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """GET the rollout until ``until`` holds for it."""

    def look() -> dict[str, Any] | None:
        response = http.get(f"/api/rollouts/{rollout}")
        assert response.status_code == 200, response.text
        shown: dict[str, Any] = response.json()
        return shown if until(shown) else None

    return poll(look, f"rollout {rollout} {what}")


def final(http: httpx.Client, rollout: str) -> dict[str, Any]:
    return follow(http, rollout, lambda shown: shown["state"] in FINAL, "to end")


# ---------------------------------------------------------------------- status codes


def test_auth_health_docs_and_openapi(fleet: Fleet) -> None:
    with httpx.Client(base_url=fleet.base, timeout=10) as anonymous:
        for method, path in (
            ("GET", "/api/nodes"),
            ("GET", "/api/rollouts"),
            ("GET", "/api/rollouts/x"),
            ("POST", "/api/updates"),
            ("POST", "/api/rollouts/x/abort"),
            ("POST", "/api/rollouts/x/rollback"),
            ("GET", "/metrics"),
        ):
            for headers, reason in (({}, "missing"), ({"Authorization": "Bearer nope"}, "wrong")):
                response = anonymous.request(method, path, headers=headers, json=spec("never"))
                assert response.status_code == 401, (method, path, response.text)
                assert response.json() == {"detail": f"{reason} bearer token"}
                assert response.headers["www-authenticate"] == "Bearer"
        health = anonymous.get("/api/health")
        assert (health.status_code, health.json()) == (200, {"ok": True, "broker": "connected"})
        assert "swagger" in anonymous.get("/docs").text.lower()
        document = anonymous.get("/openapi.json").json()
        body = document["paths"]["/api/updates"]["post"]["requestBody"]["content"]["application/json"]
        assert body["examples"]
    with httpx.Client(base_url=fleet.base, headers=AUTH, timeout=10) as http:
        assert http.get("/api/rollouts").json() == []  # nothing was started by the refused calls


def test_nodes_pages_filters_and_total(http: httpx.Client) -> None:
    everyone = http.get("/api/nodes")
    assert everyone.status_code == 200
    names = [n["node"] for n in everyone.json()]
    assert names == sorted([*LIVE, GONE, DOUBTER])  # no parameters: every node, as before paging
    assert everyone.headers["x-total-count"] == "5"
    assert "link" not in everyone.headers
    pages: list[str] = []
    url: str | None = "/api/nodes?limit=2"
    while url is not None:
        page = http.get(url)
        assert page.status_code == 200, page.text
        assert page.headers["x-total-count"] == "5"
        assert len(page.json()) <= 2
        pages += [n["node"] for n in page.json()]
        link = page.headers.get("link")
        url = link[link.index("<") + 1 : link.index(">")] if link else None
    assert pages == names
    assert [n["node"] for n in http.get("/api/nodes", params={"node": "web-*"}).json()] == LIVE
    offline = http.get("/api/nodes", params={"state": "offline"})
    assert [n["node"] for n in offline.json()] == [GONE]
    assert offline.headers["x-total-count"] == "1"
    live = http.get("/api/nodes", params={"label": "group=live", "limit": 1, "offset": 1})
    assert [n["node"] for n in live.json()] == [LIVE[1]]
    assert live.headers["x-total-count"] == "3"
    assert http.get("/api/nodes", params={"version": "no-such-software"}).json() == []
    for bad in ({"limit": 0}, {"offset": -1}, {"state": "asleep"}, {"label": "novalue"}):
        response = http.get("/api/nodes", params=bad)
        assert response.status_code == 422, (bad, response.text)
    schema = http.get("/openapi.json").json()["paths"]["/api/nodes"]["get"]
    assert {"limit", "offset", "state", "node", "label", "version"} <= {
        p["name"] for p in schema["parameters"]
    }
    assert "X-Total-Count" in schema["responses"]["200"]["headers"]


def test_bad_input_status_codes(http: httpx.Client) -> None:
    response = http.post(
        "/api/updates", content=b'{"name": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["detail"].startswith("malformed JSON body")
    response = http.post("/api/updates", json=["web-1"])
    assert response.status_code == 422
    assert response.json()["detail"] == "(body): expected a RolloutSpec JSON object, got an array"
    bad_hash = {"type": "download", "url": "http://127.0.0.1/a", "sha256": "abc", "name": "a"}
    response = http.post("/api/updates", json={**spec("bad"), "plan": [bad_hash]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("plan.0.sha256: String should match pattern")
    assert response.json()["errors"] == [
        {"field": "plan.0.sha256", "message": response.json()["errors"][0]["message"]}
    ]
    response = http.post(
        "/api/updates", content=b"{" + b" " * (2 << 20) + b"}", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    unknown = "/api/rollouts/no-such-rollout"
    for method, path in (("GET", unknown), ("POST", f"{unknown}/abort"), ("POST", f"{unknown}/rollback")):
        response = http.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert "no-such-rollout" in response.json()["detail"]
    assert http.get("/api/rollouts").json() == []


def test_offline_and_unknown_targets_are_named_in_409(http: httpx.Client) -> None:
    response = http.post("/api/updates", json=spec("offline", [*LIVE, GONE]))
    assert response.status_code == 409
    assert response.json()["nodes"] == [GONE]
    assert GONE in response.json()["detail"]
    response = http.post("/api/updates", json=spec("unknown", ["web-1", "nobody-7", "nobody-8"]))
    assert response.status_code == 409
    assert response.json()["nodes"] == ["nobody-7", "nobody-8"]
    assert "nobody-7" in response.json()["detail"]
    assert http.get("/api/rollouts").json() == []
    nodes = {n["node"]: n for n in http.get("/api/nodes").json()}
    assert {"node", "online", "last_seen", "labels", "inventory", "job"} <= set(nodes[GONE])
    assert nodes[GONE]["online"] is False
    assert nodes["web-1"]["labels"] == {"group": "live"}
    assert all(nodes[n]["online"] for n in LIVE)


# ---------------------------------------------------------------------- rollouts


def test_full_rollout_over_http(
    fleet: Fleet, http: httpx.Client, record_property: Callable[..., None]
) -> None:
    started = time.monotonic()
    rollout = create(http, spec("full", {"labels": {"group": "live"}}))
    shown = final(http, rollout)
    took = time.monotonic() - started
    record_property("http_rollout_3_agents_s", round(took, 3))
    _LOGGER.info("HTTP-triggered rollout on 3 agents: POST to succeeded in %.3f s", took)
    assert shown["state"] == "succeeded", shown
    assert shown["counts"]["succeeded"] == 3
    assert {node: s["phase"] for node, s in shown["nodes"].items()} == dict.fromkeys(LIVE, "succeeded")
    assert shown["audit"], "the audit trail comes with the summary"
    assert all(entry["rollout"] == rollout for entry in shown["audit"])
    for node in LIVE:
        assert fleet.records(node) == ["apply record.sh full"]
    listed = http.get("/api/rollouts").json()
    assert [r["id"] for r in listed] == [rollout]
    assert listed[0]["state"] == "succeeded"
    # One engine behind both doors: the MQTT request path shows the same rollout.
    over_mqtt = subprocess.run(
        fleet_argv(
            "rollout", "--broker", fleet.broker.url, "--prefix", fleet.prefix, "show", rollout, "--json"
        ),
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert over_mqtt.returncode == 0, over_mqtt.stderr
    mqtt_view = json.loads(over_mqtt.stdout)
    for key in ("id", "name", "state", "counts", "nodes", "plan", "steps"):
        assert mqtt_view[key] == shown[key], key
    # Any unique prefix of the id names the rollout, over HTTP and over MQTT (the CLI prints 8).
    assert http.get(f"/api/rollouts/{rollout[:8]}").json()["id"] == rollout
    by_prefix = subprocess.run(
        fleet_argv("rollout", "--broker", fleet.broker.url, "--prefix", fleet.prefix, "show", rollout[:8]),
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert f"rollout {rollout}" in by_prefix.stdout.decode()
    assert http.get("/api/rollouts/zz-no-such").status_code == 404
    # The step grid comes from the hub's record, as GET /api/rollouts/ID serves it.
    assert shown["steps"] == {
        node: [{"index": 0, "type": "script", "state": "succeeded", "detail": ""}] for node in LIVE
    }


def test_per_node_parameters_are_checked_at_create_and_filled_in_by_each_node(
    fleet: Fleet, http: httpx.Client
) -> None:
    # DESIGN 3.10: {node} and {labels.NAME} resolved by each agent; unknown names refused (422).
    response = http.post("/api/updates", json=spec("bad", args=["{hostname}"]))
    assert response.status_code == 422
    assert "unknown variable {hostname}" in response.json()["detail"]
    response = http.post("/api/updates", json=spec("bad", args=["{labels.rack}"]))
    assert response.status_code == 422
    assert "web-1 has no rack" in response.json()["detail"]
    assert all(r["name"] != "bad" for r in http.get("/api/rollouts").json())  # nothing started
    # The dry run shows each node's values and starts nothing.
    plan = http.post(
        "/api/updates?dry_run=true",
        json=spec("per-node", args=["per-node", "{node}", "group={labels.group}"]),
    ).json()
    assert plan["dry_run"] is True
    for node in LIVE:
        assert plan["parameters"][node] == {
            "step 1 (script) args": json.dumps(["per-node", node, "group=live"])
        }
    rollout = create(http, spec("per-node", args=["per-node", "{node}", "group={labels.group}"]))
    assert final(http, rollout)["state"] == "succeeded"
    for node in LIVE:
        assert fleet.records(node)[-1] == f"apply record.sh per-node {node} group=live"


def test_rollback_of_a_succeeded_rollout_over_http(fleet: Fleet, http: httpx.Client) -> None:
    rollout = create(http, spec("undo-me"))
    assert final(http, rollout)["state"] == "succeeded"
    response = http.post(f"/api/rollouts/{rollout}/rollback")
    assert response.status_code == 202, response.text
    assert response.json()["rollout"] == rollout
    shown = final(http, rollout)
    assert shown["state"] == "rolled_back", shown
    for node in LIVE:
        assert fleet.records(node)[-2:] == ["apply record.sh undo-me", "rollback record.sh undo-me"]
    response = http.post(f"/api/rollouts/{rollout}/rollback")
    assert response.status_code == 409, response.text  # rolled back already: nothing to do


def test_abort_of_a_running_rollout_over_http(fleet: Fleet, http: httpx.Client) -> None:
    for node in LIVE:
        (fleet.state(node) / "slow.child").unlink(missing_ok=True)
    rollout = create(http, spec("stuck", name="slow.sh", args=["120"]))
    children = {
        node: poll(partial(_read_pid, fleet.state(node) / "slow.child"), f"{node} busy") for node in LIVE
    }
    assert http.get(f"/api/rollouts/{rollout}").json()["state"] == "running"
    response = http.post(f"/api/rollouts/{rollout}/abort")
    assert response.status_code == 202, response.text
    shown = final(http, rollout)
    assert shown["state"] == "rolled_back", shown
    for node, pid in children.items():
        poll(partial(_dead, pid), f"the sleep of {node} killed")
        assert fleet.records(node)[-2:] == ["apply slow.sh 120", "rollback record.sh 120"]


def test_a_rejected_command_and_the_metrics_families(fleet: Fleet, http: httpx.Client) -> None:
    rollout = create(http, spec("doubted", [DOUBTER]))
    shown = final(http, rollout)
    assert shown["nodes"][DOUBTER]["phase"] == "rejected", shown
    with httpx.Client(base_url=fleet.base, timeout=10) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    wanted = {
        "fleet_nodes",
        "fleet_rollouts",
        "fleet_step_duration_seconds",
        "fleet_hub_messages",
        "fleet_commands_rejected",
        "fleet_store_commit_seconds",
    }
    assert wanted <= set(families), wanted - set(families)

    def sample(name: str, family: str, **labels: str) -> float:
        (value,) = [
            s.value for s in families[family].samples if s.name == name and labels.items() <= s.labels.items()
        ]
        return value

    assert sample("fleet_nodes", "fleet_nodes", state="online") == len(LIVE) + 1
    assert sample("fleet_nodes", "fleet_nodes", state="offline") == 1
    states = [r["state"] for r in http.get("/api/rollouts").json()]
    assert states.count("succeeded") == 2  # full and per-node; undo-me and stuck are rolled_back
    for state in ("succeeded", "rolled_back", "running"):
        assert sample("fleet_rollouts", "fleet_rollouts", state=state) == states.count(state)
    assert sample("fleet_commands_rejected_total", "fleet_commands_rejected") >= 1
    assert sample("fleet_hub_messages_total", "fleet_hub_messages", direction="in") > 0
    assert sample("fleet_hub_messages_total", "fleet_hub_messages", direction="out") > 0
    steps = "fleet_step_duration_seconds"
    # full, per-node and undo-me succeeded on three nodes each; stuck was cut short on all three.
    assert sample(f"{steps}_count", steps, type="script", outcome="succeeded") == 9
    assert sample(f"{steps}_sum", steps, type="script", outcome="succeeded") > 0
    assert sample("fleet_store_commit_seconds", "fleet_store_commit_seconds") > 0


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _dead(pid: int) -> bool | None:
    """True once ``pid`` is gone (a zombie waiting for a reaper that may never come counts), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z" or None


# ---------------------------------------------------------------------- the hub process


def test_public_bind_without_token_and_a_busy_port(amqtt_broker: RunningBroker, tmp_path: Path) -> None:
    common = [
        "--broker",
        amqtt_broker.url,
        "--prefix",
        f"fleet-t-{uuid.uuid4().hex[:10]}/v1",
        "--db",
        str(tmp_path / "hub.json"),
        "--client-id",
        f"hub-{uuid.uuid4().hex[:8]}",
    ]
    public = subprocess.run(
        fleet_argv("hub", *common, "--http", f"0.0.0.0:{free_port()}"),  # refused before binding
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert public.returncode == 2
    lines = public.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "without a token" in lines[0]
    assert not (tmp_path / "hub.json").exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            fleet_argv("hub", *common, "--http", f"127.0.0.1:{port}", "--http-token", TOKEN),
            capture_output=True,
            env=clean_env(),
            timeout=60,
            check=False,
        )
    assert busy.returncode != 0
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in busy.stderr.decode()


def test_rollout_and_rollback_over_http_on_mosquitto(mosquitto_broker: RunningBroker, tmp_path: Path) -> None:
    nodes = ["m-1", "m-2"]
    with running_fleet(mosquitto_broker, tmp_path / "fleet") as fleet:
        for node in nodes:
            fleet.start_agent(node)
        with httpx.Client(base_url=fleet.base, headers=AUTH, timeout=30) as http:
            fleet.wait_online(http, nodes)
            rollout = create(http, spec("on-mosquitto", nodes))
            assert final(http, rollout)["state"] == "succeeded"
            assert http.post(f"/api/rollouts/{rollout}/rollback").status_code == 202
            assert final(http, rollout)["state"] == "rolled_back"
    for node in nodes:
        assert fleet.records(node) == ["apply record.sh on-mosquitto", "rollback record.sh on-mosquitto"]
