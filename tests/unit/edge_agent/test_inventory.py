"""Inventory probes: parsers on fixed text, probes on real commands and throwaway roots."""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import pytest

from edge_agent.inventory import (
    MAX_DRIVERS,
    collect_inventory,
    parse_os_release,
    probe_drivers,
    probe_os,
    probe_packages,
    probe_services,
)
from edge_agent.settings import ProcessService
from edge_agent.tools import SystemTools

OS_RELEASE = """# comment
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL='https://www.debian.org/'
broken line
"""

PROC_MODULES = """e1000e 286720 0 - Live 0x0000000000000000
nvidia 56545280 2 nvidia_modeset, Live 0x0000000000000000
snd_hda_intel 57344 3 - Live 0x0000000000000000
"""


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "proc").mkdir()
    (root / "proc/modules").write_text(PROC_MODULES)
    for name in ("e1000e", "nvidia", "snd_hda_intel", "builtin_x"):
        (root / "sys/module" / name).mkdir(parents=True)
    (root / "sys/module/e1000e/version").write_text("3.2.6-k\n")
    return root


def _tools(root: Path) -> SystemTools:
    return SystemTools(sys_module=root / "sys/module", proc_modules=root / "proc/modules")


def test_parse_os_release() -> None:
    values = parse_os_release(OS_RELEASE)
    assert values["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert values["ID"] == "debian"
    assert values["VERSION_CODENAME"] == "bookworm"
    assert values["HOME_URL"] == "https://www.debian.org/"
    assert "broken line" not in values


async def test_probe_os_on_a_fake_root(tmp_path: Path) -> None:
    found = await probe_os(_fake_root(tmp_path))
    assert found["id"] == "debian"
    assert found["version_id"] == "12"
    assert found["pretty_name"] == "Debian GNU/Linux 12 (bookworm)"
    assert found["kernel"] == platform.uname().release
    assert found["arch"] == platform.uname().machine


async def test_probe_os_without_os_release_still_reports_kernel(tmp_path: Path) -> None:
    found = await probe_os(tmp_path)
    assert set(found) == {"kernel", "arch"}


async def test_probe_drivers_named_loaded_builtin_and_missing(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    found = await probe_drivers(["e1000e", "nvidia", "builtin-x", "not_there"], _tools(root))
    assert found == {"e1000e": "3.2.6-k", "nvidia": "loaded", "builtin_x": "builtin"}


async def test_probe_drivers_reports_every_loaded_module_capped(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    assert set(await probe_drivers([], _tools(root))) == {"e1000e", "nvidia", "snd_hda_intel"}
    many = "".join(f"mod{i} 1 0 - Live 0x0\n" for i in range(MAX_DRIVERS + 50))
    (root / "proc/modules").write_text(many)
    assert len(await probe_drivers([], _tools(root))) == MAX_DRIVERS


async def test_probe_drivers_without_proc_modules(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    (root / "proc/modules").unlink()
    assert await probe_drivers([], _tools(root)) == {}
    assert await probe_drivers(["builtin_x"], _tools(root)) == {"builtin_x": "builtin"}


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg")
async def test_probe_packages_with_real_dpkg() -> None:
    found = await probe_packages(["dpkg", "no-such-package-fleetbus"], SystemTools())
    assert set(found) == {"dpkg"}
    assert found["dpkg"][0].isdigit()
    assert await probe_packages([], SystemTools()) == {}


async def test_probe_services_from_version_file_and_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "VERSION").write_text("\n2.4.1\nignored\n")
    services = {
        "from-file": ProcessService(command=["x"], version_file="VERSION"),
        "from-command": ProcessService(
            command=["x"], version_command=[sys.executable, "-c", "print('  1.2.3  ')"]
        ),
        "failing": ProcessService(
            command=["x"], version_command=[sys.executable, "-c", "raise SystemExit(3)"]
        ),
        "missing-program": ProcessService(command=["x"], version_command=["/nonexistent/fleet-version"]),
        "missing-file": ProcessService(command=["x"], version_file="NOPE"),
        "no-version": ProcessService(command=["x"]),
    }
    with caplog.at_level(logging.WARNING):
        found = await probe_services(services, tmp_path)
    assert found == {"from-file": "2.4.1", "from-command": "1.2.3"}
    logged = caplog.text
    for name in ("failing", "missing-program", "missing-file"):
        assert f"version of service {name} unknown" in logged


async def test_a_hanging_probe_does_not_sink_the_inventory(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    services = {
        "slow": ProcessService(
            command=["x"], version_command=[sys.executable, "-c", "import time; time.sleep(30)"]
        )
    }
    started = time.monotonic()
    inventory = await collect_inventory(
        packages=["dpkg"],
        drivers=["e1000e"],
        services=services,
        state_dir=tmp_path,
        root=root,
        tools=_tools(root),
        timeout=1.0,
    )
    assert time.monotonic() - started < 20  # bounded by the probe timeout, not the 30 s sleep
    assert inventory.services == {}
    assert inventory.os["id"] == "debian"
    assert inventory.drivers == {"e1000e": "3.2.6-k"}
    if shutil.which("dpkg-query"):
        assert "dpkg" in inventory.packages


async def test_collect_inventory_of_this_machine(tmp_path: Path) -> None:
    inventory = await collect_inventory(state_dir=tmp_path)
    assert inventory.os["kernel"]
    assert inventory.packages == {}
    assert inventory.services == {}


async def test_a_json_version_file_reports_its_version(tmp_path: Path) -> None:
    (tmp_path / "version.json").write_text('{"version": "2.0", "requires_hw": "rev-b"}\n')
    (tmp_path / "VERSION").write_text("1.4.2\nbuilt today\n")
    services = {
        "json": ProcessService(command=["true"], version_file="version.json"),
        "plain": ProcessService(command=["true"], version_file="VERSION"),
    }
    assert await probe_services(services, tmp_path) == {"json": "2.0", "plain": "1.4.2"}
