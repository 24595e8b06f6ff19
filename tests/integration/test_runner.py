"""CommandRunner end to end on one node: real scripts, a real HTTP server, a real process service.

Most tests record what the runner publishes with a fake ``publish``; one runs
over each real broker, fed from a real MQTT subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.messages import (
    Command,
    DownloadStep,
    FileStep,
    HealthStep,
    JobSnapshot,
    RestoreCheck,
    ScriptStep,
    ServiceStep,
    StepStatus,
    encode,
)
from bus.mqtt import MqttClient
from bus.topics import Topics
from edge_agent import executor, reporter, system
from edge_agent.executor import JournalState
from edge_agent.journal import Journal
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings, ProcessService
from tests.conftest import RunningBroker, free_port
from tests.integration.conftest import (
    FINAL,
    FIXTURES,
    NODE,
    ROOT,
    Recorder,
    cmd_topic,
    command,
    make_settings,
)
from tests.webfiles import Web

# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    directory = tmp_path / "scripts"
    directory.mkdir()
    for script in FIXTURES.glob("*.sh"):
        shutil.copy(script, directory / script.name)
        (directory / script.name).chmod(0o755)
    return directory


@dataclass
class App:
    """A real process service: serves the version it read at start from ``version``."""

    name: str
    port: int
    version: Path
    spec: ProcessService
    state_dir: Path

    def served(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    state_dir = tmp_path / "state"
    (state_dir / "app").mkdir(parents=True)
    version = state_dir / "app" / "version"
    version.write_text("1.0\n")
    port = free_port()
    spec = ProcessService(
        command=[
            sys.executable,
            str(FIXTURES / "version_server.py"),
            "--port",
            str(port),
            "--version-file",
            str(version),
        ]
    )
    yield App("app", port, version, spec, state_dir)
    _kill_service(state_dir, "app")


def _kill_service(state_dir: Path, name: str) -> None:
    pidfile = state_dir / "services" / f"{name}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split()[0])
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def runners() -> AsyncIterator[list[CommandRunner]]:
    made: list[CommandRunner] = []
    yield made
    for runner in made:
        await runner.close()


def pairs(statuses: list[StepStatus]) -> list[tuple[int, str]]:
    return [(s.index, s.state) for s in statuses]


def update_plan(
    web: Web, app: App, *, new: bytes = b"2.0\n", expect: str = "2.0", sha: str | None = None
) -> list[Any]:
    """download -> stop -> file -> start -> http health, the update the issue describes."""
    url = web.add("/app-2.0", new)
    return [
        DownloadStep(url=url, sha256=sha or hashlib.sha256(new).hexdigest(), name="app-2.0"),
        ServiceStep(action="stop", name=app.name),
        FileStep(src="app-2.0", dest=str(app.version), mode="0644"),
        ServiceStep(action="start", name=app.name),
        HealthStep(
            check="http", target=f"http://127.0.0.1:{app.port}/", expect=expect, retries=20, interval_s=0.1
        ),
    ]


async def start_app(app: App) -> None:
    await system.start_service(
        app.name, argv=app.spec.command, cwd=app.state_dir, env=dict(os.environ), state_dir=app.state_dir
    )
    await wait_served(app, "1.0")


async def wait_served(app: App, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(app.served)
        except OSError as exc:
            last = str(exc)
        if last.strip() == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"service serves {last!r}, not {version!r}")


def expected_success(steps: int) -> list[tuple[int, str]]:
    return [(i, s) for i in range(steps) for s in ("running", "succeeded")]


# ------------------------------------------------------------------------------ tests


async def test_update_success_reports_every_transition_in_order(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    app: App,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key, services={"app": app.spec})
    # Every snapshot published at once (by default, those of a job in progress are coalesced).
    runner = CommandRunner(settings, topics, recorder.publish, snapshot_every_s=0)
    runners.append(runner)
    await start_app(app)
    cmd = command(key, update_plan(web, app))

    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)

    assert final.phase == "succeeded", recorder.summary()
    assert pairs(recorder.statuses(cmd.id)) == expected_success(5)
    assert [s.type for s in recorder.statuses(cmd.id)][::2] == [
        "download",
        "service",
        "file",
        "service",
        "health",
    ]
    # The retained snapshot follows the job: taken (its first step running), after
    # each step but the last, and at the end.
    snaps = [s for s in recorder.snapshots() if s.id == cmd.id]
    assert [s.phase for s in snaps] == ["applying"] * 5 + ["succeeded"]
    shown = [[st.state for st in s.steps] for s in snaps]
    assert shown[0] == ["running"] + ["pending"] * 4
    assert shown[1] == ["succeeded"] + ["pending"] * 4
    assert shown[4] == ["succeeded"] * 4 + ["pending"]
    assert shown[-1] == ["succeeded"] * 5
    assert all(m[3] for m in recorder.of("job"))
    assert all(m[2] == 1 for m in recorder.of("status"))
    assert all(m[2] == 0 for m in recorder.of("log"))
    await wait_served(app, "2.0")
    assert app.version.read_text() == "2.0\n"
    assert (settings.cache_dir / "app-2.0").read_bytes() == b"2.0\n"
    assert runner.current_job() is None


async def test_snapshots_of_a_job_in_progress_are_coalesced_but_never_late(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    runner = CommandRunner(settings, topics, recorder.publish, snapshot_every_s=0.2)
    runners.append(runner)
    quick = [ScriptStep(name="record.sh") for _ in range(4)]
    cmd = command(key, quick)
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)
    assert final.phase == "succeeded", recorder.summary()
    assert pairs(recorder.statuses(cmd.id)) == expected_success(4)  # every step reported
    snaps = [s for s in recorder.snapshots() if s.id == cmd.id]
    assert len(snaps) < 5  # not one per transition ...
    assert snaps[-1].phase == "succeeded"  # ... and the last word is the job's end
    await asyncio.sleep(0.4)
    assert [s for s in recorder.snapshots() if s.id == cmd.id][-1].phase == "succeeded"  # nothing late

    # A step that takes longer than the interval is shown running while it runs.
    slow = command(
        key, [ScriptStep(name="record.sh"), ScriptStep(name="sleepy.sh", args=["1"])], rollout="slow"
    )
    await runner.handle_command(cmd_topic(topics), encode(slow))
    await recorder.wait(
        lambda: any(
            s.id == slow.id and s.phase == "applying" and s.steps[1].state == "running"
            for s in recorder.snapshots()
        ),
        timeout=5,
    )
    assert recorder.final(slow.id) is None
    assert (await recorder.final_of(slow.id)).phase == "succeeded"


async def test_health_failure_restores_the_node_by_itself(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    app: App,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key, services={"app": app.spec})
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    await start_app(app)
    plan = update_plan(web, app, expect="3.0")
    plan[-1] = plan[-1].model_copy(update={"retries": 2, "interval_s": 0.05})
    cmd = command(key, plan)

    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)

    # A failed step, the node restored and shown restored: phase failed, naming both.
    assert final.phase == "failed", recorder.summary()
    assert pairs(recorder.statuses(cmd.id)) == [
        *expected_success(4),
        (4, "running"),
        (4, "failed"),
        (4, "rolled_back"),
        (3, "rolled_back"),
        (2, "rolled_back"),
        (1, "rolled_back"),
        (0, "rolled_back"),
        (4, "rolled_back"),  # the restore verified by the health check, expect dropped
    ]
    failed = recorder.statuses(cmd.id)[9]
    assert "'3.0' not in the response" in failed.detail
    assert recorder.statuses(cmd.id)[-1].detail.startswith("restore verified: http http://127.0.0.1:")
    assert final.detail.startswith("step 5 (health) failed: health check http"), final.detail
    assert "node restored, restore verified: step 5 (health) http" in final.detail
    # The failure stays visible in the retained snapshot: a failed step among the undone ones.
    assert [s.state for s in final.steps] == ["rolled_back"] * 4 + ["failed"]
    assert "rolling_back" in [s.phase for s in recorder.snapshots()]
    await wait_served(app, "1.0")  # the old file is back and the service runs it again
    assert app.version.read_text() == "1.0\n"
    assert not (settings.cache_dir / "app-2.0").exists()


async def test_checksum_mismatch_leaves_nothing_in_the_cache(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    url = web.add("/blob", b"tampered")
    cmd = command(key, [DownloadStep(url=url, sha256="0" * 64, name="blob")])

    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)

    assert final.phase == "failed"
    assert pairs(recorder.statuses(cmd.id)) == [(0, "running"), (0, "failed"), (0, "rolled_back")]
    assert "sha256 mismatch" in recorder.statuses(cmd.id)[1].detail
    assert final.detail.startswith("step 1 (download) failed: sha256 mismatch"), final.detail
    assert final.steps[0].state == "failed"
    assert list(settings.cache_dir.iterdir()) == []


async def poll(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


async def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    await poll(lambda: _gone(pid), timeout)


async def test_script_timeout_kills_its_process_group(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    cmd = command(key, [ScriptStep(name="sleepy.sh", args=["120"], timeout_s=1.0)])

    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)

    assert final.phase == "failed"
    failed = recorder.statuses(cmd.id)[1]
    assert (failed.state, failed.index) == ("failed", 0)
    assert "timed out after 1 s" in failed.detail
    script_pid = int((settings.state_dir / "sleepy.pid").read_text())
    child_pid = int((settings.state_dir / "sleepy.child").read_text())
    await _wait_gone(script_pid)
    await _wait_gone(child_pid)  # the script's child went with its process group
    assert any(line.line == "sleeping" and line.stream == "stdout" for line in recorder.logs())


async def test_abort_mid_step_cancels_it_and_rolls_back(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    apply = command(
        key,
        [
            ScriptStep(name="record.sh", args=["one"], rollback="record.sh"),
            ScriptStep(name="sleepy.sh", args=["120"], rollback="record.sh"),
            ScriptStep(name="record.sh", args=["never"]),
        ],
    )
    await runner.handle_command(cmd_topic(topics), encode(apply))
    await recorder.wait(lambda: (1, "running") in pairs(recorder.statuses(apply.id)))
    await poll(lambda: (settings.state_dir / "sleepy.child").exists())
    job = runner.current_job()
    assert job is not None
    assert (job.rollout, job.command, job.step) == ("r1", apply.id, 1)

    abort = command(key, [], action="abort")
    await runner.handle_command(cmd_topic(topics), encode(abort))
    final = await recorder.final_of(abort.id)

    assert final.phase == "rolled_back", recorder.summary()
    assert final.action == "abort"
    assert final.rollout == "r1"
    assert pairs(recorder.statuses(abort.id)) == [(1, "rolled_back"), (0, "rolled_back")]
    assert [s.state for s in final.steps] == ["rolled_back", "rolled_back", "skipped"]
    assert (settings.state_dir / "record.log").read_text().splitlines() == [
        "apply record.sh one",
        "rollback record.sh 120",
        "rollback record.sh one",
    ]
    await _wait_gone(int((settings.state_dir / "sleepy.child").read_text()))
    assert runner.current_job() is None


async def test_rollback_after_success_restores_the_old_version(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    app: App,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key, services={"app": app.spec})
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    await start_app(app)
    plan = update_plan(web, app)
    plan[-1] = plan[-1].model_copy(update={"verify": RestoreCheck(expect="1.0")})
    apply = command(key, plan, rollout="r7")
    await runner.handle_command(cmd_topic(topics), encode(apply))
    assert (await recorder.final_of(apply.id)).phase == "succeeded"
    await wait_served(app, "2.0")

    rollback = command(key, [], rollout="r7", action="rollback")
    await runner.handle_command(cmd_topic(topics), encode(rollback))
    final = await recorder.final_of(rollback.id)

    assert final.phase == "rolled_back", recorder.summary()
    verified = (4, "rolled_back")  # the health check, in restore mode: 1.0 answers
    assert pairs(recorder.statuses(rollback.id)) == [*((i, "rolled_back") for i in (4, 3, 2, 1, 0)), verified]
    assert [s.state for s in final.steps] == ["rolled_back"] * 5
    assert (
        final.detail == f"restore verified: step 5 (health) http http://127.0.0.1:{app.port}/ expecting '1.0'"
    )
    assert final.steps[4].detail == f"restore verified: http http://127.0.0.1:{app.port}/ expecting '1.0'"
    await wait_served(app, "1.0")
    assert app.version.read_text() == "1.0\n"

    again = command(key, [], rollout="r7", action="rollback")
    await runner.handle_command(cmd_topic(topics), encode(again))
    final = await recorder.final_of(again.id)
    assert (final.phase, final.detail) == ("rolled_back", "nothing to roll back")
    assert pairs(recorder.statuses(again.id)) == [(-1, "rolled_back")]


async def test_rollback_and_abort_of_unknown_rollouts_are_idempotent(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    runner = CommandRunner(make_settings(tmp_path, scripts, key), topics, recorder.publish)
    runners.append(runner)
    rollback = command(key, [], rollout="never-ran", action="rollback")
    abort = command(key, [], rollout="never-ran-either", action="abort")
    await runner.handle_command(cmd_topic(topics), encode(rollback))
    await runner.handle_command(cmd_topic(topics), encode(abort))
    assert (await recorder.final_of(rollback.id)).detail == "nothing to roll back"
    final = await recorder.final_of(abort.id)
    assert (final.phase, final.detail) == ("rolled_back", "nothing to undo")


async def test_busy_agent_rejects_a_second_apply(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    runner = CommandRunner(make_settings(tmp_path, scripts, key), topics, recorder.publish)
    runners.append(runner)
    first = command(key, [ScriptStep(name="sleepy.sh", args=["120"])], rollout="first")
    await runner.handle_command(cmd_topic(topics), encode(first))
    await recorder.wait(lambda: (0, "running") in pairs(recorder.statuses(first.id)))

    second = command(key, [ScriptStep(name="record.sh")], rollout="second")
    await runner.handle_command(cmd_topic(topics), encode(second))

    rejected = recorder.statuses(second.id)
    assert [(s.index, s.state, s.detail) for s in rejected] == [(-1, "rejected", "busy with rollout first")]
    assert recorder.snapshots()[-1].phase == "rejected"
    abort = command(key, [], rollout="first", action="abort")
    await runner.handle_command(cmd_topic(topics), encode(abort))
    assert (await recorder.final_of(abort.id)).phase == "rolled_back"


async def test_failed_undo_ends_in_phase_failed_naming_it(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    runner = CommandRunner(make_settings(tmp_path, scripts, key), topics, recorder.publish)
    runners.append(runner)
    cmd = command(
        key,
        [
            ScriptStep(name="record.sh", args=["a"], rollback="fail.sh"),
            ScriptStep(name="record.sh", args=["b"], rollback="record.sh"),
            ScriptStep(name="fail.sh"),
        ],
    )
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)

    assert final.phase == "rollback_failed", recorder.summary()
    assert "undo of step 1 (script) failed: fail.sh exited with status 3: disk quota exceeded" in final.detail
    states = pairs(recorder.statuses(cmd.id))
    assert states[-3:] == [(2, "rolled_back"), (1, "rolled_back"), (0, "failed")]
    assert [s.state for s in final.steps] == ["failed", "rolled_back", "failed"]
    assert final.steps[0].detail.startswith("fail.sh exited with status 3")
    # A later rollback retries only what is still not undone.
    rollback = command(key, [], action="rollback")
    await runner.handle_command(cmd_topic(topics), encode(rollback))
    again = await recorder.final_of(rollback.id)
    assert again.phase == "rollback_failed"
    assert pairs(recorder.statuses(rollback.id)) == [(0, "failed")]


async def test_replay_after_restart_is_ignored_and_older_commands_rejected(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    older = command(key, [ScriptStep(name="record.sh", args=["old"])], rollout="r0")
    cmd = command(key, [ScriptStep(name="record.sh", args=["x"])])
    first = CommandRunner(settings, topics, recorder.publish)
    runners.append(first)
    await first.handle_command(cmd_topic(topics), encode(cmd))
    assert (await recorder.final_of(cmd.id)).phase == "succeeded"
    await first.close()

    later = Recorder()
    second = CommandRunner(settings, topics, later.publish)
    runners.append(second)
    await second.recover()
    await second.handle_command(cmd_topic(topics), encode(cmd))
    assert later.messages == []
    assert second.current_job() is None

    await second.handle_command(cmd_topic(topics), encode(older))
    [status] = later.statuses()
    assert status.state == "rejected"
    assert "is not later than the last command run" in status.detail
    assert (settings.state_dir / "record.log").read_text().splitlines() == ["apply record.sh x"]


async def test_a_command_sent_again_is_answered_with_its_latest_snapshot(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub that may have missed the answer (a takeover; a broker that lost the retained
    snapshot in a failover) sends the command again: the node says where it is, runs nothing."""
    settings = make_settings(tmp_path, scripts, key)
    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    earlier = command(key, [ScriptStep(name="record.sh", args=["a"])], rollout="r0")
    await runner.handle_command(cmd_topic(topics), encode(earlier))
    await recorder.final_of(earlier.id)
    cmd = command(key, [ScriptStep(name="record.sh", args=["b"])])
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    final = await recorder.final_of(cmd.id)
    sent = len(recorder.messages)

    await runner.handle_command(cmd_topic(topics), encode(cmd))
    again = recorder.messages[sent:]
    assert [(topic, retain) for topic, _, _, retain in again] == [(topics.node(NODE, "job"), True)]
    assert JobSnapshot.model_validate_json(again[0][1]) == final
    # Not again within a second (a retained command comes back with every reconnect), and
    # a command that is not the latest job's is not answered: its snapshot was replaced.
    monkeypatch.setattr(reporter, "_REPLAY_ANSWER_EVERY_S", 3600.0)
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    monkeypatch.setattr(reporter, "_REPLAY_ANSWER_EVERY_S", 0.0)
    await runner.handle_command(cmd_topic(topics), encode(earlier))
    assert len(recorder.messages) == sent + 1
    assert (settings.state_dir / "record.log").read_text().splitlines() == [
        "apply record.sh a",
        "apply record.sh b",
    ]


