"""``package`` step with the real dpkg, in a throwaway dpkg root (``dpkg --root``), nothing on the host.

Test packages are built here with ``dpkg-deb --build``: ``fleet-test-<random>`` in
any version; it installs /opt/fleet-test/<name>/version.txt and a conffile, and
its postinst fails when the version contains "fail". The helpers are shared with
the apt and module tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.errors import StepError
from bus.messages import (
    Command,
    DownloadStep,
    HealthStep,
    JobSnapshot,
    PackageStep,
    StepStatus,
    encode,
    new_id,
)
from bus.signing import public_key_of, sign_command
from bus.topics import Topics
from edge_agent import versions
from edge_agent.runner import CommandRunner
from edge_agent.settings import Policy
from edge_agent.steps import HANDLERS, package
from edge_agent.tools import SystemTools
from tests.integration.test_managers import ToolSettings, make_ctx
from tests.webfiles import Web

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None, reason="needs dpkg and dpkg-deb"
)

NODE = "node-1"

# ------------------------------------------------------------------ shared helpers


def build_deb(out_dir: Path, name: str, version: str, extra: dict[str, bytes] | None = None) -> Path:
    """A .deb of ``name`` ``version``: a version file, a conffile, and a postinst that fails on "fail"."""
    tree = out_dir / f"tree-{name}-{version}"
    debian = tree / "DEBIAN"
    debian.mkdir(parents=True)
    files = {
        f"opt/fleet-test/{name}/version.txt": f"{version}\n".encode(),
        f"etc/fleet-test/{name}.conf": f"setting={version}\n".encode(),
        **(extra or {}),
    }
    for rel, body in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(body)
    (debian / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: fleetbus tests <tests@example.invalid>\n"
        "Description: fleetbus package step test\n A package built by the fleetbus tests.\n"
    )
    (debian / "conffiles").write_text(f"/etc/fleet-test/{name}.conf\n")
    fail = (
        f'  echo "fleet-test: postinst failure requested by version {version}" >&2\n  exit 1\n'
        if "fail" in version
        else ""
    )
    (debian / "postinst").write_text(
        "#!/bin/sh\nset -e\n"
        'if [ "$1" = configure ]; then\n'
        f"{fail}"
        f'  echo "{version}" > "$DPKG_ROOT/opt/fleet-test/{name}/postinst-ran"\n'
        "fi\n"
    )
    (debian / "postrm").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = purge ]; then rm -f "$DPKG_ROOT/opt/fleet-test/{name}/postinst-ran"; fi\nexit 0\n'
    )
    for script in ("postinst", "postrm"):
        (debian / script).chmod(0o755)
    out = out_dir / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], check=True, capture_output=True
    )
    shutil.rmtree(tree)
    return out


def make_dpkg_root(root: Path) -> SystemTools:
    """An empty dpkg database under ``root`` and the tools pointed at it."""
    admin = root / "var" / "lib" / "dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True)
    (admin / "status").write_text("")
    force = ("script-chrootless",) if os.geteuid() == 0 else ("script-chrootless", "not-root")
    return SystemTools(dpkg_root=root, dpkg_force=force, lock_wait_s=30)


@dataclass
class DebWorld:
    """A throwaway dpkg root, a package name of this test's own, and its .deb files."""

    root: Path
    out: Path
    name: str
    tools: SystemTools
    built: dict[str, Path] = field(default_factory=dict)

    def deb(self, version: str, extra: dict[str, bytes] | None = None) -> Path:
        if version not in self.built:
            self.built[version] = build_deb(self.out, self.name, version, extra)
        return self.built[version]

    def dpkg(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["dpkg", *self.tools.dpkg_args(), *args], capture_output=True, text=True, check=False
        )

    def install_by_hand(self, version: str) -> None:
        """Install outside the agent (the agent has no file of it)."""
        result = self.dpkg("-i", str(self.deb(version)))
        assert result.returncode == 0, result.stderr

    def state(self) -> tuple[str, str] | None:
        result = subprocess.run(
            [
                "dpkg-query",
                *self.tools.dpkg_query_args(),
                "-W",
                "-f=${Version}\t${db:Status-Status}",
                self.name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or "\t" not in result.stdout:
            return None
        version, status = result.stdout.split("\t")
        return None if status == "not-installed" else (version, status)

    def file(self, rel: str) -> Path:
        return self.root / rel

    @property
    def version_file(self) -> Path:
        return self.root / "opt" / "fleet-test" / self.name / "version.txt"

    @property
    def postinst_ran(self) -> Path:
        return self.root / "opt" / "fleet-test" / self.name / "postinst-ran"

    @property
    def conffile(self) -> Path:
        return self.root / "etc" / "fleet-test" / f"{self.name}.conf"


def make_world(tmp_path: Path) -> DebWorld:
    out = tmp_path / "debs"
    out.mkdir()
    return DebWorld(
        root=tmp_path / "root",
        out=out,
        name=f"fleet-test-{uuid.uuid4().hex[:10]}",
        tools=make_dpkg_root(tmp_path / "root"),
    )


def deb_settings(tmp_path: Path, tools: SystemTools, **extra: Any) -> ToolSettings:
    state = tmp_path / "state"
    (state / "cache").mkdir(parents=True, exist_ok=True)
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    return ToolSettings(node=NODE, state_dir=state, scripts_dir=scripts, tools=tools, **extra)


def cache(settings: ToolSettings, deb: Path) -> str:
    """Put ``deb`` in the agent's download cache, as a download step would; return its name."""
    shutil.copy(deb, settings.cache_dir / deb.name)
    return deb.name


@dataclass
class Recorder:
    """A fake ``publish`` for the runner that keeps what it publishes."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.messages.append((topic, payload))
        self.changed.set()

    def statuses(self) -> list[StepStatus]:
        return [StepStatus.model_validate_json(p) for t, p in self.messages if t.endswith("/status")]

    def final(self, command: str) -> JobSnapshot | None:
        snaps = [JobSnapshot.model_validate_json(p) for t, p in self.messages if t.endswith("/job")]
        final = ("succeeded", "failed", "rolled_back", "rollback_failed", "rejected")
        done = [s for s in snaps if s.id == command and s.phase in final]
        return done[-1] if done else None

    async def wait_final(self, command: str, timeout: float = 90.0) -> JobSnapshot:
        deadline = time.monotonic() + timeout
        while (snap := self.final(command)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, [f"{s.index} {s.type} {s.state} {s.detail}" for s in self.statuses()]
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return snap


_issued = [0.0]


async def run_plan(settings: ToolSettings, plan: list[Any]) -> tuple[JobSnapshot, Recorder]:
    """Run one signed apply command through the real CommandRunner (with the package handler)."""
    key = Ed25519PrivateKey.generate()
    settings = ToolSettings(**{**settings.__dict__, "trusted_keys": (public_key_of(key),)})
    issued = max(time.time(), _issued[0] + 0.001)
    _issued[0] = issued
    command = sign_command(
        Command.model_validate(
            {
                "id": new_id(),
                "node": NODE,
                "rollout": f"r-{uuid.uuid4().hex[:6]}",
                "action": "apply",
                "issued_at": issued,
                "expires_at": issued + 600,
                "plan": [step.model_dump() for step in plan],
            }
        ),
        key,
    )
    topics = Topics(f"fleet-t-{uuid.uuid4().hex[:10]}/v1")
    recorder = Recorder()
    runner = CommandRunner(
        settings, topics, recorder.publish, handlers={**HANDLERS, "package": package.HANDLER}
    )
    try:
        await runner.handle_command(topics.node(NODE, "cmd"), encode(command))
        snap = await recorder.wait_final(command.id)
    finally:
        await runner.close()
    return snap, recorder


def write_check_script(settings: ToolSettings, healthy: bool) -> None:
    script = settings.scripts_dir / "check.sh"
    script.write_text(
        "#!/bin/sh\necho healthy\nexit 0\n"
        if healthy
        # Down on the new version only: the restored old one is healthy (FLEET_PHASE=verify).
        else "#!/bin/sh\n[ \"$FLEET_PHASE\" = verify ] && exit 0\necho 'app is down' >&2\nexit 1\n"
    )
    script.chmod(0o755)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def world(tmp_path: Path) -> DebWorld:
    return make_world(tmp_path)


def _upgrade_plan(web: Web, deb: Path, name: str, *, sha256: str | None = None) -> list[Any]:
    body = deb.read_bytes()
    url = web.add(f"/{deb.name}", body)
    return [
        DownloadStep(url=url, sha256=sha256 or hashlib.sha256(body).hexdigest(), name=deb.name),
        PackageStep(manager="dpkg", name=name, src=deb.name),
        HealthStep(check="command", target="check.sh", retries=1, interval_s=0),
    ]


# ------------------------------------------------------------------------- tests


async def test_upgrade_then_failed_health_rolls_back_to_the_exact_old_version(
    world: DebWorld, web: Web, tmp_path: Path
) -> None:
    world.install_by_hand("1.0")
    world.conffile.write_text("setting=edited by the admin\n")
    settings = deb_settings(tmp_path, world.tools)
    write_check_script(settings, healthy=False)

    snap, recorder = await run_plan(settings, _upgrade_plan(web, world.deb("2.0"), world.name))

    assert snap.phase == "failed", snap  # a step failed; the node restored itself, verified
    assert "node restored, restore verified" in snap.detail
    assert world.state() == ("1.0", "installed")
    assert world.version_file.read_text() == "1.0\n"
    assert world.postinst_ran.read_text() == "1.0\n"  # the old package's own postinst ran again
    assert world.conffile.read_text() == "setting=edited by the admin\n"
    states = [(s.index, s.state) for s in recorder.statuses()]
    assert (1, "succeeded") in states
    assert (1, "rolled_back") in states
    failed = [s for s in recorder.statuses() if s.state == "failed"]
    assert failed[0].index == 2
    assert "app is down" in failed[0].detail


async def test_upgrade_keeps_the_file_and_the_next_rollback_uses_it(
    world: DebWorld, web: Web, tmp_path: Path
) -> None:
    settings = deb_settings(tmp_path, world.tools)
    write_check_script(settings, healthy=True)
    world.install_by_hand("1.0")

    snap, _ = await run_plan(settings, _upgrade_plan(web, world.deb("2.0"), world.name))
    assert snap.phase == "succeeded"
    assert world.state() == ("2.0", "installed")
    assert world.version_file.read_text() == "2.0\n"
    kept = settings.state_dir / package.KEPT_DIR / "deb" / f"{world.name}_2.0.deb"
    assert kept.read_bytes() == world.deb("2.0").read_bytes()

    # The next rollout's rollback reinstalls the very 2.0 file the agent installed.
    write_check_script(settings, healthy=False)
    (settings.cache_dir / world.deb("2.0").name).unlink()
    snap, _ = await run_plan(settings, _upgrade_plan(web, world.deb("3.0"), world.name))
    assert snap.phase == "failed", snap  # a step failed; the node restored itself, verified
    assert "node restored, restore verified" in snap.detail
    assert world.state() == ("2.0", "installed")
    assert world.version_file.read_text() == "2.0\n"
    backups = list((settings.state_dir / "backup").rglob(f"{world.name}_2.0.deb"))
    assert [b.read_bytes() for b in backups] == [world.deb("2.0").read_bytes()]


async def test_checksum_mismatch_in_the_download_installs_nothing(
    world: DebWorld, web: Web, tmp_path: Path
) -> None:
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    write_check_script(settings, healthy=True)
    plan = _upgrade_plan(web, world.deb("2.0"), world.name, sha256="0" * 64)

    snap, recorder = await run_plan(settings, plan)

    assert snap.phase == "failed", snap  # a step failed; the node restored itself, verified
    assert "node restored, restore verified" in snap.detail
    assert world.state() == ("1.0", "installed")
    assert world.version_file.read_text() == "1.0\n"
    assert [s.index for s in recorder.statuses() if s.state == "running"] == [0]  # the package step never ran
    assert "sha256 mismatch" in next(s.detail for s in recorder.statuses() if s.state == "failed")
    assert not (settings.cache_dir / world.deb("2.0").name).exists()


async def test_downgrade_3_to_2_and_back(world: DebWorld, tmp_path: Path) -> None:
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    three = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("3.0")))
    first = await package.apply(three, ctx)
    assert first["via"] == "absent"
    assert world.state() == ("3.0", "installed")

    two = PackageStep(manager="dpkg", name=world.name, version="2.0", src=cache(settings, world.deb("2.0")))
    ctx2, calls = make_ctx(settings, command="cmd-2")
    record = await package.apply(two, ctx2)
    assert world.state() == ("2.0", "installed")
    assert world.version_file.read_text() == "2.0\n"
    assert record["old_version"] == "3.0"
    assert record["via"] == "cache"  # the 3.0 file the agent installed first
    assert calls.checkpoints[0] == {"old_version": "3.0", "via": "pending"}
    assert any("downgrading" in line for _, line in calls.output)

    await package.undo(two, ctx2, record)
    assert world.state() == ("3.0", "installed")
    assert world.version_file.read_text() == "3.0\n"
    await package.undo(two, ctx2, record)  # idempotent
    assert world.state() == ("3.0", "installed")


async def test_failing_postinst_fails_with_dpkgs_message_and_undo_restores(
    world: DebWorld, tmp_path: Path
) -> None:
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("2.0+fail")))

    with pytest.raises(StepError) as failed:
        await package.apply(step, ctx)

    assert "post-installation script subprocess returned error exit status 1" in failed.value.reason
    assert world.state() == ("2.0+fail", "half-configured")
    record = calls.checkpoints[-1]
    assert record["old_version"] == "1.0"
    assert record["via"] == "rebuilt"  # no dpkg-repack here and the agent never had the 1.0 file
    await package.undo(step, ctx, record)
    assert world.state() == ("1.0", "installed")
    assert world.version_file.read_text() == "1.0\n"
    assert world.postinst_ran.read_text() == "1.0\n"


async def test_rebuilt_package_matches_the_original(world: DebWorld, tmp_path: Path) -> None:
    extra = {"usr/lib/fleet-test/tool": b"#!/bin/sh\necho tool\n"}
    world.deb("1.0", extra)
    world.install_by_hand("1.0")
    os.symlink("tool", world.root / "usr/lib/fleet-test/tool-link")  # not the package's: left out
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("2.0")))
    record = await package.apply(step, ctx)
    rebuilt = settings.state_dir / record["old_file"]

    def fields(deb: Path) -> dict[str, str]:
        out = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
        return dict(
            line.split(": ", 1) for line in out.splitlines() if ": " in line and not line[0].isspace()
        )

    def contents(deb: Path) -> list[str]:
        out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
        return sorted(
            " ".join([line.split()[0], line.split()[1], line.split()[-1]]) for line in out.splitlines()
        )

    assert fields(rebuilt) == fields(world.deb("1.0"))
    assert contents(rebuilt) == contents(world.deb("1.0"))

    def control_files(deb: Path, into: Path) -> dict[str, str]:
        subprocess.run(["dpkg-deb", "-e", str(deb), str(into)], check=True, capture_output=True)
        return {p.name: p.read_text() for p in into.iterdir() if p.name not in ("control", "md5sums")}

    assert control_files(rebuilt, tmp_path / "rebuilt") == control_files(world.deb("1.0"), tmp_path / "orig")


async def test_fresh_install_is_purged_on_undo(world: DebWorld, tmp_path: Path) -> None:
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("1.0")))
    record = await package.apply(step, ctx)
    assert record == {"old_version": None, "via": "absent", "new_version": "1.0"}
    assert world.state() == ("1.0", "installed")
    await package.undo(step, ctx, record)
    assert world.state() is None
    assert not world.conffile.exists()
    assert not world.version_file.exists()
    await package.undo(step, ctx, record)  # idempotent
    assert world.state() is None


async def test_waits_for_the_dpkg_lock(world: DebWorld, tmp_path: Path) -> None:
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("1.0")))
    lock = world.root / "var/lib/dpkg/lock-frontend"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        task = asyncio.create_task(package.apply(step, ctx))
        deadline = time.monotonic() + 30
        while not any("locked by another process" in line for line in calls.logs):
            assert time.monotonic() < deadline, calls.logs
            assert not task.done(), calls.logs
            await asyncio.sleep(0.05)
        assert world.state() is None
        fcntl.lockf(fd, fcntl.LOCK_UN)
        record = await asyncio.wait_for(task, 60)
    finally:
        os.close(fd)
    assert record["new_version"] == "1.0"
    assert world.state() == ("1.0", "installed")


async def test_a_lock_held_too_long_fails_with_dpkgs_words(world: DebWorld, tmp_path: Path) -> None:
    tools = SystemTools(**{**world.tools.__dict__, "lock_wait_s": 1.0})
    settings = deb_settings(tmp_path, tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("1.0")))
    fd = os.open(world.root / "var/lib/dpkg/lock-frontend", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        with pytest.raises(StepError, match=r"waited 1 s for the lock\).*dpkg frontend lock was locked"):
            await package.apply(step, ctx)
    finally:
        os.close(fd)
    assert world.state() is None


async def test_src_that_is_another_package_changes_nothing(world: DebWorld, tmp_path: Path) -> None:
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    other = build_deb(world.out, f"{world.name}-other", "2.0")
    with pytest.raises(StepError, match=f"is package {world.name}-other, not {world.name}"):
        await package.apply(PackageStep(manager="dpkg", name=world.name, src=cache(settings, other)), ctx)
    with pytest.raises(StepError, match="is not in the download cache"):
        await package.apply(PackageStep(manager="dpkg", name=world.name, src="missing.deb"), ctx)
    wrong = PackageStep(manager="dpkg", name=world.name, version="9.9", src=cache(settings, world.deb("2.0")))
    with pytest.raises(StepError, match=r"is .* 2\.0, not 9\.9"):
        await package.apply(wrong, ctx)
    assert calls.checkpoints == []
    assert world.state() == ("1.0", "installed")


async def test_same_version_is_left_alone(world: DebWorld, tmp_path: Path) -> None:
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("1.0")))
    record = await package.apply(step, ctx)
    assert record == {"unchanged": True, "old_version": "1.0"}
    await package.undo(step, ctx, record)
    assert world.state() == ("1.0", "installed")


def test_intake_checks(world: DebWorld, tmp_path: Path) -> None:
    settings = deb_settings(tmp_path, world.tools, policy=Policy(packages=["fleet-test-*"]))
    assert package.check(PackageStep(manager="dpkg", name=world.name, src="x.deb"), settings) is None
    assert package.check(PackageStep(manager="dpkg", name="openssh-server", src="x.deb"), settings) == (
        "package openssh-server is not allowed by this node's policy"
    )
    assert package.check(PackageStep(manager="dpkg", name=world.name), settings) == (
        "a dpkg package step needs src (a downloaded .deb)"
    )
    gone = deb_settings(tmp_path, SystemTools(dnf=str(tmp_path / "nodnf")))
    assert package.check(PackageStep(manager="dnf", name="x"), gone) == (
        f"{tmp_path / 'nodnf'} is not installed on this node"
    )


async def test_inventory_versions_from_the_same_database(world: DebWorld) -> None:
    world.install_by_hand("1.0")
    found = await versions.package_versions([world.name, "fleet-not-there"], world.tools, family="deb")
    assert found == {world.name: "1.0"}
    state = await versions.deb_package(world.name, world.tools)
    assert state == versions.PackageState("1.0", "installed")
    assert await versions.deb_package("fleet-not-there", world.tools) is None
