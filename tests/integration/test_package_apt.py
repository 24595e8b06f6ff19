"""``package`` step from repositories: the real apt-get (local file repository, throwaway dpkg
root). dnf runs for real in test_package_dnf.py.

The host's apt configuration is never read or touched: APT_CONFIG names a file
that turns off /etc/apt/apt.conf.d, the sources list, lists and cache live in
tmp_path (``-o Dir::Etc::sourcelist=... -o Dir::Etc::sourceparts=-
-o APT::Get::List-Cleanup=0``), and apt's dpkg runs with ``--root``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bus.errors import StepError
from bus.messages import PackageStep
from edge_agent.steps import package
from edge_agent.tools import SystemTools
from tests.integration.test_managers import make_ctx
from tests.integration.test_package_dpkg import DebWorld, deb_settings, make_world

needs_apt = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb")),
    reason="needs apt-get and dpkg",
)


def packages_index(repo: Path) -> str:
    """The Packages file of the .debs in ``repo``: dpkg-scanpackages if installed, else built here."""
    if shutil.which("dpkg-scanpackages"):
        return subprocess.run(
            ["dpkg-scanpackages", "--multiversion", ".", "/dev/null"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    stanzas = []
    for deb in sorted(repo.glob("*.deb")):
        control = subprocess.run(
            ["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True
        ).stdout
        body = deb.read_bytes()
        extra = (
            f"Filename: ./{deb.name}\nSize: {len(body)}\n"
            f"MD5sum: {hashlib.md5(body).hexdigest()}\n"  # noqa: S324 - the index format asks for it
            f"SHA256: {hashlib.sha256(body).hexdigest()}\n"
        )
        stanzas.append(control.rstrip("\n") + "\n" + extra)
    return "\n".join(stanzas)


def apt_world(tmp_path: Path, versions: list[str]) -> tuple[DebWorld, Path]:
    """A throwaway dpkg root and a file repository holding ``versions`` of the world's package."""
    world = make_world(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    for version in versions:
        shutil.copy(world.deb(version), repo)
    (repo / "Packages").write_text(packages_index(repo))
    apt = tmp_path / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "empty-parts"):
        (apt / sub).mkdir(parents=True)
    (apt / "sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    # Read before anything else: no /etc/apt/apt.conf.d (host hooks), no /etc/apt/apt.conf.
    (apt / "apt.conf").write_text(f'Dir::Etc::parts "{apt / "empty-parts"}";\nDir::Etc::main "/dev/null";\n')
    options = (
        f"Dir::Etc::sourcelist={apt / 'sources.list'}",
        "Dir::Etc::sourceparts=-",
        "APT::Get::List-Cleanup=0",
        f"Dir::State::Lists={apt / 'lists'}",
        f"Dir::Cache={apt / 'cache'}",
        "APT::Sandbox::User=root",
    )
    world.tools = replace(
        world.tools,
        apt_options=tuple(word for option in options for word in ("-o", option)),
        env={"APT_CONFIG": str(apt / "apt.conf")},
    )
    return world, repo


@needs_apt
async def test_install_pinned_version_and_roll_back_to_the_repository_version(tmp_path: Path) -> None:
    world, _ = apt_world(tmp_path, ["1.0", "2.0", "3.0"])
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    one = PackageStep(manager="apt", name=world.name, version="1.0")
    first = await package.apply(one, ctx)
    assert first == {"old_version": None, "via": "absent", "new_version": "1.0"}
    # The lists were empty: apt did not know the version, so they were refreshed once.
    assert any("apt-get update" in line for line in calls.logs)
    assert world.state() == ("1.0", "installed")

    two = PackageStep(manager="apt", name=world.name, version="2.0")
    ctx2, _ = make_ctx(settings, command="cmd-2")
    record = await package.apply(two, ctx2)
    assert record == {
        "old_version": "1.0",
        "old_status": "installed",
        "via": "repository",
        "new_version": "2.0",
    }
    assert world.state() == ("2.0", "installed")
    assert world.version_file.read_text() == "2.0\n"

    await package.undo(two, ctx2, record)
    assert world.state() == ("1.0", "installed")
    assert world.version_file.read_text() == "1.0\n"
    await package.undo(one, ctx, first)
    assert world.state() is None


@needs_apt
async def test_rollback_without_the_old_version_in_the_repository_uses_a_rebuilt_package(
    tmp_path: Path,
) -> None:
    world, _ = apt_world(tmp_path, ["2.0"])
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="apt", name=world.name, version="2.0")

    record = await package.apply(step, ctx)

    assert record["via"] == "rebuilt"
    assert world.state() == ("2.0", "installed")
    await package.undo(step, ctx, record)
    assert world.state() == ("1.0", "installed")
    assert world.version_file.read_text() == "1.0\n"
    assert world.postinst_ran.read_text() == "1.0\n"


@needs_apt
async def test_apt_installs_a_downloaded_file_and_purges_it_on_undo(tmp_path: Path) -> None:
    world, _ = apt_world(tmp_path, ["1.0"])
    settings = deb_settings(tmp_path, world.tools)
    shutil.copy(world.deb("1.0"), settings.cache_dir)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="apt", name=world.name, src=world.deb("1.0").name)
    record = await package.apply(step, ctx)
    assert record == {"old_version": None, "via": "absent", "new_version": "1.0"}
    assert world.state() == ("1.0", "installed")
    await package.undo(step, ctx, record)
    assert world.state() is None
    assert not world.conffile.exists()


@needs_apt
async def test_unknown_version_fails_with_apts_message_and_changes_nothing(tmp_path: Path) -> None:
    world, _ = apt_world(tmp_path, ["1.0"])
    world.install_by_hand("1.0")
    settings = deb_settings(tmp_path, world.tools)
    ctx, calls = make_ctx(settings)
    step = PackageStep(manager="apt", name=world.name, version="9.9")
    with pytest.raises(StepError, match=rf"E: Version '9\.9' for '{world.name}' was not found"):
        await package.apply(step, ctx)
    assert world.state() == ("1.0", "installed")
    await package.undo(step, ctx, calls.checkpoints[-1])
    assert world.state() == ("1.0", "installed")


@needs_apt
async def test_apt_waits_for_the_dpkg_lock_within_the_bound(tmp_path: Path) -> None:
    world, _ = apt_world(tmp_path, ["1.0"])
    world.tools = replace(world.tools, lock_wait_s=1.0)
    settings = deb_settings(tmp_path, world.tools)
    ctx, _ = make_ctx(settings)
    step = PackageStep(manager="apt", name=world.name, version="1.0")
    fd = os.open(world.root / "var/lib/dpkg/lock-frontend", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(StepError, match=r"E: .*dpkg frontend lock .*lock-frontend"):
            await package.apply(step, ctx)
        waited = time.monotonic() - started
    finally:
        os.close(fd)
    assert waited >= 1.0
    assert world.state() is None


def test_apt_options_point_apt_at_the_same_dpkg_root(tmp_path: Path) -> None:
    tools = SystemTools(dpkg_root=tmp_path, dpkg_force=("script-chrootless",), apt_options=("-o", "A=b"))
    assert tools.apt_args() == [
        "-o",
        f"Dir::State::status={tmp_path}/var/lib/dpkg/status",
        "-o",
        f"DPkg::Options::=--root={tmp_path}",
        "-o",
        "DPkg::Options::=--force-script-chrootless",
        "-o",
        "A=b",
    ]
