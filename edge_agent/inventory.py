"""What a node runs, for its birth message: OS, packages, services, kernel modules.

Every probe is independent: one that fails or times out is logged and leaves
its part empty; the birth is never refused for it. Nothing here blocks the
event loop: files are read through ``asyncio.to_thread`` and commands run
through ``edge_agent.system.run`` with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from bus.errors import FleetError
from bus.messages import Inventory
from edge_agent import system
from edge_agent.settings import ProcessService

__all__ = [
    "MAX_DRIVERS",
    "collect_inventory",
    "parse_dpkg_query",
    "parse_os_release",
    "parse_proc_modules",
    "parse_rpm_query",
    "probe_drivers",
    "probe_os",
    "probe_packages",
    "probe_services",
]

_LOGGER = logging.getLogger(__name__)

#: At most this many kernel modules are reported when none are configured.
MAX_DRIVERS = 64
#: Versions longer than this are cut (a runaway version command must not bloat the birth).
_MAX_VERSION = 128
_OS_KEYS = ("ID", "NAME", "VERSION_ID", "PRETTY_NAME", "VERSION_CODENAME")


# ----------------------------------------------------------------- pure parsers


def parse_os_release(text: str) -> dict[str, str]:
    """The ``KEY=value`` pairs of an os-release file, quotes removed."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[key.strip()] = value
    return values


def parse_proc_modules(text: str) -> list[str]:
    """Names of the loaded modules in /proc/modules text, in file order."""
    return [line.split(maxsplit=1)[0] for line in text.splitlines() if line.strip()]


def parse_dpkg_query(text: str) -> dict[str, str]:
    r"""Installed versions from ``dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Status}\n'``."""
    versions: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].strip() == "installed" and parts[1]:
            versions[parts[0].split(":")[0]] = parts[1]
    return versions


def parse_rpm_query(text: str) -> dict[str, str]:
    r"""Versions from ``rpm -q --qf '%{NAME}\t%{VERSION}-%{RELEASE}\n'`` (misses are skipped)."""
    versions: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] and parts[1]:
            versions[parts[0]] = parts[1]
    return versions


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:_MAX_VERSION]
    return ""


# ------------------------------------------------------------------------ probes


async def probe_os(root: Path = Path("/")) -> dict[str, str]:
    """OS id, name and version (from /etc/os-release), kernel release and machine arch."""
    uname = platform.uname()
    found: dict[str, str] = {"kernel": uname.release, "arch": uname.machine}
    for candidate in (root / "etc/os-release", root / "usr/lib/os-release"):
        try:
            text = await asyncio.to_thread(candidate.read_text, encoding="utf-8", errors="replace")
        except OSError:
            continue
        release = parse_os_release(text)
        found.update({key.lower(): release[key] for key in _OS_KEYS if key in release})
        break
    return found


async def probe_packages(
    names: Sequence[str], *, timeout: float = 10.0, manager: str | None = None
) -> dict[str, str]:
    """Installed versions of ``names`` from dpkg or rpm (whichever this node has).

    Packages that are not installed are left out. ``manager`` ("dpkg" or "rpm")
    skips the detection.
    """
    if not names:
        return {}
    manager = manager or ("dpkg" if shutil.which("dpkg-query") else "rpm" if shutil.which("rpm") else None)
    if manager is None:
        _LOGGER.warning("inventory: neither dpkg-query nor rpm found; package versions not reported")
        return {}
    if manager == "dpkg":
        fmt = "${Package}\t${Version}\t${db:Status-Status}\n"
        result = await system.run(["dpkg-query", "-W", f"-f={fmt}", "--", *names], timeout=timeout)
        return parse_dpkg_query(result.stdout)
    result = await system.run(
        ["rpm", "-q", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n", "--", *names], timeout=timeout
    )
    return parse_rpm_query(result.stdout)


async def probe_services(
    services: Mapping[str, ProcessService], state_dir: Path, *, timeout: float = 10.0
) -> dict[str, str]:
    """Versions of supervised services from their ``version_command`` or ``version_file``."""
    versions: dict[str, str] = {}
    for name, service in services.items():
        try:
            version = await _service_version(service, state_dir, timeout)
        except (FleetError, OSError, UnicodeDecodeError) as exc:
            _LOGGER.warning("inventory: version of service %s unknown: %s", name, exc)
            continue
        if version:
            versions[name] = version
    return versions


async def _service_version(service: ProcessService, state_dir: Path, timeout: float) -> str:
    cwd = Path(service.cwd) if service.cwd else state_dir
    if service.version_command:
        env = {**os.environ, **service.env} if service.env else None
        result = await system.run(
            service.version_command, timeout=timeout, cwd=cwd if cwd.is_dir() else None, env=env
        )
        if not result.ok:
            raise FleetError(f"{service.version_command[0]} exited {result.returncode}: {result.tail()}")
        return _first_line(result.stdout)
    if service.version_file:
        path = cwd / service.version_file
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        return _first_line(text)
    return ""


async def probe_drivers(names: Sequence[str], root: Path = Path("/")) -> dict[str, str]:
    """Versions of the named kernel modules (every loaded one, capped, when none are named).

    A loaded module without a version file is reported as ``loaded``; one built
    into the kernel (in /sys/module but not /proc/modules) as ``builtin``;
    a named module that is neither is left out.
    """
    try:
        text = await asyncio.to_thread((root / "proc/modules").read_text, encoding="utf-8", errors="replace")
    except FileNotFoundError:  # a kernel without loadable modules: only built-ins are left
        _LOGGER.debug("inventory: no %s", root / "proc/modules")
        text = ""
    loaded = parse_proc_modules(text)
    # modprobe treats '-' and '_' alike; the kernel lists '_'.
    wanted = [n.replace("-", "_") for n in names] if names else loaded[:MAX_DRIVERS]
    return await asyncio.to_thread(_driver_versions, wanted, set(loaded), root / "sys/module")


def _driver_versions(wanted: Sequence[str], loaded: set[str], sys_module: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in wanted:
        base = sys_module / name
        try:
            version = _first_line((base / "version").read_text(encoding="utf-8", errors="replace"))
        except OSError:
            version = ""
        if version:
            versions[name] = version
        elif name in loaded:
            versions[name] = "loaded"
        elif base.is_dir():
            versions[name] = "builtin"
    return versions


async def collect_inventory(
    *,
    packages: Sequence[str] = (),
    drivers: Sequence[str] = (),
    services: Mapping[str, ProcessService] | None = None,
    state_dir: Path = Path("."),
    root: Path = Path("/"),
    timeout: float = 10.0,
) -> Inventory:
    """Run every probe concurrently; a failing one is logged and leaves its part empty.

    Args:
        packages: package names to report (dpkg or rpm).
        drivers: kernel modules to report; empty means every loaded one (capped).
        services: supervised services whose versions to report.
        state_dir: working directory for version commands without their own ``cwd``.
        root: file system root for /etc, /proc and /sys (tests point it elsewhere).
        timeout: bound of each probe, in seconds.
    """
    probes = {
        "os": probe_os(root),
        "packages": probe_packages(packages, timeout=timeout),
        "services": probe_services(services or {}, state_dir, timeout=timeout),
        "drivers": probe_drivers(drivers, root),
    }
    results = await asyncio.gather(
        *(asyncio.wait_for(probe, timeout + 1) for probe in probes.values()), return_exceptions=True
    )
    parts: dict[str, dict[str, str]] = {}
    for name, result in zip(probes, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            _LOGGER.warning("inventory: %s probe failed: %s", name, result or type(result).__name__)
            parts[name] = {}
        else:
            parts[name] = result
    return Inventory(**parts)