async def test_recover_after_a_crash_mid_step_restores_the_node(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    dest = settings.state_dir / "config.txt"
    settings.state_dir.mkdir(parents=True)
    dest.write_text("old config\n")
    new = b"new config\n"
    cmd = command(
        key,
        [
            DownloadStep(url=web.add("/config", new), sha256=hashlib.sha256(new).hexdigest(), name="config"),
            FileStep(src="config", dest=str(dest)),
            ScriptStep(name="sleepy.sh", args=["120"], rollback="record.sh"),
        ],
    )
    pub = tmp_path / "hub.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "cmd.json").write_bytes(encode(cmd))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FIXTURES / "run_runner.py"),
        str(settings.state_dir),
        str(scripts),
        NODE,
        topics.prefix,
        str(pub),
        str(tmp_path / "cmd.json"),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        # Mid-step: the script runs and the journal knows its pid.
        await poll(lambda: (settings.state_dir / "sleepy.child").exists() and _journal_has_pid(settings), 60)
        assert dest.read_text() == "new config\n"
        child.send_signal(signal.SIGKILL)  # the agent dies mid-step
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
    sleeper = int((settings.state_dir / "sleepy.pid").read_text())
    sleeper_child = int((settings.state_dir / "sleepy.child").read_text())
    try:
        await _recover_and_check(
            settings, scripts, key, recorder, topics, runners, cmd, sleeper, sleeper_child
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sleeper, signal.SIGKILL)


def _journal_has_pid(settings: ExecutorSettings) -> bool:
    try:
        steps = json.loads(settings.journal_path.read_text())["applies"]["r1"]["steps"]
    except (OSError, ValueError, KeyError):
        return False
    return "pid" in (steps[2]["record"] or {})


async def _recover_and_check(
    settings: ExecutorSettings,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
    cmd: Command,
    sleeper: int,
    sleeper_child: int,
) -> None:
    dest = settings.state_dir / "config.txt"
    assert not _gone(sleeper)  # the script, in its own session, outlived the agent
    journal = json.loads(settings.journal_path.read_text())
    assert journal["active"]["command"] == cmd.id
    assert [s["state"] for s in journal["applies"]["r1"]["steps"]] == ["succeeded", "succeeded", "running"]

    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    await runner.recover()

    final = recorder.final(cmd.id)
    assert final is not None
    assert final.phase == "rolled_back", recorder.summary()
    assert pairs(recorder.statuses(cmd.id)) == [
        (2, "failed"),
        (2, "rolled_back"),
        (1, "rolled_back"),
        (0, "rolled_back"),
    ]
    assert "interrupted" in recorder.statuses(cmd.id)[0].detail
    assert [s.state for s in final.steps] == ["rolled_back", "rolled_back", "failed"]
    assert dest.read_text() == "old config\n"
    assert not (settings.cache_dir / "config").exists()
    assert (settings.state_dir / "record.log").read_text().splitlines() == ["rollback record.sh 120"]
    await _wait_gone(sleeper)  # recovery killed what the crashed agent left running
    await _wait_gone(sleeper_child)
    # After the restart the retained command is a replay: nothing runs, the node answers
    # with the snapshot it has (the hub sends a command again when it missed the answer).
    before, latest = len(recorder.messages), recorder.of("job")[-1][1]
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    assert [m[1] for m in recorder.messages[before:]] == [latest]
    assert json.loads(settings.journal_path.read_text())["active"] is None


@pytest.mark.broker
async def test_signed_retained_command_over_a_real_broker(
    broker: RunningBroker,
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    web: Web,
    app: App,
    topics: Topics,
) -> None:
    settings = make_settings(tmp_path, scripts, key, services={"app": app.spec})
    await start_app(app)
    cmd = command(key, update_plan(web, app))
    job_topic, status_topic = topics.node(NODE, "job"), topics.node(NODE, "status")

    async with MqttClient(broker.url) as hub, MqttClient(broker.url) as watcher:
        await watcher.subscribe(topics.node_filter("#", NODE))
        await hub.publish(cmd_topic(topics), encode(cmd), qos=1, retain=True, wait=True)
        seen: list[tuple[str, bytes]] = []

        async def watch() -> JobSnapshot:
            async for message in watcher.messages():
                if message.topic in (job_topic, status_topic):
                    seen.append((message.topic, message.payload))
                if message.topic == job_topic:
                    snap = JobSnapshot.model_validate_json(message.payload)
                    if snap.id == cmd.id and snap.phase in FINAL:
                        return snap
            raise AssertionError("watcher closed")

        watching = asyncio.create_task(watch())
        async with MqttClient(broker.url, client_id=f"agent-{NODE}") as agent:
            runner = CommandRunner(settings, topics, agent.publish)
            await agent.subscribe(cmd_topic(topics))
            feeding = asyncio.create_task(_feed(agent, runner))
            try:
                final = await asyncio.wait_for(watching, 60)
            finally:
                feeding.cancel()
                await asyncio.wait({feeding})
                await runner.close()

        assert final.phase == "succeeded"
        statuses = [StepStatus.model_validate_json(p) for t, p in seen if t == status_topic]
        assert pairs(statuses) == expected_success(5)
        snaps = [JobSnapshot.model_validate_json(p) for t, p in seen if t == job_topic]
        # Snapshots of the job in progress are coalesced; the final one always goes out.
        assert [s.phase for s in snaps][-1] == "succeeded"
        assert {s.phase for s in snaps[:-1]} <= {"applying"}
        assert len(snaps) <= 6
        await wait_served(app, "2.0")

        # A restarted agent gets the retained command again: a replay, ignored.
        later = Recorder()
        restarted = CommandRunner(settings, topics, later.publish)
        async with MqttClient(broker.url, client_id=f"agent-{NODE}") as agent:
            await agent.subscribe(cmd_topic(topics))
            message = await asyncio.wait_for(_next_on(agent, cmd_topic(topics)), 30)
            assert message.retain
            assert message.payload == encode(cmd)
            await restarted.recover()
            await restarted.handle_command(message.topic, message.payload)
        assert later.messages == []
        assert restarted.current_job() is None
        await restarted.close()
        await hub.publish(cmd_topic(topics), b"", qos=1, retain=True, wait=True)


async def _feed(client: MqttClient, runner: CommandRunner) -> None:
    async for message in client.messages():
        await runner.handle_command(message.topic, message.payload)


async def _next_on(client: MqttClient, topic: str) -> Any:
    async for message in client.messages():
        if message.topic == topic:
            return message
    return None


async def test_a_command_before_recover_finishes_the_interrupted_job_first(
    tmp_path: Path,
    scripts: Path,
    key: Ed25519PrivateKey,
    recorder: Recorder,
    topics: Topics,
    runners: list[CommandRunner],
) -> None:
    settings = make_settings(tmp_path, scripts, key)
    interrupted = command(
        key,
        [
            ScriptStep(name="record.sh", args=["one"], rollback="record.sh"),
            ScriptStep(name="record.sh", args=["two"], rollback="record.sh"),
            ScriptStep(name="record.sh", args=["three"], rollback="record.sh"),
        ],
    )
    # The journal exactly as an agent killed during step 1 leaves it.
    state = executor.begin(
        executor.remember(JournalState(), interrupted.id, interrupted.issued_at), interrupted
    )
    state = executor.update_step(state, "r1", 0, state="succeeded", record={"started": True})
    state = executor.update_step(state, "r1", 1, state="running", record={"started": True})
    Journal(settings.journal_path).save(state)

    runner = CommandRunner(settings, topics, recorder.publish)
    runners.append(runner)
    newer = command(key, [ScriptStep(name="record.sh", args=["new"])], rollout="r2")
    await runner.handle_command(cmd_topic(topics), encode(newer))

    assert [(s.index, s.state, s.detail) for s in recorder.statuses(newer.id)] == [
        (-1, "rejected", "busy with rollout r1")
    ]
    final = await recorder.final_of(interrupted.id)
    assert final.phase == "rolled_back"
    assert pairs(recorder.statuses(interrupted.id)) == [(1, "failed"), (1, "rolled_back"), (0, "rolled_back")]
    assert [s.state for s in final.steps] == ["rolled_back", "failed", "skipped"]
    assert (settings.state_dir / "record.log").read_text().splitlines() == [
        "rollback record.sh two",
        "rollback record.sh one",
    ]
    await runner.recover()  # already done: returns at once
    assert len(recorder.statuses(interrupted.id)) == 3
