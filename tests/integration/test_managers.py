"""systemd and docker service managers, the service step on them and the systemd health check.

systemd (as PID 1) and a Docker daemon cannot run here: the tests put the fakes of
tests/fakes/bin first on PATH (see tests/fakes/README.md). The helpers at the top
are shared with the container, module and package tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bus.errors import StepError
from bus.messages import ServiceStep
from edge_agent import managers, versions
from edge_agent.managers import DockerManager, SystemdManager, check_systemd
from edge_agent.settings import ExecutorSettings, Policy, ServiceManager
from edge_agent.steps.base import Phase, StepContext
from edge_agent.tools import SystemTools

FAKE_BIN = Path(__file__).resolve().parents[1] / "fakes" / "bin"

# ------------------------------------------------------------------ shared helpers


@dataclass(frozen=True)
class ToolSettings(ExecutorSettings):
    """ExecutorSettings with the ``tools`` field the agent's settings are getting."""

    tools: SystemTools = field(default_factory=SystemTools)


@dataclass
class Calls:
    logs: list[str] = field(default_factory=list)
    output: list[tuple[str, str]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def make_ctx(
    settings: ExecutorSettings,
    *,
    phase: Phase = "apply",
    index: int = 0,
    command: str = "cmd-1",
    timeout: float = 60.0,
) -> tuple[StepContext, Calls]:
    calls = Calls()

    async def log(line: str) -> None:
        calls.logs.append(line)

    async def output(stream: str, line: str) -> None:
        calls.output.append((stream, line))

    async def checkpoint(record: dict[str, Any]) -> None:
        calls.checkpoints.append(json.loads(json.dumps(record)))  # what the journal would hold

    ctx = StepContext(
        node="node-1",
        rollout="r1",
        command=command,
        index=index,
        phase=phase,
        settings=settings,
        timeout=timeout,
        log=log,
        output=output,
        checkpoint=checkpoint,
    )
    return ctx, calls


@dataclass
class FakeSystem:
    """The state directory of the fakes, and what was called."""

    state: Path

    def read(self, name: str) -> dict[str, Any]:
        path = self.state / name
        return json.loads(path.read_text()) if path.exists() else {}

    def write(self, name: str, data: dict[str, Any]) -> None:
        (self.state / name).write_text(json.dumps(data))

    def calls(self, tool: str | None = None) -> list[list[str]]:
        path = self.state / "calls.log"
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [c[1:] for c in found if tool is None or c[0] == tool]

    def tools(self, **changes: Any) -> SystemTools:
        return SystemTools(
            sys_module=self.state / "sys" / "module", proc_modules=self.state / "proc" / "modules", **changes
        )

    def settings(
        self,
        tmp_path: Path,
        *,
        manager: ServiceManager = "process",
        policy: Policy | None = None,
        **tools: Any,
    ) -> ToolSettings:
        state = tmp_path / "agent-state"
        state.mkdir(exist_ok=True)
        return ToolSettings(
            node="node-1",
            state_dir=state,
            scripts_dir=tmp_path,
            service_manager=manager,
            policy=policy or Policy(),
            tools=self.tools(**tools),
        )


def install_fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystem:
    """Put the fakes first on PATH with a fresh state directory."""
    state = tmp_path / "fake-state"
    state.mkdir()
    # The fakes' "#!/usr/bin/env python3" finds this interpreter first (no slow version-manager shim).
    path = [str(FAKE_BIN), str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.setenv("FLEET_FAKE_STATE", str(state))
    return FakeSystem(state)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystem:
    system = install_fakes(monkeypatch, tmp_path)
    system.write(
        "systemd.json",
        {
            "units": {
                "app.service": {"state": "active"},
                "idle.service": {"state": "inactive"},
                "broken.service": {"state": "inactive", "fail_start": True},
            }
        },
    )
    system.write("docker.json", {"registry": {"web:1": {"env": ["PATH=/bin", "MODE=prod"]}}})
    return system


def _units(fake: FakeSystem) -> dict[str, str]:
    return {name: spec["state"] for name, spec in fake.read("systemd.json")["units"].items()}


# ------------------------------------------------------------------------ systemd


async def test_systemd_manager_drives_systemctl(fake: FakeSystem) -> None:
    manager = SystemdManager(fake.tools())
    assert await manager.is_active("app", timeout=10)
    assert await manager.state("idle.service", timeout=10) == "inactive"
    await manager.stop("app", timeout=10)
    assert await manager.state("app", timeout=10) == "inactive"
    await manager.restart("idle", timeout=10)
    assert _units(fake) == {"app.service": "inactive", "idle.service": "active", "broken.service": "inactive"}
    assert fake.calls("systemctl")[:3] == [
        ["is-active", "app"],
        ["is-active", "idle.service"],
        ["stop", "app"],
    ]


async def test_systemd_errors_carry_systemctls_message(fake: FakeSystem) -> None:
    manager = SystemdManager(fake.tools())
    with pytest.raises(StepError, match=r"Unit nosuch.service not found\.") as missing:
        await manager.start("nosuch", timeout=10)
    assert "exit 5" in missing.value.reason
    with pytest.raises(StepError, match=r"Job for broken.service failed"):
        await manager.start("broken", timeout=10)
    assert _units(fake)["broken.service"] == "failed"
    with pytest.raises(StepError, match="not a systemd unit name"):
        await manager.stop("-H", timeout=10)
    assert ["stop", "-H"] not in fake.calls("systemctl")


async def test_systemd_state_fails_without_a_running_systemd(fake: FakeSystem, tmp_path: Path) -> None:
    # What the real systemctl says in a container without systemd as PID 1.
    script = tmp_path / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'System has not been booted with systemd as init system (PID 1). Can'\"'\"'t operate.' >&2\n"
        "echo 'Failed to connect to bus: Host is down' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    with pytest.raises(StepError, match="Failed to connect to bus"):
        await SystemdManager(SystemTools(systemctl=str(script))).state("app", timeout=10)


async def test_service_step_on_systemd_and_its_undo_restore_the_active_state(
    fake: FakeSystem, tmp_path: Path
) -> None:
    settings = fake.settings(tmp_path, manager="systemd")
    stop = ServiceStep(action="stop", name="app")
    start = ServiceStep(action="start", name="idle")
    restart = ServiceStep(action="restart", name="idle")
    assert managers.check(stop, settings) is None
    ctx, calls = make_ctx(settings)

    stopped = await managers.apply(stop, ctx)
    started = await managers.apply(start, ctx)
    assert (stopped, started) == (
        {"manager": "systemd", "was_active": True},
        {"manager": "systemd", "was_active": False},
    )
    assert calls.checkpoints == [stopped, started]
    assert _units(fake)["app.service"] == "inactive"
    assert _units(fake)["idle.service"] == "active"

    undo_ctx, _ = make_ctx(settings, phase="rollback")
    await managers.undo(start, undo_ctx, started)
    await managers.undo(stop, undo_ctx, stopped)
    assert _units(fake) == {"app.service": "active", "idle.service": "inactive", "broken.service": "inactive"}
    # Idempotent: a second undo (after an agent restart) changes nothing.
    before = len(fake.calls("systemctl"))
    await managers.undo(start, undo_ctx, started)
    await managers.undo(stop, undo_ctx, stopped)
    assert [c[0] for c in fake.calls("systemctl")[before:]] == ["is-active", "is-active"]

    # restart of a stopped unit: undo stops it again.
    record = await managers.apply(restart, ctx)
    await managers.undo(restart, undo_ctx, record)
    assert _units(fake)["idle.service"] == "inactive"


async def test_service_step_intake_checks(fake: FakeSystem, tmp_path: Path) -> None:
    settings = fake.settings(tmp_path, manager="systemd", policy=Policy(services=["app*"]))
    assert managers.check(ServiceStep(action="stop", name="app"), settings) is None
    refused = managers.check(ServiceStep(action="stop", name="sshd"), settings)
    assert refused == "service sshd is not allowed by this node's policy"
    missing = fake.settings(tmp_path, manager="docker", docker=str(tmp_path / "no-docker"))
    assert managers.check(ServiceStep(action="stop", name="app"), missing) == (
        f"{tmp_path / 'no-docker'} is not installed on this node"
    )
    process = fake.settings(tmp_path)
    assert managers.check(ServiceStep(action="stop", name="app"), process) == (
        "service manager process is not supported by this agent"
    )


async def test_failed_start_fails_the_step_with_systemds_words(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, calls = make_ctx(fake.settings(tmp_path, manager="systemd"))
    step = ServiceStep(action="start", name="broken")
    with pytest.raises(StepError, match=r'See "systemctl status broken.service"'):
        await managers.apply(step, ctx)
    assert calls.checkpoints == [{"manager": "systemd", "was_active": False}]
    await managers.undo(step, ctx, calls.checkpoints[-1])
    assert fake.calls("systemctl")[-1] == ["is-active", "broken"]  # failed is not active: nothing to stop


async def test_undo_clears_systemds_start_limit_first(fake: FakeSystem, tmp_path: Path) -> None:
    # systemd's default: 5 starts within 10 s, then "attempted too often" (issue 24).
    units = fake.read("systemd.json")
    units["units"]["web.service"] = {"state": "active", "start_limit_burst": 2, "start_limit_interval_s": 60}
    fake.write("systemd.json", units)
    settings = fake.settings(tmp_path, manager="systemd")
    ctx, _ = make_ctx(settings)
    restart = ServiceStep(action="restart", name="web")
    await managers.apply(restart, ctx)
    record = await managers.apply(restart, ctx)  # two starts: the limit is reached
    with pytest.raises(StepError) as limited:
        await managers.apply(restart, ctx)
    assert limited.value.reason == (
        "systemctl restart web: web hit systemd's start limit (start attempted too often); "
        "'systemctl reset-failed web' clears it"
    )
    assert _units(fake)["web.service"] == "failed"

    undo_ctx, undo_calls = make_ctx(settings, phase="rollback")
    await managers.undo(restart, undo_ctx, record)
    assert _units(fake)["web.service"] == "active"
    assert fake.calls("systemctl")[-4:] == [
        ["is-active", "web"],
        ["reset-failed", "web"],
        ["restart", "web"],
        ["is-active", "web"],  # it runs after the restart
    ]
    assert "systemd: reset-failed web (a fast update and undo may reach its start limit)" in undo_calls.logs


async def test_systemd_health_check(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, _ = make_ctx(fake.settings(tmp_path))
    assert await check_systemd("app.service", ctx) is None
    assert await check_systemd("idle", ctx) == "unit idle is inactive"
    assert await check_systemd("../etc", ctx) == "'../etc' is not a systemd unit name"
    assert managers.check_unit_name("getty@tty1.service") is None


async def test_service_state_for_the_inventory(fake: FakeSystem) -> None:
    tools = fake.tools()
    assert await versions.service_state("app", "systemd", tools) == "active"
    assert await versions.service_state("web", "docker", tools) == "absent"


# ------------------------------------------------------------------------- docker


async def test_docker_manager_starts_stops_and_reports(fake: FakeSystem, tmp_path: Path) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(["--name", "web", "-p", "8080:80", "web:1"], start=True, timeout=10)
    assert await docker.is_active("web", timeout=10)
    await docker.stop("web", timeout=10)
    assert not await docker.is_active("web", timeout=10)
    assert await docker.state("web", timeout=10) == "exited"
    await docker.restart("web", timeout=10)
    assert await docker.is_active("web", timeout=10)
    assert not await docker.is_active("nosuch", timeout=10)
    with pytest.raises(StepError, match="No such container: nosuch"):
        await docker.start("nosuch", timeout=10)
    assert ["container", "inspect", "-f", "{{.State.Running}}", "web"] in fake.calls("docker")


async def test_service_step_on_docker_restores_the_run_state(fake: FakeSystem, tmp_path: Path) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(["--name", "web", "web:1"], start=True, timeout=10)
    ctx, _ = make_ctx(fake.settings(tmp_path, manager="docker"))
    step = ServiceStep(action="stop", name="web")
    record = await managers.apply(step, ctx)
    assert record == {"manager": "docker", "was_active": True}
    assert not await docker.is_active("web", timeout=10)
    await managers.undo(step, ctx, record)
    assert await docker.is_active("web", timeout=10)
    with pytest.raises(StepError, match="No such container: gone"):
        await managers.apply(ServiceStep(action="start", name="gone"), ctx)


# ------------------------------------------------------------------- the fakes


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["systemctl", "frobnicate", "app"], 1, "Unknown command verb frobnicate."),
        (["systemctl", "start"], 1, "Too few arguments."),
        (["systemctl", "--bogus", "start", "app"], 1, "systemctl: unrecognized option '--bogus'"),
        (["docker", "run", "-d", "--bogus", "web:1"], 125, "unknown flag: --bogus"),
        (["docker", "run", "-d", "--name", "x", "-p", "http:80", "web:1"], 125, "invalid containerPort"),
        (["docker", "rm", "nosuch"], 1, "Error response from daemon: No such container: nosuch"),
        (["docker", "inspect", "nosuch"], 1, "Error: No such object: nosuch"),
        (["docker", "frob"], 1, "docker: 'frob' is not a docker command."),
        (["yum", "install", "fleet-app"], 1, "Operation aborted."),
        (["yum", "frob"], 1, "No such command: frob."),
        (["rpm", "-q", "fleet-app"], 1, "package fleet-app is not installed"),
        (["modprobe"], 1, "modprobe: ERROR: missing parameters. See -h."),
        (["modinfo", "-F", "version", "nosuch"], 1, "modinfo: ERROR: Module nosuch not found."),
    ],
)
def test_fakes_reject_bad_arguments_like_the_real_tools(
    fake: FakeSystem, argv: list[str], code: int, message: str
) -> None:
    fake.write("rpm.json", {"repo": {"fleet-app": ["1.0-1"]}, "installed": {}})
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == code
    assert message in result.stdout + result.stderr
    assert fake.calls(argv[0])[-1] == argv[1:]


def test_fake_docker_keeps_a_running_container_from_removal(fake: FakeSystem) -> None:
    def docker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", *args], capture_output=True, text=True, check=False, timeout=30)

    assert docker("run", "-d", "--name", "web", "web:1").returncode == 0
    refused = docker("rm", "web")
    assert refused.returncode == 1
    assert "container is running: stop the container before removing or force remove" in refused.stderr
    assert docker("inspect", "-f", "{{.State.Running}} {{json .Config.Env}}", "web").stdout == (
        'true ["PATH=/bin", "MODE=prod"]\n'
    )
    assert docker("rm", "-f", "web").returncode == 0
