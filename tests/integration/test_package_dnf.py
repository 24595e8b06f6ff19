"""``package`` step with dnf and rpm for real: RPMs built by rpmbuild, a createrepo_c repository,
a throwaway install root.

The packages (``fleet-app`` 1.0, 2.0 and 3.0, noarch, one file ``/opt/fleet-app/VERSION``) are
built once per session. Each test gets its own install root and repository; dnf reads only
the test's configuration file (``--config``, whose ``reposdir`` holds one ``file://``
repository), never the host's, and installs under the root (``--installroot``; rpm
``--root``), the way the agent is pointed there by its ``rpm_root`` and ``dnf_config``.
yum 3 (whose ``install`` of an older version does nothing) is not a dnf: it stays a fake.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from bus.errors import StepError
from bus.messages import PackageStep, Step
from bus.topics import Topics
from edge_agent import preflight, versions
from edge_agent.config import load_agent_config
from edge_agent.steps import package
from edge_agent.tools import SystemTools
from tests.conftest import RunningBroker
from tests.integration.test_managers import FakeSystem, install_fakes, make_ctx
from tests.integration.test_package_dpkg import deb_settings

_LOGGER = logging.getLogger(__name__)
STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])

RPM_TOOLS = ("dnf", "rpm", "rpmbuild", "createrepo_c")
MISSING = [tool for tool in RPM_TOOLS if shutil.which(tool) is None]
if os.geteuid() != 0:
    # dnf refuses installs without root ("has to be run with superuser privileges"), even in an install root.
    MISSING.append("root (dnf installs only as root)")
needs_dnf = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: dnf, rpm, createrepo-c)"
)

NAME = "fleet-app"
VERSIONS = ("1.0", "2.0", "3.0")
SPEC = """\
Name: fleet-app
Version: %{fleet_version}
Release: 1
Summary: fleetbus test package
License: MIT
BuildArch: noarch

%description
A tiny package for the package step's tests.

%install
mkdir -p %{buildroot}/opt/fleet-app
echo %{fleet_version} > %{buildroot}/opt/fleet-app/VERSION

%files
/opt/fleet-app/VERSION
"""


@dataclass(frozen=True)
class Builds:
    """The session's .rpm files: one per version, and a copy of 3.0 with a damaged payload."""

    rpms: dict[str, Path]
    corrupt: Path
    seconds: float


def build_rpms(top: Path) -> Builds:
    """Build fleet-app 1.0, 2.0 and 3.0 with ``rpmbuild -bb`` under ``top``, and a damaged copy of 3.0."""
    spec = top / "fleet-app.spec"
    spec.write_text(SPEC)
    started = time.monotonic()
    rpms: dict[str, Path] = {}
    for version in VERSIONS:
        defines = ["--define", f"_topdir {top}", "--define", f"fleet_version {version}"]
        subprocess.run(["rpmbuild", "-bb", *defines, str(spec)], capture_output=True, check=True, timeout=120)
        rpms[version] = top / "RPMS" / "noarch" / f"{NAME}-{version}-1.noarch.rpm"
        assert rpms[version].is_file(), rpms[version]
    corrupt = top / "corrupt" / f"{NAME}-3.0-1.noarch.damaged.rpm"
    corrupt.parent.mkdir()
    body = bytearray(rpms["3.0"].read_bytes())
    body[-40] ^= 0xFF  # in the compressed payload: the header (name, version) still reads
    corrupt.write_bytes(bytes(body))
    return Builds(rpms, corrupt, time.monotonic() - started)


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}")
    made = build_rpms(tmp_path_factory.mktemp("rpmbuild"))
    _LOGGER.info("3 RPMs built in %.2f s", made.seconds)
    return made


