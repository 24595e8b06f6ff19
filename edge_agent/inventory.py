"""What a node runs, for its birth message: OS, packages, services, kernel modules.

Every probe is independent: one that fails or times out is logged and leaves
its part empty; the birth is never refused for it. Nothing here blocks the
event loop: files are read through ``asyncio.to_thread`` and commands run
through ``edge_agent.system.run`` with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from bus.errors import FleetError
from bus.messages import Inventory
from edge_agent import system, versions
from edge_agent.settings import ProcessService
from edge_agent.tools import SystemTools

__all__ = [
    "MAX_DRIVERS",
    "collect_inventory",
    "parse_os_release",
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


def _version_of_file(text: str) -> str:
    """A version file's version: its ``version`` if it is a JSON object, else its first line."""
    if text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            version = value.get("version") if isinstance(value, dict) else None
            if isinstance(version, str):
                return version[:_MAX_VERSION]
    return _first_line(text)


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
    names: Sequence[str], tools: SystemTools, *, timeout: float = 10.0
) -> dict[str, str]:
    """Installed versions of ``names`` from dpkg or rpm (whichever this node has); missing ones left out."""
    return await versions.package_versions(names, tools, timeout=timeout)


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
        return _version_of_file(text)
    return ""


async def probe_drivers(names: Sequence[str], tools: SystemTools) -> dict[str, str]:
    """Versions of the named kernel modules (every loaded one, capped, when none are named).

    A loaded module without a version file is reported as ``loaded``; one built
    into the kernel as ``builtin``; a named module that is neither is left out.
    """
    wanted = list(names) if names else sorted(await versions.loaded_modules(tools))[:MAX_DRIVERS]
    found: dict[str, str] = {}
    for name in wanted:
        version = await versions.module_version(name, tools)
        if version is not None:
            found[name.replace("-", "_")] = version
    return found


async def collect_inventory(
    *,
    packages: Sequence[str] = (),
    drivers: Sequence[str] = (),
    services: Mapping[str, ProcessService] | None = None,
    state_dir: Path = Path("."),
    root: Path = Path("/"),
    tools: SystemTools | None = None,
    timeout: float = 10.0,
) -> Inventory:
    """Run every probe concurrently; a failing one is logged and leaves its part empty.

    Args:
        packages: package names to report (dpkg or rpm).
        drivers: kernel modules to report; empty means every loaded one (capped).
        services: supervised services whose versions to report.
        state_dir: working directory for version commands without their own ``cwd``.
        root: file system root for /etc/os-release (tests point it elsewhere).
        tools: the node's package and module tools (dpkg root, /proc and /sys paths).
        timeout: bound of each probe, in seconds.
    """
    probes = {
        "os": probe_os(root),
        "packages": probe_packages(packages, tools or SystemTools(), timeout=timeout),
        "services": probe_services(services or {}, state_dir, timeout=timeout),
        "drivers": probe_drivers(drivers, tools or SystemTools()),
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
