"""An agent killed -9 in the middle of each step type: restored from its journal, accounted for by the hub.

Each test runs a real hub and one real agent. The plan changes part ``a``
(``part.sh``), then runs the step type under test (made slow enough to be
caught in the act), then would change part ``b``. The agent is killed -9 while
that step runs, which the hub sees as a node gone offline mid-job (a failure:
coordinated rollback, DESIGN 3.4). The agent is started again on the same state
dir: it finishes the interrupted step's undo from its journal (DESIGN 3.6), then
takes the hub's retained abort. The rollout must end ``rolled_back`` with the
node wholly back on its old version and nothing left half-written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from edge_agent import system
from edge_agent.steps import HANDLERS
from tests.conftest import RunningBroker, free_port
from tests.fault.conftest import Fleet, Proc, SlowWeb, observing

_LOGGER = logging.getLogger(__name__)

NODE = "k1"
BIG = 24 * 1024 * 1024  # the file step's copy must take a moment


@dataclass
class Scenario:
    """The steps around the one under test, and what "restored" means for it."""

    steps: list[dict[str, Any]]
    check: Callable[[Path], None]
    config: str = ""
    setup: Callable[[Path], None] = lambda _state: None
    kill_within_s: float = 0.3  # the kill lands this long (at most) after the step's "running"
    #: Or, for a quick step: the kill lands as soon as this sees the step's work in progress.
    caught: Callable[[Path], bool] | None = None
    env: dict[str, str] | None = None  # of the agent (fakes of system tools)


def _no_temp_files(directory: Path, *names: str) -> None:
    if not directory.exists():
        return
    left = [p.name for p in directory.iterdir() if any(p.name.startswith(f".{n}.") for n in names)]
    assert not left, f"half-written files left in {directory}: {left}"


def script_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    def check(state: Path) -> None:
        record = _step_record(state, 1)
        scope = record.get("scope")
        assert isinstance(scope, str), record  # journalled before the script is started
        assert not system.StepScope(scope).members(), "a process of the interrupted script still runs"
        pid, started = record.get("pid"), record.get("pid_started")
        runs = Counter(row[0] for row in fleet.records(NODE) if row[2] == "slow")
        if pid is None:  # the kill landed between the start and its pid's journal write
            assert runs["rollback"] == 1, runs
            assert runs["apply"] <= 1, runs
            return
        assert isinstance(pid, int), record
        assert isinstance(started, str), record
        assert not system._is_alive(pid, started), "the interrupted script still runs"
        assert runs == {"apply": 1, "rollback": 1}, runs

    step = {"type": "script", "name": "slow.sh", "args": ["60"], "rollback": "slow.sh"}
    return Scenario([step], check)


def download_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    url, sha = web.add("/big.bin", os.urandom(4 * 1024 * 1024), delay_s=0.05)  # about 3 s

    def check(state: Path) -> None:
        cache = state / "cache"
        assert not (cache / "big.bin").exists()
        _no_temp_files(cache, "big.bin")

    return Scenario([{"type": "download", "url": url, "sha256": sha, "name": "big.bin"}], check)


def file_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    url, sha = web.add("/conf.bin", os.urandom(BIG))

    def setup(state: Path) -> None:
        (state / "conf.bin").write_text("old config\n")

    def check(state: Path) -> None:
        assert (state / "conf.bin").read_text() == "old config\n"
        _no_temp_files(state, "conf.bin")

    steps = [
        {"type": "download", "url": url, "sha256": sha, "name": "conf-new"},
        {"type": "file", "src": "conf-new", "dest": "conf.bin", "mode": "0644"},
    ]

    def copying(state: Path) -> bool:
        return any(state.glob(".conf.bin.fleet-*.tmp"))

    return Scenario(steps, check, setup=setup, caught=copying)


def health_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    closed = free_port()
    step = {
        "type": "health", "check": "tcp", "target": f"127.0.0.1:{closed}", "retries": 100,
        "verify": "skip",  # nothing ever listens there: it cannot show a restore either
        "interval_s": 0.2, "timeout_s": 120,
    }  # fmt: skip
    return Scenario([step], lambda _state: None)


STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(1)\n"
)


def service_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    config = f"[agent.services.stubborn]\ncommand = {json.dumps([sys.executable, '-c', STUBBORN])}\n"

    def check(state: Path) -> None:
        # The stop was interrupted in its SIGTERM grace: the undo leaves the service running.
        assert system.service_pid(state, "stubborn") is not None, "the service is not running"

    return Scenario([{"type": "service", "action": "stop", "name": "stubborn"}], check, config=config)


ROOT = Path(__file__).resolve().parents[2]
FAKE_BIN = ROOT / "tests" / "fakes" / "bin"


def _fakes(fleet: Fleet, slow: dict[str, str]) -> dict[str, str]:
    """The environment that puts tests/fakes first on PATH, behind wrappers that make one
    subcommand of a tool slow *after* it did its work (the agent dies before it can record it).
    """
    slowbin = fleet.root / "slowbin"
    slowbin.mkdir(exist_ok=True)
    for tool, verb in slow.items():
        wrapper = slowbin / tool
        wrapper.write_text(
            "#!/bin/sh\n"
            f'"{FAKE_BIN / tool}" "$@"; code=$?\n'
            f'case " $* " in *" {verb} "*) sleep 3;; esac\n'
            "exit $code\n"
        )
        wrapper.chmod(0o755)
    state = fleet.root / "fake-state"
    state.mkdir(exist_ok=True)
    path = [str(slowbin), str(FAKE_BIN), str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
    return {"PATH": os.pathsep.join(path), "FLEET_FAKE_STATE": str(state)}


def _tool(env: dict[str, str], *argv: str) -> str:
    result = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result.stdout.strip()


def _called(state: Path, tool: str, verb: str) -> bool:
    log = state / "calls.log"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return any(call[0] == tool and verb in call[1:] for call in calls)


def container_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    env = _fakes(fleet, {"docker": "run"})
    state = Path(env["FLEET_FAKE_STATE"])
    (state / "docker.json").write_text(json.dumps({"registry": {"web:1": {}, "web:2": {}}}))
    _tool(env, "docker", "run", "-d", "--name", "web", "-e", "MODE=prod", "web:1")
    old_id = _tool(env, "docker", "image", "inspect", "-f", "{{.Id}}", "web:1")

    def check(_state: Path) -> None:
        assert _tool(env, "docker", "inspect", "-f", "{{.Image}}", "web") == old_id
        assert _tool(env, "docker", "inspect", "-f", "{{.State.Running}}", "web") == "true"
        assert "MODE=prod" in _tool(env, "docker", "inspect", "-f", "{{json .Config.Env}}", "web")

    step = {"type": "container", "name": "web", "image": "web:2"}
    # Killed once the new container runs, before the agent could record it.
    return Scenario([step], check, env=env, caught=lambda _state: _called(state, "docker", "run"))


def package_scenario(fleet: Fleet, web: SlowWeb) -> Scenario:
    """The real dnf in a throwaway install root (tests/integration/test_package_dnf.py)."""
    from tests.integration.test_package_dnf import MISSING, NAME, build_rpms, rpm_world

    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)} (Debian: dnf, rpm, createrepo-c)")
    (fleet.root / "rpmbuild").mkdir()
    world = rpm_world(fleet.root / "rpm", build_rpms(fleet.root / "rpmbuild"), "1.0", "2.0")
    world.install_by_hand("1.0")
    installed = fleet.root / "dnf-installed"
    slowbin = fleet.root / "slowbin"
    slowbin.mkdir(exist_ok=True)
    dnf = shutil.which("dnf")
    # dnf installs 2.0 for real (exit 0), then lingers: the agent is killed before it could record it.
    (slowbin / "dnf").write_text(
        "#!/bin/sh\n"
        f'"{dnf}" "$@"; code=$?\n'
        f'case " $* " in *" install {NAME}-2.0 "*) [ $code -eq 0 ] && touch "{installed}"; sleep 3;; esac\n'
        "exit $code\n"
    )
    (slowbin / "dnf").chmod(0o755)
    env = {
        "PATH": os.pathsep.join([str(slowbin), os.environ.get("PATH", os.defpath)]),
        "FLEET_RPM_ROOT": str(world.root),
        "FLEET_DNF_CONFIG": str(world.config),
    }

    def check(_state: Path) -> None:
        assert (world.state(), world.version_file()) == ("1.0-1", "1.0")

    step = {"type": "package", "manager": "dnf", "name": NAME, "version": "2.0"}
    return Scenario([step], check, env=env, caught=lambda _state: installed.exists())


SCENARIOS: dict[str, Callable[[Fleet, SlowWeb], Scenario]] = {
    "container": container_scenario,
    "package": package_scenario,
    "script": script_scenario,
    "download": download_scenario,
    "file": file_scenario,
    "health": health_scenario,
    "service": service_scenario,
}


def _journal(state: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state / "journal.json").read_text())
    return data


def _step_record(state: Path, index: int) -> dict[str, Any]:
    (entry,) = _journal(state)["applies"].values()
    record: dict[str, Any] = entry["steps"][index]["record"] or {}
    return record


def test_every_registered_step_type_has_a_crash_scenario() -> None:
    missing = sorted(set(HANDLERS) - set(SCENARIOS) - {"module"})  # module: the test below
    assert not missing, f"step types without an agent-crash scenario in {__name__}: {missing}"


async def _start_service(state: Path, config: str) -> None:
    if "stubborn" not in config:
        return
    await system.start_service(
        "stubborn", argv=[sys.executable, "-c", STUBBORN], cwd=state, env=dict(os.environ), state_dir=state
    )


@pytest.mark.parametrize("step_type", sorted(SCENARIOS))
async def test_agent_killed_mid_step_is_restored_and_accounted_for(
    step_type: str,
    amqtt_broker: RunningBroker,
    topics: Topics,
    make_fleet: Any,
    slow_web: SlowWeb,
    rng: random.Random,
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    scenario = SCENARIOS[step_type](fleet, slow_web)
    state = fleet.prepare_node(NODE)
    scenario.setup(state)
    extra: list[str] = []
    if scenario.config:
        (fleet.root / "agent.toml").write_text(scenario.config)
        extra = ["--config", str(fleet.root / "agent.toml")]
        await _start_service(state, scenario.config)
    index = len(scenario.steps)  # the step under test: the last of the scenario's, after part a
    plan = [
        {"type": "script", "name": "part.sh", "args": ["a", "v1"], "rollback": "part.sh"},
        *scenario.steps,
        {"type": "script", "name": "part.sh", "args": ["b", "v1"], "rollback": "part.sh"},
    ]
    async with observing(amqtt_broker.url, topics) as observer:
        fleet.start_hub()
        fleet.start_agent(NODE, *extra, env=scenario.env)
        await observer.hub_ready(0)
        await observer.online([NODE])
        body = await observer.ok(
            "create_rollout", {"name": f"crash in {step_type}", "targets": [NODE], "plan": plan}
        )
        rollout = body["rollout"]
        await observer.status(rollout, "running", index=index)
        if scenario.caught is not None:
            await _poll(lambda: scenario.caught(state), 0.005, 30.0)  # type: ignore[misc]
        else:
            await asyncio.sleep(rng.uniform(0.0, scenario.kill_within_s))
        fleet.agents[NODE].kill()
        steps = [s["state"] for s in next(iter(_journal(state)["applies"].values()))["steps"]]
        in_step = steps[index] == "running"
        _LOGGER.info("%s: killed with the journal at %s", step_type, steps)
        assert in_step, f"the kill missed the {step_type} step: {steps}"
        fleet.start_agent(NODE, *extra, env=scenario.env)
        summary = await observer.final(rollout)
        context = f"{summary}\n{fleet.logs()}"
        assert summary.state == "rolled_back", context
        assert summary.nodes[NODE].phase == "rolled_back", context
        assert fleet.parts(NODE) == {"a": "v0", "b": "v0"}, context
        runs = Counter((row[0], row[2]) for row in fleet.records(NODE) if row[2] in ("a", "b"))
        applied = {part for phase, part in runs if phase == "apply"}
        assert all(count == 1 for count in runs.values()), f"a step ran twice: {runs}"
        assert "a" in applied, runs
        assert applied == {part for phase, part in runs if phase == "rollback"}, runs
        if in_step:
            assert applied == {"a"}, runs
        journal = _journal(state)
        assert journal["active"] is None, journal
        (entry,) = journal["applies"].values()
        assert entry["phase"] == "rolled_back", entry
        scenario.check(state)
        # The node's own account: the interrupted step failed as "interrupted", the rest undone.
        job = observer.jobs[NODE]
        assert job.phase == "rolled_back", job


async def _poll(check: Callable[[], bool], period: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the step's work was never seen in progress"
        await asyncio.sleep(period)


async def test_runner_killed_mid_module_step_is_restored(
    tmp_path: Path, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``module`` step: ``fleet agent`` reads the live kernel's module list, which a test cannot
    load modules into, so a runner process of its own reads the fakes' (the hub's side of a node
    killed mid-job is the same for every step type: see the test above).
    """
    from bus.messages import Command, encode
    from bus.signing import load_private_key, sign_command
    from edge_agent import executor, versions
    from edge_agent.runner import CommandRunner
    from tests.fault.runner_child import PREFIX, settings_for
    from tests.integration.test_module import ko

    fleet = Fleet("mqtt://127.0.0.1:1", tmp_path / "fleet", topics)
    env = _fakes(fleet, {"modprobe": "fleet-drv"})
    fake_state = Path(env["FLEET_FAKE_STATE"])
    (fake_state / "modules").mkdir()
    (fake_state / "modules" / "fleet_drv.ko").write_bytes(ko("1.0"))
    state = fleet.prepare_node(NODE)
    key = load_private_key(fleet.key)
    issued = time.time()
    command = sign_command(
        Command(
            id="c-module", node=NODE, rollout="r-module", action="apply", issued_at=issued,
            expires_at=issued + 600, plan=[{"type": "module", "name": "fleet-drv", "action": "load"}],
        ),
        key,
    )  # fmt: skip
    (tmp_path / "cmd.json").write_bytes(encode(command))
    argv = [str(state), str(fleet.scripts), NODE, str(fleet.pub), str(fake_state), str(tmp_path / "cmd.json")]
    child = Proc(
        "runner", [sys.executable, "-m", "tests.fault.runner_child", *argv], tmp_path / "child.log", ROOT,
        {**os.environ, **env},
    )  # fmt: skip
    try:
        await _poll(lambda: _called(fake_state, "modprobe", "fleet-drv"), 0.005, 60.0)
    finally:
        child.kill()  # modprobe loaded it; the runner dies before it could record so
    tools = settings_for(state, fleet.scripts, NODE, fleet.pub, fake_state).tools
    steps = [s["state"] for s in next(iter(_journal(state)["applies"].values()))["steps"]]
    assert steps == ["running"], (steps, child.log())

    for name, value in env.items():  # the recovering runner calls the fakes too
        monkeypatch.setenv(name, value)
    reports: list[bytes] = []

    async def publish(topic: str, payload: bytes, **_kwargs: Any) -> None:
        reports.append(payload)

    settings = settings_for(state, fleet.scripts, NODE, fleet.pub, fake_state)
    runner = CommandRunner(settings, Topics(PREFIX), publish)
    await runner.recover()
    await runner.close()
    assert await versions.module_version("fleet_drv", tools) is None, "the module is still loaded"
    journal = _journal(state)
    assert journal["active"] is None
    (entry,) = journal["applies"].values()
    assert entry["phase"] == "rolled_back", entry
    assert executor.undo_order(executor.JournalState.model_validate(journal).applies["r-module"].steps) == []
    final = json.loads(reports[-1])
    assert final["phase"] == "rolled_back", final