@dataclass
class RpmWorld:
    """A throwaway install root, a local repository and the dnf configuration naming it."""

    root: Path
    repo: Path
    config: Path
    builds: Builds

    @property
    def tools(self) -> SystemTools:
        return SystemTools(rpm_root=self.root, dnf_config=self.config)

    def publish(self, *wanted: str) -> None:
        """Make the repository hold exactly these versions (createrepo_c)."""
        for old in self.repo.glob("*.rpm"):
            old.unlink()
        for version in wanted:
            shutil.copy(self.builds.rpms[version], self.repo)
        subprocess.run(["createrepo_c", "-q", str(self.repo)], capture_output=True, check=True, timeout=60)
        # A repository rewritten within the second of dnf's last look was not always seen as changed
        # (metadata_expire=0 notwithstanding; measured here): drop the root's cached metadata.
        shutil.rmtree(self.root / "var" / "cache" / "dnf", ignore_errors=True)

    def state(self) -> str | None:
        """The installed VERSION-RELEASE, from rpm's database in the root."""
        result = subprocess.run(
            ["rpm", f"--root={self.root}", "-q", "--qf", "%{VERSION}-%{RELEASE}", NAME],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def version_file(self) -> str | None:
        path = self.root / "opt" / NAME / "VERSION"
        return path.read_text().strip() if path.exists() else None

    def dnf(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run dnf in the root with the world's configuration."""
        argv = ["dnf", f"--installroot={self.root}", f"--config={self.config}", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)

    def install_by_hand(self, version: str) -> None:
        """Install a version behind the agent's back (from the file, as an operator would)."""
        done = self.dnf("-y", "-q", "install", str(self.builds.rpms[version]))
        assert done.returncode == 0, done.stderr
        assert self.state() == f"{version}-1"


def rpm_world(tmp_path: Path, builds: Builds, *published: str) -> RpmWorld:
    root, repo, reposdir = tmp_path / "root", tmp_path / "repo", tmp_path / "repos.d"
    for directory in (root, repo, reposdir):
        directory.mkdir(parents=True)
    (reposdir / "local.repo").write_text(
        f"[local]\nname=fleet test repository\nbaseurl=file://{repo}\nenabled=1\ngpgcheck=0\n"
    )
    config = tmp_path / "dnf.conf"
    # metadata_expire=0: a test that changes the repository is seen at the next call.
    config.write_text(
        f"[main]\nreposdir={reposdir}\ngpgcheck=0\ninstall_weak_deps=0\nmetadata_expire=0\n"
        "keepcache=0\nplugins=0\n"
    )
    world = RpmWorld(root, repo, config, builds)
    world.publish(*published)
    return world


# ------------------------------------------------------------------ the step


@needs_dnf
async def test_install_upgrade_and_downgrade_on_rollback_to_the_exact_kept_version(
    tmp_path: Path, builds: Builds
) -> None:
    world = rpm_world(tmp_path, builds, "1.0", "2.0", "3.0")
    settings = deb_settings(tmp_path, world.tools)
    one = PackageStep(manager="dnf", name=NAME, version="1.0")
    assert package.check(one, settings) is None
    ctx, _ = make_ctx(settings)
    first = await package.apply(one, ctx)
    assert first == {"old_version": None, "via": "absent", "new_version": "1.0-1"}
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")

    two = PackageStep(manager="dnf", name=NAME, version="2.0")
    ctx2, calls = make_ctx(settings, command="cmd-2")
    record = await package.apply(two, ctx2)
    kept = settings.state_dir / record.pop("old_file")
    assert record == {
        "old_version": "1.0-1",
        "old_status": "installed",
        "via": "repository",
        "new_version": "2.0-1",
    }
    assert calls.checkpoints[0] == {"old_version": "1.0-1", "via": "pending"}
    assert kept.read_bytes() == builds.rpms["1.0"].read_bytes(), "the kept file is not the replaced 1.0"
    assert (world.state(), world.version_file()) == ("2.0-1", "2.0")

    # The repository moves on: 1.0 is gone from it. The rollback still puts exactly 1.0 back.
    world.publish("2.0", "3.0")
    record["old_file"] = str(kept.relative_to(settings.state_dir))
    await package.undo(two, ctx2, record)
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")
    await package.undo(two, ctx2, record)  # idempotent
    assert world.state() == "1.0-1"

    await package.undo(one, ctx, first)
    assert world.state() is None
    assert world.version_file() is None


@needs_dnf
async def test_yum_4_which_is_dnf_upgrades_and_rolls_back_alike(tmp_path: Path, builds: Builds) -> None:
    """On RHEL 8 and later ``yum`` is dnf: the yum manager runs it with the same root and config."""
    world = rpm_world(tmp_path, builds, "1.0", "2.0")
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, replace(world.tools, yum=str(shutil.which("dnf"))))
    step = PackageStep(manager="yum", name=NAME, version="2.0")
    assert package.check(step, settings) is None
    ctx, _ = make_ctx(settings)
    record = await package.apply(step, ctx)
    assert (record["via"], record["old_version"], record["new_version"]) == ("repository", "1.0-1", "2.0-1")
    assert (world.state(), world.version_file()) == ("2.0-1", "2.0")
    await package.undo(step, ctx, record)
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")


@needs_dnf
async def test_a_downloaded_rpm_is_kept_and_reinstalled_on_rollback(tmp_path: Path, builds: Builds) -> None:
    world = rpm_world(tmp_path, builds, "2.0")
    settings = deb_settings(tmp_path, world.tools)
    for version in ("1.0", "3.0"):
        shutil.copy(builds.rpms[version], settings.cache_dir)
    ctx, _ = make_ctx(settings)
    first = PackageStep(manager="dnf", name=NAME, src=builds.rpms["1.0"].name)
    assert await package.apply(first, ctx) == {"old_version": None, "via": "absent", "new_version": "1.0-1"}

    ctx3, _ = make_ctx(settings, command="cmd-3")
    third = PackageStep(manager="dnf", name=NAME, version="3.0", src=builds.rpms["3.0"].name)
    record = await package.apply(third, ctx3)
    assert (record["via"], record["old_version"], record["new_version"]) == ("cache", "1.0-1", "3.0-1")
    assert world.state() == "3.0-1"
    (settings.cache_dir / builds.rpms["1.0"].name).unlink()  # the cache may be pruned: the backup is used
    await package.undo(third, ctx3, record)
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")


@needs_dnf
async def test_a_version_not_in_the_repository_is_refused_and_nothing_changes(
    tmp_path: Path, builds: Builds
) -> None:
    world = rpm_world(tmp_path, builds, "1.0", "2.0")
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    step = PackageStep(manager="dnf", name=NAME, version="9.9")
    with pytest.raises(StepError) as caught:
        await package.apply(step, ctx)
    assert (
        "dnf install fleet-app-9.9 failed (exit 1) (not in this node's repositories)" in caught.value.reason
    )
    assert "Unable to find a match: fleet-app-9.9" in caught.value.reason
    assert world.state() == "1.0-1"
    await package.undo(step, ctx, calls.checkpoints[-1])
    assert world.state() == "1.0-1"


@needs_dnf
async def test_no_way_back_is_refused_before_anything_changes(tmp_path: Path, builds: Builds) -> None:
    world = rpm_world(tmp_path, builds, "2.0")
    world.install_by_hand("1.0")  # from a file: no repository has 1.0, the agent never kept it
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    with pytest.raises(StepError, match=r"no way back to fleet-app 1\.0-1: .*no repository .* offers it"):
        await package.apply(PackageStep(manager="dnf", name=NAME, version="2.0"), ctx)
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")


@needs_dnf
async def test_a_corrupt_package_is_refused_by_rpms_checks(tmp_path: Path, builds: Builds) -> None:
    world = rpm_world(tmp_path, builds, "1.0")
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    shutil.copy(builds.corrupt, settings.cache_dir)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="dnf", name=NAME, src=builds.corrupt.name)
    with pytest.raises(StepError) as caught:
        await package.apply(step, ctx)
    assert caught.value.reason.startswith(f"{builds.corrupt.name} fails rpm's checks (rpm -K): ")
    assert "Payload SHA256 digest: BAD" in caught.value.reason
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0")
    # dnf itself refuses it too (its transaction test), should the step's own check be skipped.
    refused = world.dnf("-y", "install", str(settings.cache_dir / builds.corrupt.name))
    assert refused.returncode == 1
    assert "does not verify: Payload SHA256" in refused.stderr
    assert world.state() == "1.0-1"


