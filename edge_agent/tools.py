"""The system tools the agent drives (dpkg, apt, dnf/yum, rpm, systemctl, docker, modprobe).

``SystemTools`` names every binary and the options that point them somewhere
else than the live system: a throwaway dpkg root (``dpkg --root``), extra apt
options, the ``/sys/module`` and ``/proc/modules`` to read. The defaults are
the live system; tests build one that points at a scratch root and fakes.

``call`` runs one tool through ``edge_agent.system.run`` (the only subprocess
door) and turns a failure into a ``StepError`` carrying the tool's own words.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bus.errors import StepError

if TYPE_CHECKING:
    from edge_agent.system import LineSink, RunResult

__all__ = ["SystemTools", "call", "tool_message"]

#: Lines of a tool's output quoted in an error.
_QUOTED_LINES = 4
_QUOTED_CHARS = 700


@dataclass(frozen=True)
class SystemTools:
    """Binaries and options of the system tools, with the live system as default.

    Attributes:
        dpkg, dpkg_query, dpkg_deb, dpkg_repack, apt_get, apt_cache: Debian tools (names on PATH or paths).
        dnf, yum, rpm: RPM tools.
        systemctl, docker, modprobe, modinfo: service managers and kernel modules.
        dpkg_root: ``dpkg --root`` (admin dir ``ROOT/var/lib/dpkg``, files under ROOT);
            apt is pointed at the same root. None: the live system.
        dpkg_admindir, dpkg_instdir: ``--admindir`` / ``--instdir`` instead of (or after) ``--root``.
        dpkg_force: ``--force-<thing>`` options for every dpkg call (a throwaway root
            run by a non-root user needs ``not-root`` and ``script-chrootless``).
        apt_options: extra ``-o Key=Value`` words for every apt-get call.
        rpm_root: ``dnf|yum --installroot`` and ``rpm --root`` (the package database and files
            under ROOT). None: the live system.
        dnf_config: ``dnf|yum --config``: the configuration file (its ``reposdir`` names the
            repositories) instead of the one found in the install root or on the host.
        lock_wait_s: how long an install waits for the dpkg lock held by someone else.
        env: variables added to the environment of every tool.
        sys_module: where loaded modules' versions are read (``<m>/version``).
        proc_modules: the list of loaded modules.
    """

    dpkg: str = "dpkg"
    dpkg_query: str = "dpkg-query"
    dpkg_deb: str = "dpkg-deb"
    dpkg_repack: str = "dpkg-repack"
    apt_get: str = "apt-get"
    apt_cache: str = "apt-cache"
    dnf: str = "dnf"
    yum: str = "yum"
    rpm: str = "rpm"
    systemctl: str = "systemctl"
    docker: str = "docker"
    modprobe: str = "modprobe"
    modinfo: str = "modinfo"
    dpkg_root: Path | None = None
    dpkg_admindir: Path | None = None
    dpkg_instdir: Path | None = None
    dpkg_force: tuple[str, ...] = ()
    apt_options: tuple[str, ...] = ()
    rpm_root: Path | None = None
    dnf_config: Path | None = None
    lock_wait_s: float = 120.0
    env: Mapping[str, str] = field(default_factory=dict)
    sys_module: Path = Path("/sys/module")
    proc_modules: Path = Path("/proc/modules")

    def dpkg_args(self) -> list[str]:
        """Options that point dpkg at its root, admin dir and install dir, plus the forces."""
        args = self.dpkg_query_args()
        if self.dpkg_instdir is not None:
            args.append(f"--instdir={self.dpkg_instdir}")
        args.extend(f"--force-{thing}" for thing in self.dpkg_force)
        return args

    def dpkg_query_args(self) -> list[str]:
        """Options that point dpkg-query (and dpkg-repack) at the package database."""
        args: list[str] = []
        if self.dpkg_root is not None:
            args.append(f"--root={self.dpkg_root}")
        if self.dpkg_admindir is not None:
            args.append(f"--admindir={self.dpkg_admindir}")
        return args

    @property
    def admindir(self) -> Path:
        """The directory of dpkg's database."""
        if self.dpkg_admindir is not None:
            return self.dpkg_admindir
        return (self.dpkg_root or Path("/")) / "var/lib/dpkg"

    @property
    def instdir(self) -> Path:
        """Where dpkg puts package files."""
        return self.dpkg_instdir or self.dpkg_root or Path("/")

    def apt_args(self) -> list[str]:
        """``-o`` options that make apt use the same dpkg database and options as ``dpkg_args``.

        ``apt_options`` come last, so they win.
        """
        args: list[str] = []
        if self.dpkg_root is not None or self.dpkg_admindir is not None:
            args += ["-o", f"Dir::State::status={self.admindir / 'status'}"]
        args += [word for option in self.dpkg_args() for word in ("-o", f"DPkg::Options::={option}")]
        return [*args, *self.apt_options]

    def rpm_args(self) -> list[str]:
        """Options that point rpm at the install root's package database."""
        return [f"--root={self.rpm_root}"] if self.rpm_root is not None else []

    def dnf_args(self) -> list[str]:
        """Options that point dnf or yum at the install root and the configuration file."""
        args = [f"--installroot={self.rpm_root}"] if self.rpm_root is not None else []
        if self.dnf_config is not None:
            args.append(f"--config={self.dnf_config}")
        return args

    def environ(self, **extra: str) -> dict[str, str]:
        """The tools' environment: the agent's, ``env`` and ``extra`` on top."""
        return {**os.environ, **self.env, **extra}

    def has(self, binary: str) -> bool:
        """Tell whether ``binary`` (a name on PATH or a path) can be run here."""
        return shutil.which(binary, path=self.environ().get("PATH")) is not None


def tool_message(result: RunResult) -> str:
    """The tool's own words about a failure: the last lines of stderr (else stdout)."""
    text = result.stderr.strip() or result.stdout.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    quoted = " | ".join(lines[-_QUOTED_LINES:])
    return quoted[-_QUOTED_CHARS:] or f"exit status {result.returncode}"


async def call(
    argv: Sequence[str],
    *,
    tools: SystemTools,
    timeout: float,
    on_line: LineSink | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    what: str | None = None,
) -> RunResult:
    """Run one tool with the tools' environment (plus ``env``); output goes to ``on_line``.

    ``what`` names the operation in an error (default: the tool's name).

    Raises:
        StepError: the tool cannot be started, it timed out, or (with ``check``)
            it exited non-zero: the error quotes its last lines of output.
    """
    # Imported here, so that edge_agent.settings may import this module (edge_agent.system imports settings).
    from edge_agent import system

    result = await system.run(
        list(argv), timeout=timeout, env=tools.environ(**(env or {})), on_line=on_line, cwd=cwd
    )
    if check and not result.ok:
        name = what or Path(argv[0]).name
        raise StepError(f"{name} failed (exit {result.returncode}): {tool_message(result)}")
    return result
