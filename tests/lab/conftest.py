"""Fixtures of the real-host lab (tests/lab/lab.py; tests/README.md says what it needs)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab import hostkit, lab

HostFactory = Callable[..., lab.Host]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def lab_ready() -> None:
    """Skip (with the reason) where the lab cannot run."""
    reason = lab.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_rootfs(lab_ready: None) -> Path:
    started = time.monotonic()
    root = lab.rootfs(log=print)
    print(f"lab: root file system ready in {time.monotonic() - started:.1f} s: {root}")
    return root


@pytest.fixture(scope="session")
def lab_tmp(lab_ready: None) -> Iterator[Path]:
    """The lab's own scratch directory (host overlays, logs), removed at the end.

    Not pytest's tmp_path: pytest prunes old numbered temp dirs of the same user, and another
    pytest run on this machine must not remove a running host's overlay.
    """
    path = Path(tempfile.mkdtemp(prefix="fleetbus-lab-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def lab_wheels(lab_tmp: Path) -> Path:
    started = time.monotonic()
    wheels = lab.wheelhouse(lab_tmp / "wheels")
    print(f"lab: wheelhouse ready in {time.monotonic() - started:.1f} s")
    return wheels


@pytest.fixture(scope="session")
def lab_net(lab_tmp: Path) -> Iterator[lab.LabNet]:
    net = lab.LabNet(lab_tmp / "logs")
    yield net
    net.close()


@pytest.fixture(scope="session")
def boot_host(
    lab_net: lab.LabNet, lab_rootfs: Path, lab_wheels: Path, lab_tmp: Path
) -> Iterator[HostFactory]:
    """``boot_host(name, index)``: a booted host with the wheelhouse and deploy/ staged under /srv."""
    hosts: list[lab.Host] = []

    def boot(name: str, index: int) -> lab.Host:
        host = lab.Host(lab_net, name, index, lab_tmp / f"host-{name}", lab_rootfs)
        hosts.append(host)
        started = time.monotonic()
        host.start(stage=lambda upper: lab.stage_host_files(upper, lab_wheels))
        print(f"lab: {name} booted in {time.monotonic() - started:.1f} s")
        return host

    yield boot
    for host in hosts:
        host.stop()


@pytest.fixture(scope="session")
def lab_fleet(lab_net: lab.LabNet, boot_host: HostFactory, lab_tmp: Path) -> Iterator[hostkit.LabFleet]:
    """Hosts h1 and h2 with demo-web.service, the agent installed by setup.sh, online at a real hub."""
    started = time.monotonic()
    fleet = hostkit.build_fleet(lab_net, boot_host, lab_tmp / "fleet", ["h1", "h2"])
    print(
        f"lab: 2 hosts booted, agents installed by setup.sh and online in {time.monotonic() - started:.1f} s"
    )
    yield fleet
    fleet.fleet.close()