# ------------------------------------------------------------------ pre-flight


@needs_dnf
async def test_preflight_simulates_with_assumeno_in_the_install_root(tmp_path: Path, builds: Builds) -> None:
    world = rpm_world(tmp_path, builds, "1.0", "2.0")
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    shutil.copy(builds.corrupt, settings.cache_dir)
    shutil.copy(builds.rpms["3.0"], settings.cache_dir)
    plan = STEPS.validate_python([
        {"type": "package", "manager": "dnf", "name": NAME, "version": "2.0"},
        {"type": "package", "manager": "dnf", "name": NAME, "version": "9.9"},
        {"type": "package", "manager": "dnf", "name": NAME, "src": builds.corrupt.name},
        {"type": "package", "manager": "dnf", "name": NAME, "version": "1.0"},
    ])  # fmt: skip
    found = await preflight.run_preflight(plan, settings, timeout=120)
    states = [(c.state, c.detail) for c in found[:4]]
    would = "dnf --assumeno: the install would proceed; the way back to 1.0-1 is there"
    assert states[0] == ("succeeded", would), states
    assert states[1][0] == "failed", states
    assert "not in this node's repositories" in states[1][1]
    assert "Unable to find a match: fleet-app-9.9" in states[1][1]
    assert states[2][0] == "failed", states
    assert "fails rpm's checks (rpm -K)" in states[2][1]
    assert states[3][0] == "succeeded", states  # already installed: dnf has nothing to do
    assert (world.state(), world.version_file()) == ("1.0-1", "1.0"), "a pre-flight changed the root"
    # The same file, undamaged, simulates fine.
    good = STEPS.validate_python(
        [{"type": "package", "manager": "dnf", "name": NAME, "src": builds.rpms["3.0"].name}]
    )
    (check, _disk) = await preflight.run_preflight(good, settings, timeout=120)
    assert (check.state, check.detail) == ("succeeded", would)

    # The repository moves on without 1.0: an update would find no way back, the pre-flight says so.
    world.publish("2.0")
    (check, _disk) = await preflight.run_preflight(plan[:1], settings, timeout=120)
    assert check.state == "failed", check
    assert check.detail.startswith("no way back to fleet-app 1.0-1: the agent did not keep it"), check
    assert "not available" in check.detail
    # Unless the agent kept the file of the installed version (it installed it itself).
    kept = package.kept_path(settings.state_dir, "rpm", NAME, "1.0-1")
    kept.parent.mkdir(parents=True)
    shutil.copy(builds.rpms["1.0"], kept)
    (check, _disk) = await preflight.run_preflight(plan[:1], settings, timeout=120)
    assert (check.state, check.detail) == ("succeeded", would)
    assert world.state() == "1.0-1"
    assert sorted(p.name for p in settings.state_dir.rglob("*.rpm")) == sorted(
        [builds.corrupt.name, builds.rpms["3.0"].name, kept.name]
    ), "a pre-flight left files behind"


