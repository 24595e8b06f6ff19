"""Plan before acting: the ``plan`` op, ``POST /api/updates?dry_run=true`` and ``fleet rollout plan``.

A real broker, the real hub service and real agents: each online target runs
the plan's pre-flight and answers per step; nothing runs, nothing is
journalled, no rollout starts, and the node's retained command stays what it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bus.messages import Command, decode
from bus.mqtt import MqttClient
from bus.topics import Topics
from edge_agent.preflight import run_preflight
from tests.conftest import RunningBroker
from tests.integration.live_fleet import RECORD_PLAN, LiveFleet, until
from tests.webfiles import Web

pytestmark = pytest.mark.broker

SLOW = """#!/bin/sh
echo "$FLEET_PHASE slow.sh" >> "$FLEET_STATE_DIR/record.log"
while [ ! -e "$FLEET_STATE_DIR/go" ]; do sleep 0.05; done
"""


def spec(targets: list[str], **changes: Any) -> dict[str, Any]:
    return {"name": "app 2.0", "targets": targets, "plan": RECORD_PLAN, **changes}


async def test_plan_checks_every_node_and_starts_nothing(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    lacking = tmp_path / "scripts-n2"
    lacking.mkdir()
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1 = await fleet.agent("n1")
        n2 = await fleet.agent("n2", scripts_dir=lacking)  # has no record.sh
        n3 = await fleet.agent("n3")
        await n3.stop()
        await fleet.wait_online("n3", online=False)
        body = {"spec": spec(["n1", "n2", "n3"], require_online=False), "preflight_timeout_s": 15}
        plan = await fleet.ask("plan", body)
        assert (plan["kind"], plan["dry_run"]) == ("plan", True)
        assert plan["ok"] is False
        assert plan["offline"] == ["n3"]
        assert plan["waves"] == [["n1", "n2", "n3"]]
        pre = plan["preflight"]
        assert (pre["asked"], pre["passed"], pre["failed"], pre["unanswered"]) == (2, 1, 1, 0)
        assert set(pre["nodes"]) == {"n1", "n2"}
        assert [c["type"] for c in pre["nodes"]["n1"]["checks"]] == ["script", "disk", "lock"]
        failed = pre["nodes"]["n2"]
        assert failed["state"] == "failed"
        assert failed["checks"][0]["state"] == "failed"
        assert "record.sh not found in the scripts directory" in failed["checks"][0]["detail"]
        assert any(p.startswith("n2: pre-flight failed") for p in plan["problems"])
        assert any("offline targets get their command when they return: n3" in w for w in plan["warnings"])
        # Nothing ran, nothing was journalled, no rollout exists.
        assert n1.records() == []
        assert await fleet.ask("list") == []
        journal = n1.state_dir / "journal.json"
        assert not journal.exists() or json.loads(journal.read_text())["seen"] == []
        # Fix n2 and plan again: good now (n3 is queued by require_online false).
        fleet.add_script("record.sh", (fleet.scripts / "record.sh").read_text(), lacking)
        again = await fleet.ask("plan", body)
        assert again["ok"] is True, again["problems"]
        assert again["preflight"]["passed"] == 2
        assert n2.records() == []


async def test_plan_beside_a_running_rollout_keeps_its_retained_command(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        fleet.add_script("slow.sh", SLOW)
        n1 = await fleet.agent("n1")
        slow = {"name": "slow", "targets": ["n1"], "plan": [{"type": "script", "name": "slow.sh"}]}
        rollout = (await fleet.ask("create_rollout", slow))["rollout"]
        await until(lambda: n1.records() == ["apply slow.sh"], "the slow script to start")
        plan = await fleet.ask("plan", spec(["n1"]))
        assert plan["ok"] is False
        assert plan["busy"] == ["n1"]
        checks = {c["type"]: c for c in plan["preflight"]["nodes"]["n1"]["checks"]}
        assert checks["busy"]["detail"] == f"busy with rollout {rollout}: an apply now would be refused"
        # The broker still holds the rollout's apply as n1's retained command.
        async with MqttClient(broker.url) as probe:
            await probe.subscribe(topics.node("n1", "cmd"))
            message = await asyncio.wait_for(anext(aiter(probe.messages())), 10)
            retained = decode(Command, message.payload)
            assert (message.retain, retained.action, retained.rollout) == (True, "apply", rollout)
        (n1.state_dir / "go").touch()
        await fleet.wait_state(rollout, "succeeded")
        assert n1.records() == ["apply slow.sh"]


async def test_download_urls_are_probed_from_the_node(
    broker: RunningBroker, topics: Topics, tmp_path: Path, web: Web
) -> None:
    body = b"payload"
    good = web.add("/app.tar", body)
    missing = f"{good.rsplit('/', 1)[0]}/missing.tar"
    steps = [
        {
            "type": "download",
            "url": good,
            "sha256": hashlib.sha256(body).hexdigest(),
            "name": "app.tar",
            "max_bytes": 4096,
        },
        {"type": "download", "url": missing, "sha256": "0" * 64, "name": "other.tar"},
    ]
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        await fleet.agent("n1")
        plan = await fleet.ask("plan", {"name": "fetch", "targets": ["n1"], "plan": steps})
        checks = plan["preflight"]["nodes"]["n1"]["checks"]
        states = [(c["index"], c["state"]) for c in checks]
        assert states == [(0, "succeeded"), (1, "failed"), (-1, "succeeded"), (-1, "succeeded")]
        assert "answers HTTP 200; at most 0.0 MiB" in checks[0]["detail"]
        assert checks[1]["detail"] == f"HTTP 404 from {missing}"
        assert "(+1 of unknown size)" in checks[2]["detail"]
        assert plan["ok"] is False


async def test_a_node_that_does_not_trust_the_hub_rejects_the_preflight(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    from bus.signing import generate_keypair

    _other_key, other_pub = generate_keypair(tmp_path / "other-keys")
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        await fleet.agent("n1", trust=[other_pub])
        plan = await fleet.ask("plan", spec(["n1"]))
        node = plan["preflight"]["nodes"]["n1"]
        assert node["state"] == "rejected"
        assert "signature" in node["detail"]
        assert plan["ok"] is False


async def test_http_dry_run_and_the_cli_plan(broker: RunningBroker, topics: Topics, tmp_path: Path) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1 = await fleet.agent("n1")
        async with fleet.http() as http:
            response = await http.post("/api/updates", params={"dry_run": "true"}, json=spec(["n1"]))
            assert response.status_code == 200, response.text
            plan = response.json()
            assert (plan["kind"], plan["dry_run"], plan["ok"]) == ("plan", True, True)
            assert plan["notice"].startswith("PLAN ONLY")
            bad = await http.post("/api/updates", params={"dry_run": "true"}, json=spec(["n1", "ghost"]))
            assert bad.status_code == 200
            assert bad.json()["unknown"] == ["ghost"]
            assert (await http.get("/api/rollouts")).json() == []
        path = tmp_path / "rollout.json"
        path.write_text(json.dumps(spec(["n1"])))
        target = ["--broker", broker.url, "--prefix", topics.prefix]
        code, out, err = await fleet_cli("rollout", *target, "plan", str(path))
        assert code == 0, err
        assert out.splitlines()[0] == "PLAN (dry run) of app 2.0: nothing was started"
        assert "preflight 1 passed, 0 failed, 0 did not answer (of 1 online)" in out
        path.write_text(json.dumps(spec(["n1"], plan=[{"type": "script", "name": "absent.sh"}])))
        code, out, _err = await fleet_cli("rollout", *target, "plan", str(path), "--json")
        assert code == 1
        shown = json.loads(out)
        assert shown["ok"] is False
        assert "absent.sh" in shown["preflight"]["nodes"]["n1"]["detail"]
        assert n1.records() == []


async def fleet_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


needs_apt = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb")),
    reason="needs apt-get and dpkg",
)


@needs_apt
def test_package_simulation_with_real_apt_and_dpkg(tmp_path: Path) -> None:
    from tests.integration.test_package_apt import apt_world
    from tests.integration.test_package_dpkg import cache, deb_settings

    world, _repo = apt_world(tmp_path, ["1.0", "2.0"])
    tools = world.tools
    subprocess.run(
        [tools.apt_get, *tools.apt_args(), "update"], env=tools.environ(), check=True, capture_output=True
    )
    settings = deb_settings(tmp_path, tools)
    status_before = (tools.admindir / "status").read_bytes()
    deb = cache(settings, world.deb("2.0"))
    from pydantic import TypeAdapter

    from bus.messages import Step

    steps = TypeAdapter(list[Step]).validate_python(
        [
            {"type": "package", "manager": "apt", "name": world.name, "version": "2.0"},
            {"type": "package", "manager": "apt", "name": world.name, "version": "9.9"},
            {"type": "package", "manager": "dpkg", "name": world.name, "version": "2.0", "src": deb},
        ]
    )
    checks = asyncio.run(run_preflight(steps, settings))
    assert [c.state for c in checks] == ["succeeded", "skipped", "succeeded", "succeeded"]
    assert checks[0].detail.startswith(f"apt-get simulation ok: Inst {world.name} (2.0")
    assert "apt does not know" in checks[1].detail
    assert checks[2].detail.startswith("dpkg simulation ok")
    # Nothing was installed.
    assert world.state() is None
    assert (tools.admindir / "status").read_bytes() == status_before


def test_systemd_units_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import TypeAdapter

    from bus.messages import Step
    from edge_agent.settings import ExecutorSettings
    from tests.integration.test_managers import install_fakes

    fake = install_fakes(monkeypatch, tmp_path)
    fake.write("systemd.json", {"units": {"app.service": {"state": "active"}}})
    settings = ExecutorSettings(
        node="n1",
        state_dir=tmp_path / "state",
        scripts_dir=tmp_path,
        service_manager="systemd",
        tools=fake.tools(),
    )
    steps = TypeAdapter(list[Step]).validate_python(
        [
            {"type": "service", "action": "restart", "name": "app"},
            {"type": "service", "action": "restart", "name": "ghost"},
        ]
    )
    checks = asyncio.run(run_preflight(steps, settings))
    assert [(c.state, c.detail) for c in checks[:2]] == [
        ("succeeded", "systemd knows app"),
        ("failed", "systemd has no unit ghost: Unit ghost.service could not be found."),
    ]
    assert fake.read("systemd.json")["units"] == {"app.service": {"state": "active"}}  # nothing restarted
