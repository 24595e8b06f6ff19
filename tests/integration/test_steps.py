"""Each step handler against real parts: HTTP server, files, scripts, processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bus.errors import StepError
from bus.messages import DownloadStep, FileStep, HealthStep, ScriptStep, ServiceStep
from edge_agent import system
from edge_agent.settings import ExecutorSettings, Policy, ProcessService
from edge_agent.steps import HANDLERS, download, file, health, script, service
from edge_agent.steps.base import Phase, StepContext, resolve_script
from tests.conftest import free_port
from tests.webfiles import Web

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scripts"


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    directory = tmp_path / "scripts"
    directory.mkdir()
    for source in FIXTURES.glob("*.sh"):
        shutil.copy(source, directory / source.name)
        (directory / source.name).chmod(0o755)
    return directory


@pytest.fixture
def settings(tmp_path: Path, scripts: Path) -> ExecutorSettings:
    state = tmp_path / "state"
    state.mkdir()
    return ExecutorSettings(node="node-1", state_dir=state, scripts_dir=scripts)


@dataclass
class Calls:
    logs: list[str] = field(default_factory=list)
    output: list[tuple[str, str]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def make_ctx(
    settings: ExecutorSettings, *, phase: Phase = "apply", index: int = 0, timeout: float = 30.0
) -> tuple[StepContext, Calls]:
    calls = Calls()

    async def log(line: str) -> None:
        calls.logs.append(line)

    async def output(stream: str, line: str) -> None:
        calls.output.append((stream, line))

    async def checkpoint(record: dict[str, Any]) -> None:
        calls.checkpoints.append(dict(record))

    ctx = StepContext(
        node="node-1",
        rollout="r1",
        command="cmd-1",
        index=index,
        phase=phase,
        settings=settings,
        timeout=timeout,
        log=log,
        output=output,
        checkpoint=checkpoint,
    )
    return ctx, calls


def test_every_handler_is_registered() -> None:
    assert set(HANDLERS) == {
        "download",
        "file",
        "script",
        "health",
        "service",
        "package",
        "container",
        "module",
    }


# ----------------------------------------------------------------------------- download


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_download_verifies_and_caches_and_undo_removes(web: Web, settings: ExecutorSettings) -> None:
    body = b"payload" * 1000
    step = DownloadStep(url=web.add("/p.bin", body), sha256=_sha(body).upper(), name="p.bin")
    ctx, calls = make_ctx(settings)

    record = await download.apply(step, ctx)

    assert record == {"cached_before": False, "size": len(body)}
    assert calls.checkpoints == [{"cached_before": False}]
    assert (settings.cache_dir / "p.bin").read_bytes() == body
    assert [p.name for p in settings.cache_dir.iterdir()] == ["p.bin"]
    await download.undo(step, make_ctx(settings, phase="rollback")[0], record)
    assert list(settings.cache_dir.iterdir()) == []


async def test_download_keeps_a_verified_copy_already_cached(web: Web, settings: ExecutorSettings) -> None:
    body = b"same"
    settings.cache_dir.mkdir()
    (settings.cache_dir / "same").write_bytes(body)
    step = DownloadStep(url=web.url("/not-there"), sha256=_sha(body), name="same")
    ctx, _ = make_ctx(settings)

    record = await download.apply(step, ctx)
    await download.undo(step, ctx, record)

    assert record == {"cached_before": True}
    assert web.hits == []
    assert (settings.cache_dir / "same").read_bytes() == body


@pytest.mark.parametrize("where", ["step", "settings"])
async def test_download_refuses_more_than_the_size_bound(
    web: Web, settings: ExecutorSettings, where: str
) -> None:
    body = b"x" * 1000
    if where == "settings":
        settings = ExecutorSettings(
            node="node-1",
            state_dir=settings.state_dir,
            scripts_dir=settings.scripts_dir,
            max_download_bytes=999,
        )
    step = DownloadStep(
        url=web.add("/big", body), sha256=_sha(body), name="big", max_bytes=999 if where == "step" else None
    )
    with pytest.raises(StepError, match="more than the limit of 999"):
        await download.apply(step, make_ctx(settings)[0])
    assert list(settings.cache_dir.iterdir()) == []


async def test_download_mismatch_and_http_errors(web: Web, settings: ExecutorSettings) -> None:
    ctx, _ = make_ctx(settings)
    bad = DownloadStep(url=web.add("/b", b"evil"), sha256=_sha(b"good"), name="b")
    with pytest.raises(StepError, match=f"sha256 mismatch .*expected {_sha(b'good')}, got {_sha(b'evil')}"):
        await download.apply(bad, ctx)
    missing = DownloadStep(url=web.url("/missing"), sha256=_sha(b"x"), name="m")
    with pytest.raises(StepError, match="HTTP 404"):
        await download.apply(missing, ctx)
    closed = DownloadStep(url=f"http://127.0.0.1:{free_port()}/x", sha256=_sha(b"x"), name="c")
    with pytest.raises(StepError, match="cannot fetch"):
        await download.apply(closed, ctx)
    assert list(settings.cache_dir.iterdir()) == []


async def test_download_redirect_to_a_host_outside_the_policy_is_refused(
    web: Web, settings: ExecutorSettings
) -> None:
    web.add("/real", b"data")
    web.redirects["/moved"] = web.url("/real", host="localhost")
    web.redirects["/moved-ok"] = web.url("/real")
    limited = ExecutorSettings(
        node="node-1",
        state_dir=settings.state_dir,
        scripts_dir=settings.scripts_dir,
        policy=Policy(download_hosts=["127.0.0.1"]),
    )
    step = DownloadStep(url=web.url("/moved"), sha256=_sha(b"data"), name="d")
    assert download.check(step, limited) is None
    with pytest.raises(StepError, match="redirected to http://localhost"):
        await download.apply(step, make_ctx(limited)[0])
    ok = DownloadStep(url=web.url("/moved-ok"), sha256=_sha(b"data"), name="d")
    assert (await download.apply(ok, make_ctx(limited)[0]))["size"] == 4
    outside = DownloadStep(url=web.url("/real", host="localhost"), sha256=_sha(b"data"), name="d")
    assert download.check(outside, limited) == "download host localhost is not allowed by this node's policy"


# --------------------------------------------------------------------------------- file


async def test_file_replaces_atomically_keeps_the_old_one_and_undo_restores_it(
    settings: ExecutorSettings,
) -> None:
    settings.cache_dir.mkdir()
    (settings.cache_dir / "new").write_bytes(b"new content")
    dest = settings.state_dir / "app.conf"
    dest.write_bytes(b"old content")
    dest.chmod(0o600)
    step = FileStep(src="new", dest=str(dest), mode="0640")
    ctx, calls = make_ctx(settings, index=3)

    record = await file.apply(step, ctx)

    backup = settings.backup_dir / "cmd-1" / "3"
    assert record == {"existed": True, "backup": str(backup)}
    assert calls.checkpoints == [{"backup": str(backup)}]
    assert dest.read_bytes() == b"new content"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert backup.read_bytes() == b"old content"
    assert not [p for p in settings.state_dir.iterdir() if p.name.startswith(".")]  # no temp left

    undo_ctx, _ = make_ctx(settings, phase="rollback", index=3)
    await file.undo(step, undo_ctx, record)
    await file.undo(step, undo_ctx, record)  # idempotent: a restart may run it again
    assert dest.read_bytes() == b"old content"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


async def test_file_that_did_not_exist_is_removed_on_undo(settings: ExecutorSettings) -> None:
    settings.cache_dir.mkdir()
    (settings.cache_dir / "new").write_bytes(b"n")
    dest = settings.state_dir / "fresh.txt"
    step = FileStep(src="new", dest="fresh.txt")  # relative to the state dir
    ctx, _ = make_ctx(settings)
    record = await file.apply(step, ctx)
    assert record["existed"] is False
    assert dest.read_bytes() == b"n"
    await file.undo(step, ctx, None)  # the record is not needed: the backup names the step
    assert not dest.exists()


async def test_file_failures_touch_nothing(settings: ExecutorSettings) -> None:
    dest = settings.state_dir / "keep.txt"
    dest.write_text("keep")
    ctx, calls = make_ctx(settings)
    with pytest.raises(StepError, match="not in the cache"):
        await file.apply(FileStep(src="absent", dest=str(dest)), ctx)
    settings.cache_dir.mkdir()
    (settings.cache_dir / "x").write_text("x")
    with pytest.raises(StepError, match="does not exist"):
        await file.apply(FileStep(src="x", dest=str(settings.state_dir / "no" / "dir" / "f")), ctx)
    (settings.state_dir / "adir").mkdir()
    with pytest.raises(StepError, match="not a regular file"):
        await file.apply(FileStep(src="x", dest=str(settings.state_dir / "adir")), ctx)
    await file.undo(FileStep(src="x", dest=str(dest)), ctx, None)
    assert dest.read_text() == "keep"
    assert calls.logs[-1].endswith("was not touched: nothing to restore")


def test_file_destinations_follow_the_policy(settings: ExecutorSettings, tmp_path: Path) -> None:
    inside = str(settings.state_dir / "app" / "conf")
    assert file.check(FileStep(src="a", dest=inside), settings) is None
    assert file.check(FileStep(src="a", dest="app/conf"), settings) is None
    assert "part of the agent's state" in str(file.check(FileStep(src="a", dest="journal.json"), settings))
    assert "outside the agent's state dir" in str(file.check(FileStep(src="a", dest="/etc/passwd"), settings))
    for own in ("journal.json", "cache/x", "backup/c/0", "services/app.pid"):
        reason = file.check(FileStep(src="a", dest=str(settings.state_dir / own)), settings)
        assert "part of the agent's state" in str(reason)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (settings.state_dir / "link").symlink_to(outside)
    escaping = FileStep(src="a", dest=str(settings.state_dir / "link" / "f"))
    assert "outside the agent's state dir" in str(file.check(escaping, settings))
    opt = ExecutorSettings(
        node="n",
        state_dir=settings.state_dir,
        scripts_dir=settings.scripts_dir,
        policy=Policy(paths=["/opt/app/*"]),
    )
    assert file.check(FileStep(src="a", dest="/opt/app/app.bin"), opt) is None
    assert "not allowed by this node's policy" in str(file.check(FileStep(src="a", dest="/opt/other"), opt))


# ------------------------------------------------------------------------------- script


async def test_script_runs_in_the_state_dir_with_the_fleet_environment(settings: ExecutorSettings) -> None:
    step = ScriptStep(name="record.sh", args=["a b", "c"], rollback="record.sh")
    ctx, calls = make_ctx(settings)

    record = await script.apply(step, ctx)

    assert record == {"started": True}
    assert calls.checkpoints[0] == {"started": True}
    assert calls.checkpoints[1]["pid"] > 1
    assert calls.output == [
        (
            "stdout",
            f"record: phase=apply node=node-1 rollout=r1 command=cmd-1 cwd={settings.state_dir} args=a b c",
        )
    ]
    await script.undo(step, make_ctx(settings, phase="rollback")[0], record)
    assert (settings.state_dir / "record.log").read_text().splitlines() == [
        "apply record.sh a b c",
        "rollback record.sh a b c",
    ]


async def test_script_failure_carries_the_tools_own_message(settings: ExecutorSettings) -> None:
    ctx, calls = make_ctx(settings)
    with pytest.raises(StepError, match=r"^fail.sh exited with status 3: disk quota exceeded$"):
        await script.apply(ScriptStep(name="fail.sh"), ctx)
    assert ("stderr", "disk quota exceeded") in calls.output
    await script.undo(ScriptStep(name="fail.sh"), ctx, {"started": True})
    assert calls.logs[-1] == "fail.sh has no rollback script: nothing to undo"


def test_scripts_only_from_the_scripts_dir(settings: ExecutorSettings, tmp_path: Path) -> None:
    scripts = settings.scripts_dir
    outside = tmp_path / "evil.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    (scripts / "link.sh").symlink_to(outside)
    (scripts / "plain.txt").write_text("x")
    (scripts / "plain.txt").chmod(0o644)
    (scripts / "inner.sh").symlink_to(scripts / "record.sh")
    with pytest.raises(StepError, match="resolves outside"):
        resolve_script(scripts, "link.sh")
    with pytest.raises(StepError, match="not executable"):
        resolve_script(scripts, "plain.txt")
    with pytest.raises(StepError, match="not found"):
        resolve_script(scripts, "nope.sh")
    assert resolve_script(scripts, "inner.sh") == (scripts / "record.sh").resolve()
    assert script.check(ScriptStep(name="record.sh", rollback="nope.sh"), settings) == (
        "script nope.sh not found in the scripts directory"
    )
    limited = ExecutorSettings(
        node="n", state_dir=settings.state_dir, scripts_dir=scripts, policy=Policy(scripts=["rec*"])
    )
    assert script.check(ScriptStep(name="record.sh"), limited) is None
    assert (
        script.check(ScriptStep(name="fail.sh"), limited)
        == "script fail.sh is not allowed by this node's policy"
    )


# ------------------------------------------------------------------------------- health


async def test_http_health_checks_status_and_body(web: Web, settings: ExecutorSettings) -> None:
    web.add("/health", b"version 2.0 ok")
    ctx, calls = make_ctx(settings)
    assert await health.apply(HealthStep(check="http", target=web.url("/health"), expect="2.0"), ctx) == {}
    with pytest.raises(StepError, match=r"after 3 attempts: '3.0' not in the response"):
        await health.apply(
            HealthStep(check="http", target=web.url("/health"), expect="3.0", retries=3, interval_s=0), ctx
        )
    assert len([line for line in calls.logs if "attempt" in line and "not in" in line]) == 3
    with pytest.raises(StepError, match="HTTP 404"):
        await health.apply(HealthStep(check="http", target=web.url("/nope"), retries=1), ctx)


async def test_tcp_and_command_health_checks(settings: ExecutorSettings) -> None:
    ctx, _ = make_ctx(settings)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        await health.apply(HealthStep(check="tcp", target=f"127.0.0.1:{port}", retries=1), ctx)
    with pytest.raises(StepError, match="cannot connect"):
        await health.apply(
            HealthStep(check="tcp", target=f"127.0.0.1:{free_port()}", retries=2, interval_s=0), ctx
        )

    with pytest.raises(StepError, match=r"check\.sh exited with status 1: not healthy yet"):
        await health.apply(HealthStep(check="command", target="check.sh", retries=1), ctx)
    (settings.state_dir / "healthy").write_text("all good\n")
    await health.apply(HealthStep(check="command", target="check.sh", expect="good", retries=1), ctx)
    with pytest.raises(StepError, match="lacks 'great'"):
        await health.apply(HealthStep(check="command", target="check.sh", expect="great", retries=1), ctx)


def test_health_intake_checks(settings: ExecutorSettings) -> None:
    def reason(**fields: Any) -> str | None:
        return health.check(HealthStep.model_validate(fields), settings)

    assert reason(check="systemd", target="app.service") is None
    assert reason(check="systemd", target="../app") == "'../app' is not a systemd unit name"
    assert reason(check="tcp", target="nohost") == "tcp target 'nohost' is not host:port"
    assert reason(check="tcp", target="[::1]:8080") is None
    assert reason(check="http", target="ftp://x/") == "http health target 'ftp://x/' is not an http(s) URL"
    assert (
        reason(check="command", target="missing.sh --flag")
        == "script missing.sh not found in the scripts directory"
    )
    assert reason(check="command", target="check.sh --flag") is None


# ------------------------------------------------------------------------------ service

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]


@dataclass
class Services:
    settings: ExecutorSettings

    def with_services(self, **specs: ProcessService) -> ExecutorSettings:
        base = self.settings
        return ExecutorSettings(
            node=base.node,
            state_dir=base.state_dir,
            scripts_dir=base.scripts_dir,
            services=specs,
            service_stop_grace_s=0.5,
        )


@pytest.fixture
def services(settings: ExecutorSettings) -> Iterator[Services]:
    yield Services(settings)
    for pidfile in (settings.state_dir / "services").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)


async def test_process_service_runs_detached_and_stops(services: Services) -> None:
    settings = services.with_services(app=ProcessService(command=SLEEPER))
    ctx, _ = make_ctx(settings)

    record = await service.apply(ServiceStep(action="start", name="app"), ctx)

    assert record == {"was_running": False}
    pid = system.service_pid(settings.state_dir, "app")
    assert pid is not None
    ppid = _parent_of(pid)
    assert ppid != os.getpid()  # not our child: it outlives an agent restart
    assert os.getpgid(pid) == pid
    log = settings.state_dir / "services" / "app.log"
    await _until(lambda: "up" in log.read_text())

    record = await service.apply(ServiceStep(action="stop", name="app"), ctx)
    assert record == {"was_running": True}
    assert system.service_pid(settings.state_dir, "app") is None
    assert not (settings.state_dir / "services" / "app.pid").exists()
    assert await system.stop_service("app", state_dir=settings.state_dir) is False  # stopping twice is fine


def _real(path: Path) -> Path:
    return path.resolve()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


async def test_process_service_gets_exactly_its_environment_and_session(services: Services) -> None:
    # Launched through sh + setsid + env -i (or the Python launcher): the service
    # sees only PATH and its own variables (no step-scope marker), leads its own
    # session, and its cwd and log are the configured ones.
    settings = services.with_services(app=ProcessService(command=SLEEPER, env={"APP_MODE": "a b=c"}))
    ctx, _ = make_ctx(settings)
    await service.apply(ServiceStep(action="start", name="app"), ctx)
    pid = system.service_pid(settings.state_dir, "app")
    assert pid is not None
    environ = _read_bytes(f"/proc/{pid}/environ").split(b"\0")
    assert sorted(e.split(b"=", 1)[0] for e in environ if e) == [b"APP_MODE", b"PATH"]
    assert b"APP_MODE=a b=c" in environ
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == str(_real(settings.state_dir))
    assert stat.S_IMODE((settings.state_dir / "services" / "app.log").stat().st_mode) == 0o640
    await service.apply(ServiceStep(action="stop", name="app"), ctx)


async def test_service_undo_restores_the_previous_state(services: Services) -> None:
    settings = services.with_services(app=ProcessService(command=SLEEPER))
    ctx, _ = make_ctx(settings)
    undo_ctx, _ = make_ctx(settings, phase="rollback")

    start = ServiceStep(action="start", name="app")
    record = await service.apply(start, ctx)
    await service.undo(start, undo_ctx, record)
    assert system.service_pid(settings.state_dir, "app") is None

    await service.apply(start, ctx)
    first = system.service_pid(settings.state_dir, "app")
    stop = ServiceStep(action="stop", name="app")
    record = await service.apply(stop, ctx)
    await service.undo(stop, undo_ctx, record)
    assert system.service_pid(settings.state_dir, "app") not in (None, first)

    restart = ServiceStep(action="restart", name="app")
    before = system.service_pid(settings.state_dir, "app")
    record = await service.apply(restart, ctx)
    after = system.service_pid(settings.state_dir, "app")
    assert after not in (None, before)
    await service.undo(restart, undo_ctx, record)
    assert system.service_pid(settings.state_dir, "app") not in (None, after)

    await service.undo(stop, undo_ctx, None)  # never got as far as its checkpoint: nothing
    assert system.service_pid(settings.state_dir, "app") is not None


async def test_service_that_dies_at_once_fails_to_start(services: Services) -> None:
    crash = [sys.executable, "-c", "import sys; print('bad config', file=sys.stderr); sys.exit(4)"]
    settings = services.with_services(
        bad=ProcessService(command=crash), missing=ProcessService(command=["/no/such"])
    )
    ctx, _ = make_ctx(settings)
    with pytest.raises(StepError, match=r"service bad exited within 0\.5 s: bad config"):
        await service.apply(ServiceStep(action="start", name="bad"), ctx)
    with pytest.raises(StepError, match="cannot start service missing: cannot start /no/such"):
        await service.apply(ServiceStep(action="start", name="missing"), ctx)
    assert system.service_pid(settings.state_dir, "bad") is None


async def test_a_service_ignoring_sigterm_is_killed_after_the_grace(services: Services) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(600)",
    ]
    settings = services.with_services(stubborn=ProcessService(command=stubborn))
    ctx, _ = make_ctx(settings)
    await service.apply(ServiceStep(action="start", name="stubborn"), ctx)
    log = settings.state_dir / "services" / "stubborn.log"
    await _until(lambda: "up" in log.read_text())  # its SIGTERM handler is in place
    assert await system.stop_service("stubborn", state_dir=settings.state_dir, grace_s=0.5) is True
    assert system.service_pid(settings.state_dir, "stubborn") is None


def test_service_intake_checks(services: Services) -> None:
    settings = services.with_services(app=ProcessService(command=SLEEPER))
    assert service.check(ServiceStep(action="stop", name="app"), settings) is None
    assert service.check(ServiceStep(action="stop", name="db"), settings) == (
        "service db is not defined for the process manager"
    )
    systemd = ExecutorSettings(
        node="n", state_dir=settings.state_dir, scripts_dir=settings.scripts_dir, service_manager="systemd"
    )
    # systemd units need no declaration in the agent config, only the policy's consent
    assert service.check(ServiceStep(action="stop", name="app"), systemd) is None
    upstart = ExecutorSettings(
        node="n",
        state_dir=settings.state_dir,
        scripts_dir=settings.scripts_dir,
        service_manager="upstart",  # type: ignore[arg-type]
    )
    assert service.check(ServiceStep(action="stop", name="app"), upstart) == (
        "service manager upstart is not supported by this agent"
    )


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def _until(predicate: Any, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