# ------------------------------------------------------------------ configuration


def test_rpm_root_and_dnf_config_come_from_toml_and_the_environment(tmp_path: Path) -> None:
    toml = '[agent]\nnode_id = "n1"\nrpm_root = "roots/rpm"\ndnf_config = "dnf.conf"\n'
    config = load_agent_config({}, {}, toml, config_dir=tmp_path)
    tools = config.system_tools()
    assert (tools.rpm_root, tools.dnf_config) == (tmp_path / "roots/rpm", tmp_path / "dnf.conf")
    assert config.to_executor_settings().tools == tools
    assert tools.dnf_args() == [
        f"--installroot={tmp_path / 'roots/rpm'}",
        f"--config={tmp_path / 'dnf.conf'}",
    ]
    assert tools.rpm_args() == [f"--root={tmp_path / 'roots/rpm'}"]
    env = {"FLEET_RPM_ROOT": "/srv/root", "FLEET_DNF_CONFIG": "/srv/dnf.conf"}
    from_env = load_agent_config({}, env, toml, config_dir=tmp_path).system_tools()
    assert (from_env.rpm_root, from_env.dnf_config) == (Path("/srv/root"), Path("/srv/dnf.conf"))
    live = load_agent_config({"node_id": "n1"}, {}).system_tools()
    assert (live.dnf_args(), live.rpm_args()) == ([], [])


def test_a_missing_install_root_or_dnf_config_is_refused_at_intake(tmp_path: Path) -> None:
    step = PackageStep(manager="dnf", name=NAME, version="2.0")
    gone = SystemTools(dnf="true", rpm="true", rpm_root=tmp_path / "nosuch")
    assert package.check(step, deb_settings(tmp_path, gone)) == (
        f"the RPM install root {tmp_path / 'nosuch'} (rpm_root) is not a directory"
    )
    no_conf = SystemTools(dnf="true", rpm="true", rpm_root=tmp_path, dnf_config=tmp_path / "dnf.conf")
    assert package.check(step, deb_settings(tmp_path, no_conf)) == (
        f"the dnf configuration {tmp_path / 'dnf.conf'} (dnf_config) is not a file"
    )


@needs_dnf
async def test_inventory_reads_the_install_roots_rpm_database(tmp_path: Path, builds: Builds) -> None:
    world = rpm_world(tmp_path, builds, "1.0")
    world.install_by_hand("1.0")
    assert await versions.package_versions([NAME, "bash"], world.tools) == {NAME: "1.0-1"}


# ------------------------------------------------------------------ a real agent and a rollout


