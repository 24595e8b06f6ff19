"""Probe what is installed and running: package versions, kernel modules, containers, services.

The package, container and module steps ask these before they change anything
(the way back is the version found here), and the agent's inventory reports
them. Every probe goes through ``edge_agent.tools.call`` (the tools of a
``SystemTools``), with a timeout; file reads go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bus.errors import StepError
from edge_agent.managers.docker import DockerManager
from edge_agent.managers.systemd import SystemdManager
from edge_agent.tools import SystemTools, call, tool_message

__all__ = [
    "DEB_MANAGERS",
    "RPM_MANAGERS",
    "PackageState",
    "container_image",
    "deb_package",
    "loaded_modules",
    "module_file_version",
    "module_version",
    "package_family",
    "package_state",
    "package_versions",
    "parse_dpkg_status",
    "parse_proc_modules",
    "parse_rpm_versions",
    "rpm_package",
    "service_state",
]

DEB_MANAGERS = ("apt", "dpkg")
RPM_MANAGERS = ("dnf", "yum", "rpm")
#: dpkg states in which a version of the package is on disk (the rest: not installed, config files only).
_DEB_PRESENT = frozenset(
    {"installed", "half-configured", "unpacked", "half-installed", "triggers-awaited", "triggers-pending"}
)
_DPKG_FORMAT = "${Package}\t${Version}\t${db:Status-Status}\n"
_RPM_FORMAT = "%{NAME}\t%{VERSION}-%{RELEASE}\n"
_MAX_VERSION = 128

Family = Literal["deb", "rpm"]


@dataclass(frozen=True)
class PackageState:
    """An installed package: its version and the package database's word for its state."""

    version: str
    status: str = "installed"

    @property
    def is_installed(self) -> bool:
        """True when the package is fully installed (not half-configured or unpacked)."""
        return self.status == "installed"


def package_family(manager: str) -> Family:
    """``deb`` for apt/dpkg, ``rpm`` for dnf/yum/rpm."""
    if manager in DEB_MANAGERS:
        return "deb"
    if manager in RPM_MANAGERS:
        return "rpm"
    raise StepError(f"unknown package manager {manager}")


# ----------------------------------------------------------------- pure parsers


def parse_dpkg_status(text: str) -> dict[str, PackageState]:
    r"""Packages on disk from ``dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Status}\n'``.

    Packages known to dpkg but not installed (or with only config files left) are left out;
    an architecture qualifier (``name:amd64``) is dropped.
    """
    found: dict[str, PackageState] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1] or parts[2].strip() not in _DEB_PRESENT:
            continue
        name = parts[0].split(":")[0]
        found.setdefault(name, PackageState(parts[1][:_MAX_VERSION], parts[2].strip()))
    return found


def parse_rpm_versions(text: str) -> dict[str, str]:
    r"""Versions from ``rpm -q --qf '%{NAME}\t%{VERSION}-%{RELEASE}\n'`` ("not installed" lines skipped).

    With several versions of one name (install-only packages such as kernels) the last wins.
    """
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] and parts[1]:
            found[parts[0]] = parts[1][:_MAX_VERSION]
    return found


def parse_proc_modules(text: str) -> set[str]:
    """Names of the loaded modules in /proc/modules text."""
    return {line.split(maxsplit=1)[0] for line in text.splitlines() if line.strip()}


# ------------------------------------------------------------------- packages


async def deb_package(name: str, tools: SystemTools, *, timeout: float = 30.0) -> PackageState | None:
    """The dpkg state of ``name``, or None if it is not installed.

    Raises:
        StepError: dpkg-query failed for another reason than "no such package".
    """
    result = await call(
        [tools.dpkg_query, *tools.dpkg_query_args(), "-W", f"-f={_DPKG_FORMAT}", "--", name],
        tools=tools,
        timeout=timeout,
        check=False,
    )
    if not result.ok and "no packages found" not in result.stderr:
        raise StepError(f"dpkg-query failed (exit {result.returncode}): {tool_message(result)}")
    return parse_dpkg_status(result.stdout).get(name)


async def rpm_package(name: str, tools: SystemTools, *, timeout: float = 30.0) -> PackageState | None:
    """The installed ``VERSION-RELEASE`` of ``name`` from rpm, or None if it is not installed.

    Raises:
        StepError: rpm failed for another reason than "not installed".
    """
    result = await call(
        [tools.rpm, *tools.rpm_args(), "-q", "--qf", _RPM_FORMAT, "--", name],
        tools=tools,
        timeout=timeout,
        check=False,
    )
    if not result.ok and "is not installed" not in result.stdout + result.stderr:
        raise StepError(f"rpm -q failed (exit {result.returncode}): {tool_message(result)}")
    version = parse_rpm_versions(result.stdout).get(name)
    return PackageState(version) if version else None


async def package_state(
    name: str, manager: str, tools: SystemTools, *, timeout: float = 30.0
) -> PackageState | None:
    """The installed state of ``name`` in the database of ``manager`` (apt/dpkg or dnf/yum/rpm)."""
    if package_family(manager) == "deb":
        return await deb_package(name, tools, timeout=timeout)
    return await rpm_package(name, tools, timeout=timeout)


async def package_versions(
    names: Sequence[str], tools: SystemTools, *, family: Family | None = None, timeout: float = 30.0
) -> dict[str, str]:
    """Installed versions of ``names`` in one query (for the inventory); missing ones are left out.

    ``family`` picks dpkg or rpm; by default rpm when the tools name an RPM install root, else
    whichever this node has (dpkg first).
    """
    if not names:
        return {}
    if family is None and tools.rpm_root is not None:
        family = "rpm"
    if family is None:
        family = "deb" if tools.has(tools.dpkg_query) else "rpm" if tools.has(tools.rpm) else None
        if family is None:
            return {}
    if family == "deb":
        result = await call(
            [tools.dpkg_query, *tools.dpkg_query_args(), "-W", f"-f={_DPKG_FORMAT}", "--", *names],
            tools=tools,
            timeout=timeout,
            check=False,
        )
        return {
            name: state.version
            for name, state in parse_dpkg_status(result.stdout).items()
            if state.is_installed
        }
    result = await call(
        [tools.rpm, *tools.rpm_args(), "-q", "--qf", _RPM_FORMAT, "--", *names],
        tools=tools,
        timeout=timeout,
        check=False,
    )
    return parse_rpm_versions(result.stdout)


# -------------------------------------------------------------- kernel modules


def _kernel_name(module: str) -> str:
    # modprobe treats '-' and '_' alike; the kernel lists '_'.
    return module.replace("-", "_")


def _read_first_line(path: Path) -> str:
    """The first non-empty line of a file ("" if missing). Call through asyncio.to_thread."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:_MAX_VERSION]
    return ""


def _loaded_blocking(proc_modules: Path) -> set[str]:
    try:
        return parse_proc_modules(proc_modules.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return set()


async def loaded_modules(tools: SystemTools) -> set[str]:
    """Names of the loaded (loadable, not built-in) kernel modules."""
    return await asyncio.to_thread(_loaded_blocking, tools.proc_modules)


async def module_version(name: str, tools: SystemTools) -> str | None:
    """The version of the module in the kernel: ``/sys/module/<m>/version``.

    A loaded module without a version is ``loaded``, a built-in one ``builtin``;
    a module that is not in the kernel is None.
    """
    kernel = _kernel_name(name)
    version = await asyncio.to_thread(_read_first_line, tools.sys_module / kernel / "version")
    if version:
        return version
    if kernel in await loaded_modules(tools):
        return "loaded"
    if await asyncio.to_thread((tools.sys_module / kernel).is_dir):
        return "builtin"
    return None


async def module_file_version(name: str, tools: SystemTools, *, timeout: float = 30.0) -> str | None:
    """The version of the module file modprobe would load (``modinfo -F version``); None if unknown.

    Raises:
        StepError: modinfo does not know the module.
    """
    result = await call(
        [tools.modinfo, "-F", "version", name], tools=tools, timeout=timeout, what=f"modinfo {name}"
    )
    return result.stdout.strip().splitlines()[0][:_MAX_VERSION] if result.stdout.strip() else None


# ------------------------------------------------------------ containers, services


async def container_image(name: str, tools: SystemTools, *, timeout: float = 30.0) -> str | None:
    """The image (as it was named at ``docker run``) of container ``name``; None if no such container."""
    result = await call(
        [tools.docker, "container", "inspect", "-f", "{{.Config.Image}}", name],
        tools=tools,
        timeout=timeout,
        check=False,
    )
    if not result.ok:
        if "No such" in result.stderr:
            return None
        raise StepError(f"docker container inspect failed (exit {result.returncode}): {tool_message(result)}")
    return result.stdout.strip() or None


async def service_state(
    name: str, manager: Literal["systemd", "docker"], tools: SystemTools, *, timeout: float = 30.0
) -> str:
    """The state of a service: systemd's ``is-active`` word, or the container's status (``absent``)."""
    if manager == "systemd":
        return await SystemdManager(tools).state(name, timeout=timeout)
    return await DockerManager(tools).state(name, timeout=timeout)