@needs_dnf
async def test_a_rollout_upgrades_through_a_real_agent_and_rolls_back_to_the_kept_version(
    tmp_path: Path, builds: Builds, amqtt_broker: RunningBroker, topics: Topics
) -> None:
    from tests.fault.conftest import Fleet, observing

    world = rpm_world(tmp_path, builds, "1.0", "2.0", "3.0")
    world.install_by_hand("1.0")
    fleet = Fleet(amqtt_broker.url, tmp_path / "fleet", topics)
    node = "rpm-1"
    env = {"FLEET_RPM_ROOT": str(world.root), "FLEET_DNF_CONFIG": str(world.config), "FLEET_PACKAGES": NAME}
    try:
        async with observing(amqtt_broker.url, topics) as observer:
            fleet.start_hub()
            fleet.start_agent(node, env=env)
            await observer.hub_ready(0)
            await observer.online([node])

            def reported(version: str) -> bool | None:
                state = observer.states.get(node)
                return (state is not None and state.inventory.packages.get(NAME) == version) or None

            await observer.wait(lambda: reported("1.0-1"), "the birth to report fleet-app 1.0-1")
            started = time.monotonic()
            plan = [{"type": "package", "manager": "dnf", "name": NAME, "version": "2.0"}]
            good = {"name": "rpm 2.0", "targets": [node], "plan": plan}
            rollout = (await observer.ok("create_rollout", good))["rollout"]
            summary = await observer.final(rollout)
            good_s = time.monotonic() - started
            assert summary.state == "succeeded", f"{summary}\n{fleet.logs()}"
            assert (world.state(), world.version_file()) == ("2.0-1", "2.0")
            await observer.wait(lambda: reported("2.0-1"), "the birth to report fleet-app 2.0-1")

            # 3.0 goes in, then the node's health check fails: the agent puts exactly 2.0 back.
            (fleet.state_dir(node) / "broken").write_text("")
            bad = {"name": "rpm 3.0", "targets": [node], "plan": [
                {"type": "package", "manager": "dnf", "name": NAME, "version": "3.0"},
                {"type": "health", "check": "command", "target": "gate.sh", "retries": 1},
            ]}  # fmt: skip
            started = time.monotonic()
            rollout = (await observer.ok("create_rollout", bad))["rollout"]
            summary = await observer.final(rollout)
            bad_s = time.monotonic() - started
            assert summary.state == "rolled_back", f"{summary}\n{fleet.logs()}"
            assert (world.state(), world.version_file()) == ("2.0-1", "2.0")
            installed = [s for s in observer.statuses if s.rollout == rollout and s.index == 0]
            assert [s.state for s in installed][-1] == "rolled_back", installed
            # The rollback reinstalled the 2.0 file the agent downloaded before installing 3.0.
            assert list((fleet.state_dir(node) / "backup").rglob(builds.rpms["2.0"].name)), fleet.logs()
            _LOGGER.info("rollouts: good %.1f s, bad (install 3.0, fail, roll back) %.1f s", good_s, bad_s)
    finally:
        fleet.close()


# ------------------------------------------------------------------ yum 3 (fake)


@pytest.fixture
def yum_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystem:
    system = install_fakes(monkeypatch, tmp_path)
    system.write("rpm.json", {"repo": {NAME: ["1.0-1", "2.0-1"]}, "installed": {NAME: "1.0-1"}})
    return system


async def test_yum3_install_of_an_older_version_does_nothing_so_the_rollback_downgrades(
    yum_fake: FakeSystem, tmp_path: Path
) -> None:
    """yum 3 (RHEL 7) is no dnf: its ``install`` of an older version exits 0 and does nothing."""
    settings = yum_fake.settings(tmp_path)
    step = PackageStep(manager="yum", name=NAME, version="2.0")
    assert package.check(step, settings) is None
    ctx, _ = make_ctx(settings)
    record = await package.apply(step, ctx)
    assert record["via"] == "repository"
    assert (record["old_version"], record["new_version"]) == ("1.0-1", "2.0-1")
    assert yum_fake.read("rpm.json")["installed"] == {NAME: "2.0-1"}
    await package.undo(step, ctx, record)
    assert yum_fake.read("rpm.json")["installed"] == {NAME: "1.0-1"}
    calls = yum_fake.calls("yum")
    kept = str(settings.state_dir / record["old_file"])
    assert calls[-2:] == [["-y", "install", kept], ["-y", "downgrade", kept]]
