"""``package`` step: install a package version with apt, dpkg, dnf or yum, and put the old one back.

Apply, in order:

1. What to install: ``src`` names a downloaded package file in the cache (its
   name and version are read from the file and must match the step), else
   ``name`` (``=version``/``-version``) comes from the node's repositories.
2. The way back, kept *before* anything changes and journalled with
   ``ctx.checkpoint``: the installed version (``dpkg-query``/``rpm -q``) and a
   package file of exactly that version in ``state_dir/backup/<command>/<index>/``:
   the file the agent itself installed last time (``state_dir/packages/``),
   else ``dpkg-repack`` if it is installed, else (apt) the pinned version if
   the repositories still have it, else (deb) a package rebuilt from dpkg's
   own records (control data, maintainer scripts, file list, files on disk);
   for dnf/yum the old version's .rpm downloaded from the repositories
   (``reinstall --downloadonly``), and when no repository has it any more the
   step is refused before anything changes (there would be no way back). A
   package that was not installed is recorded as such: undo removes (purges) it.
3. Install: ``dpkg -i FILE``; ``apt-get install -y --allow-downgrades -o
   Dpkg::Options::=--force-confold name=version`` (DEBIAN_FRONTEND=noninteractive,
   ``-o DPkg::Lock::Timeout``; the package lists are refreshed once when apt
   does not know the version); ``dnf|yum install -y name-version`` (``downgrade``
   when install did not reach that version). The installed version is checked
   afterwards: a manager that "succeeds" without installing it fails the step.
   An .rpm file (``src``, a kept one) must pass rpm's digest checks first
   (``rpm -K --nosignature``); dnf verifies what it downloads itself.

dnf, yum and rpm take the node's install root and dnf configuration
(``SystemTools.rpm_root``/``dnf_config``: the agent's ``rpm_root`` and
``dnf_config``).

dpkg itself does not wait for its lock: a dpkg call that finds it held by
someone else is retried until ``SystemTools.lock_wait_s``. Failures carry the
tool's own last lines of output.

Undo installs exactly the recorded version again (the kept file, else the
pinned version), or purges a package that was not there before, and then
reloads the kernel modules the restored package ships that are loaded (so a
driver rollback takes effect, DESIGN section 2). Undo is idempotent: a package
already at the old version is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import files
from bus.errors import StepError
from bus.messages import PackageStep
from edge_agent import versions
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps import module
from edge_agent.steps.base import StepContext, StepHandler
from edge_agent.system import RunResult
from edge_agent.tools import SystemTools, call, tool_message
from edge_agent.versions import Family, PackageState

__all__ = [
    "HANDLER",
    "KEPT_DIR",
    "apply",
    "check",
    "dnf_message",
    "kept_path",
    "parse_control",
    "undo",
    "verify_rpm",
]

#: Where the agent keeps the package file it installed last, per family and name.
KEPT_DIR = "packages"
#: dpkg's words for a lock held by another process (dpkg >= 1.19 and older).
_LOCKED = re.compile(r"lock was locked by another process|database is locked by another process")
_LOCK_POLL_S = 0.5
#: apt's words for a version or package its lists do not know (then: apt-get update, once).
_APT_UNKNOWN = re.compile(
    r"Version '.*' for '.*' was not found|Unable to locate package|has no installation candidate"
)
#: dnf's and yum's words for a name or version no repository offers.
_RPM_UNKNOWN = re.compile(r"No match for argument|Unable to find a match|No package .* available")
#: Bound of the quick queries (dpkg-query, rpm -q, dpkg-deb -f).
_QUERY_TIMEOUT = 60.0
#: Control fields that describe the installation, not the package (left out of a rebuilt package).
_STATUS_FIELDS = frozenset({"status", "conffiles", "config-version"})
_KERNEL_MODULE = re.compile(r"^/(usr/)?lib/modules/[^/]+/.+\.ko(\.xz|\.gz|\.zst)?$")
_MESSAGE_CHARS = 500
_DNF_WORDS = re.compile(r"Error|not available|No match|No package|not installed")
_NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}


def _binaries(step: PackageStep, tools: SystemTools) -> tuple[str, ...]:
    return {
        "apt": (tools.apt_get, tools.dpkg, tools.dpkg_query),
        "dpkg": (tools.dpkg, tools.dpkg_query, tools.dpkg_deb),
        "dnf": (tools.dnf, tools.rpm),
        "yum": (tools.yum, tools.rpm),
    }[step.manager]


def check(step: PackageStep, settings: ExecutorSettings) -> str | None:
    """Intake: the package is allowed by the policy, dpkg has a file, the manager is installed."""
    if not Policy.matches(settings.policy.packages, step.name):
        return f"package {step.name} is not allowed by this node's policy"
    if step.manager == "dpkg" and step.src is None:
        return "a dpkg package step needs src (a downloaded .deb)"
    tools = settings.tools
    for binary in _binaries(step, tools):
        if not tools.has(binary):
            return f"{binary} is not installed on this node"
    if step.manager in ("dnf", "yum"):
        # dnf would make a missing root and install there: a mistyped rpm_root must not "work".
        if tools.rpm_root is not None and not tools.rpm_root.is_dir():
            return f"the RPM install root {tools.rpm_root} (rpm_root) is not a directory"
        if tools.dnf_config is not None and not tools.dnf_config.is_file():
            return f"the dnf configuration {tools.dnf_config} (dnf_config) is not a file"
    return None


# ----------------------------------------------------------------- pure parts


def parse_control(text: str) -> list[tuple[str, str]]:
    """The fields of one deb822 stanza (``dpkg-query -s``), in order, continuation lines kept."""
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\n{line}")
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


def _conffiles(value: str) -> list[str]:
    """Paths of a ``Conffiles`` field that are still the package's (not obsolete)."""
    paths: list[str] = []
    for line in value.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].startswith("/") and "obsolete" not in words[2:]:
            paths.append(words[0])
    return paths


def _script_kind(path: Path, name: str) -> str | None:
    """``postinst`` for ``info/<name>.postinst`` or ``info/<name>:<arch>.postinst``."""
    base = path.name
    if base.startswith(f"{name}."):
        return base[len(name) + 1 :]
    if base.startswith(f"{name}:"):
        return base.partition(".")[2] or None
    return None


def _same_version(family: Family, have: str, want: str) -> bool:
    """Equal; for rpm a wanted ``VERSION`` also matches an installed ``VERSION-RELEASE``."""
    return have == want or (family == "rpm" and have.startswith(f"{want}-"))


def _file_name(name: str, version: str, family: Family) -> str:
    return f"{name}_{version.replace(':', '%3a')}.{family}"


def kept_path(state_dir: Path, family: Family, name: str, version: str) -> Path:
    """Where the agent keeps the package file of ``name`` ``version`` it installed last."""
    return state_dir / KEPT_DIR / family / _file_name(name, version, family)


# ------------------------------------------------------------- blocking helpers


def _link_or_copy(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically: a hard link if possible, else a copy. Blocking.

    Both through a temp file with a random name beside ``dest`` (``bus.files``).
    Call through asyncio.to_thread.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        files.copy_atomic(src, dest, stat.S_IMODE(src.stat().st_mode))
        return
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    files.fsync_dir(dest.parent)


def _clear_kept(directory: Path, name: str, keep: Path | None) -> None:
    """Remove the kept files of ``name`` other than ``keep``. Call through asyncio.to_thread."""
    if not directory.is_dir():
        return
    for path in directory.glob(f"{name}_*"):
        if path != keep:
            with contextlib.suppress(OSError):
                path.unlink()


def _build_tree(
    tree: Path,
    instdir: Path,
    control: list[tuple[str, str]],
    paths: list[str],
    scripts: dict[str, Path],
) -> list[str]:
    """Lay out a package tree from dpkg's records and the files on disk; return what was missing.

    Call through asyncio.to_thread.
    """
    missing: list[str] = []
    tree.mkdir(mode=0o755)
    os.chmod(tree, 0o755)  # noqa: S103 - the tree's root becomes the package's "./": never a 0700 "/"
    conffiles: list[str] = []
    for path in paths:
        source = instdir / path.lstrip("/")
        target = tree / path.lstrip("/")
        try:
            info = source.lstat()
        except FileNotFoundError:
            missing.append(path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        elif source.is_dir():
            target.mkdir(exist_ok=True)
            os.chmod(target, info.st_mode & 0o7777)
        elif source.is_file():
            shutil.copy2(source, target)
        else:
            missing.append(path)
            continue
        with contextlib.suppress(PermissionError):
            os.lchown(target, info.st_uid, info.st_gid)
    debian = tree / "DEBIAN"
    debian.mkdir(mode=0o755, exist_ok=True)
    lines: list[str] = []
    for name, value in control:
        if name.lower() == "conffiles":
            conffiles = [p for p in _conffiles(value) if (tree / p.lstrip("/")).is_file()]
        if name.lower() not in _STATUS_FIELDS:
            lines.append(f"{name}: {value}" if not value.startswith("\n") else f"{name}:{value}")
    (debian / "control").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if conffiles:
        (debian / "conffiles").write_text("\n".join(conffiles) + "\n", encoding="utf-8")
    for kind, source in scripts.items():
        if kind in ("list", "conffiles"):
            continue
        shutil.copy2(source, debian / kind)
        if kind in ("preinst", "postinst", "prerm", "postrm", "config"):
            os.chmod(debian / kind, 0o755)  # noqa: S103 - dpkg-deb wants maintainer scripts 0755
        else:
            os.chmod(debian / kind, 0o644)
    return missing


# ---------------------------------------------------------------------- calls


@dataclass(frozen=True)
class _Job:
    """One step's view: the tools, the family and where its backup goes."""

    step: PackageStep
    ctx: StepContext
    tools: SystemTools

    @property
    def family(self) -> Family:
        return versions.package_family(self.step.manager)

    @property
    def backup_dir(self) -> Path:
        return self.ctx.settings.backup_dir / self.ctx.command / str(self.ctx.index)

    @property
    def kept_dir(self) -> Path:
        return self.ctx.state_dir / KEPT_DIR / self.family

    def timeout(self, bound: float | None = None) -> float:
        return min(self.ctx.timeout, bound) if bound else self.ctx.timeout

    async def query(self, argv: list[str], *, check: bool = True, what: str | None = None) -> RunResult:
        return await call(
            argv, tools=self.tools, timeout=self.timeout(_QUERY_TIMEOUT), check=check, what=what
        )

    async def state(self) -> PackageState | None:
        return await versions.package_state(
            self.step.name, self.step.manager, self.tools, timeout=self.timeout()
        )

    async def identity(self, path: Path) -> tuple[str, str]:
        """(name, version) of a package file."""
        if self.family == "deb":
            argv = [self.tools.dpkg_deb, "--showformat=${Package}\t${Version}\n", "-W", str(path)]
        else:
            argv = [self.tools.rpm, "-qp", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n", str(path)]
        result = await self.query(argv, what=f"reading {path.name}")
        name, _, version = (
            result.stdout.strip().splitlines()[-1].partition("\t") if result.stdout.strip() else ("", "", "")
        )
        if not name or not version:
            raise StepError(f"{path.name} is not a readable {self.family} package")
        return name, version

    async def verify_rpm(self, path: Path) -> None:
        """Check a package file's digests with rpm (signatures are dnf's ``gpgcheck`` business).

        Raises:
            StepError: the file fails them, quoting rpm's words.
        """
        await verify_rpm(path, self.tools, self.timeout(_QUERY_TIMEOUT))

    async def dpkg(self, args: list[str], what: str) -> None:
        """Run dpkg with the root options and --force-confold, waiting for a lock held by someone else."""
        deadline = time.monotonic() + self.tools.lock_wait_s
        argv = [self.tools.dpkg, *self.tools.dpkg_args(), "--force-confold", *args]
        waiting = False
        while True:
            result = await call(
                argv,
                tools=self.tools,
                timeout=self.timeout(),
                on_line=self.ctx.output,
                check=False,
                env=_NONINTERACTIVE,
            )
            if result.ok:
                return
            locked = _LOCKED.search(result.stderr)
            if locked and time.monotonic() < deadline:
                if not waiting:
                    await self.ctx.log(
                        f"dpkg is locked by another process: waiting up to {self.tools.lock_wait_s:g} s"
                    )
                    waiting = True
                await asyncio.sleep(_LOCK_POLL_S)
                continue
            suffix = f" (waited {self.tools.lock_wait_s:g} s for the lock)" if locked else ""
            raise StepError(f"{what} failed (exit {result.returncode}){suffix}: {tool_message(result)}")

    async def apt(self, args: list[str], what: str, *, refresh: bool = True) -> None:
        """apt-get with the root options; the lists are refreshed once if apt does not know the version."""
        lock = ["-o", f"DPkg::Lock::Timeout={max(1, int(self.tools.lock_wait_s))}"]
        argv = [self.tools.apt_get, *self.tools.apt_args(), *lock, *args]
        for attempt in range(2):
            result = await call(
                argv,
                tools=self.tools,
                timeout=self.timeout(),
                on_line=self.ctx.output,
                check=False,
                env=_NONINTERACTIVE,
            )
            if result.ok:
                return
            if attempt == 0 and refresh and _APT_UNKNOWN.search(result.stderr):
                await self.ctx.log(
                    "apt does not know that version: refreshing the package lists (apt-get update)"
                )
                await call(
                    [self.tools.apt_get, *self.tools.apt_args(), *lock, "update"],
                    tools=self.tools,
                    timeout=self.timeout(),
                    on_line=self.ctx.output,
                    env=_NONINTERACTIVE,
                    what="apt-get update",
                )
                continue
            break
        raise StepError(f"{what} failed (exit {result.returncode}): {tool_message(result)}")

    async def rpm_tool(self, args: list[str], what: str, *, check: bool = True) -> RunResult:
        """Run dnf or yum with the install root and config; a version no repository has is named so."""
        binary = self.tools.dnf if self.step.manager == "dnf" else self.tools.yum
        result = await call(
            [binary, *self.tools.dnf_args(), "-y", *args],
            tools=self.tools,
            timeout=self.timeout(),
            on_line=self.ctx.output,
            check=False,
        )
        if result.ok or not check:
            return result
        unknown = (
            " (not in this node's repositories)" if _RPM_UNKNOWN.search(result.stdout + result.stderr) else ""
        )
        raise StepError(f"{what} failed (exit {result.returncode}){unknown}: {tool_message(result)}")

    # ---------------------------------------------------------------- install

    async def install_file(self, path: Path) -> None:
        what = f"installing {path.name}"
        if self.step.manager == "apt":
            await self.apt(
                ["install", "-y", "--allow-downgrades", "-o", "Dpkg::Options::=--force-confold", str(path)],
                what,
                refresh=False,
            )
        elif self.family == "deb":
            await self.dpkg(["-i", str(path)], what)
        else:
            await self.rpm_tool(["install", str(path)], what)

    async def install_version(self, version: str | None) -> None:
        name = self.step.name
        if self.family == "deb":
            spec = f"{name}={version}" if version else name
            await self.apt(
                ["install", "-y", "--allow-downgrades", "-o", "Dpkg::Options::=--force-confold", spec],
                f"apt-get install {spec}",
            )
        else:
            spec = f"{name}-{version}" if version else name
            await self.rpm_tool(["install", spec], f"{self.step.manager} install {spec}")

    async def reach(self, version: str | None, path: Path | None) -> PackageState:
        """Install ``path`` or ``version`` and check that the package database shows it."""
        if path is not None:
            await self.install_file(path)
        else:
            await self.install_version(version)
        state = await self.state()
        if (
            self.family == "rpm"
            and version
            and (state is None or not _same_version("rpm", state.version, version))
        ):
            # yum (and dnf for a local file) "installs" an older version by doing nothing: downgrade.
            spec = str(path) if path is not None else f"{self.step.name}-{version}"
            await self.ctx.log(f"{self.step.manager} did not install {spec}: downgrading")
            await self.rpm_tool(["downgrade", spec], f"{self.step.manager} downgrade {spec}")
            state = await self.state()
        if state is None or not state.is_installed:
            shown = "not installed" if state is None else f"{state.version} ({state.status})"
            raise StepError(f"{self.step.manager} finished but {self.step.name} is {shown}")
        if version and not _same_version(self.family, state.version, version):
            raise StepError(
                f"{self.step.manager} finished but {self.step.name} is at {state.version}, not {version}"
            )
        return state

    async def remove(self) -> None:
        name = self.step.name
        if self.step.manager == "dpkg":
            await self.dpkg(["--purge", name], f"dpkg --purge {name}")
        elif self.step.manager == "apt":
            await self.apt(["purge", "-y", name], f"apt-get purge {name}", refresh=False)
        else:
            await self.rpm_tool(["remove", name], f"{self.step.manager} remove {name}")

    # ---------------------------------------------------------------- keeping

    async def keep(self, path: Path, version: str) -> None:
        """Remember ``path`` as the file of the installed version (for the next step's way back)."""
        dest = self.kept_dir / _file_name(self.step.name, version, self.family)
        try:
            if path != dest:
                await asyncio.to_thread(_link_or_copy, path, dest)
            await asyncio.to_thread(_clear_kept, self.kept_dir, self.step.name, dest)
        except OSError as exc:
            await self.ctx.log(f"could not keep {path.name} for a later rollback: {exc}")

    async def forget(self) -> None:
        await asyncio.to_thread(_clear_kept, self.kept_dir, self.step.name, None)

    async def kept_file(self, version: str) -> Path | None:
        path = kept_path(self.ctx.state_dir, self.family, self.step.name, version)
        if not await asyncio.to_thread(path.is_file):
            return None
        try:
            if self.family == "rpm":
                await self.verify_rpm(path)
            found = await self.identity(path)
        except StepError as exc:
            await self.ctx.log(f"the kept {path.name} is not usable: {exc.reason}")
            return None
        return path if found == (self.step.name, version) else None

    async def repack(self, version: str) -> Path | None:
        """``dpkg-repack`` the installed package into the backup dir; None if it is missing or fails."""
        if self.family != "deb" or not self.tools.has(self.tools.dpkg_repack):
            return None
        work = self.backup_dir / "repack"
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
        result = await call(
            [self.tools.dpkg_repack, *self.tools.dpkg_query_args(), self.step.name],
            tools=self.tools,
            timeout=self.timeout(),
            cwd=work,
            on_line=self.ctx.output,
            check=False,
        )
        made = sorted(work.glob("*.deb"))
        if not result.ok or not made:
            await self.ctx.log(f"dpkg-repack {self.step.name} failed: {tool_message(result)}")
            return None
        return made[0]

    async def download_rpm(self, version: str) -> Path:
        """The installed ``version``'s .rpm, downloaded from the repositories into the backup dir.

        Raises:
            StepError: no repository offers exactly that version (there would be no way back).
        """
        spec = f"{self.step.name}-{version}"
        work = self.backup_dir / "download"
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
        result = await self.rpm_tool(
            ["reinstall", "--downloadonly", f"--downloaddir={work}", spec],
            f"{self.step.manager} download {spec}",
            check=False,
        )
        for path in sorted(await asyncio.to_thread(lambda: list(work.glob("*.rpm")))):
            with contextlib.suppress(StepError):
                if await self.identity(path) == (self.step.name, version):
                    return path
        raise StepError(
            f"no way back to {self.step.name} {version}: it was not installed by this agent and no "
            f"repository of this node offers it any more ({self.step.manager}: {dnf_message(result)})"
        )

    async def apt_has(self, version: str) -> bool:
        result = await self.query(
            [self.tools.apt_cache, *self.tools.apt_args(), "show", f"{self.step.name}={version}"], check=False
        )
        # A version known only from dpkg's status file (installed, not downloadable) has no Filename.
        return result.ok and any(line.startswith("Filename:") for line in result.stdout.splitlines())

    async def rebuild(self, version: str) -> Path:
        """A .deb of the installed package rebuilt from dpkg's records and the files on disk.

        Raises:
            StepError: dpkg-query or dpkg-deb failed.
        """
        name, query = self.step.name, [self.tools.dpkg_query, *self.tools.dpkg_query_args()]
        status = await self.query([*query, "-s", name], what=f"dpkg-query -s {name}")
        listed = await self.query([*query, "-L", name], what=f"dpkg-query -L {name}")
        control_paths = await self.query([*query, "--control-path", name], check=False)
        control = parse_control(status.stdout)
        got = dict((k.lower(), v) for k, v in control)
        if got.get("version") != version:
            raise StepError(f"dpkg shows {name} {got.get('version')}, not {version}")
        paths = [line for line in listed.stdout.splitlines() if line.startswith("/") and line != "/."]
        scripts: dict[str, Path] = {}
        for line in control_paths.stdout.splitlines():
            kind = _script_kind(Path(line.strip()), name)
            if kind:
                scripts[kind] = Path(line.strip())
        await asyncio.to_thread(self.backup_dir.mkdir, parents=True, exist_ok=True)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="rebuild-", dir=self.backup_dir))
        try:
            missing = await asyncio.to_thread(
                _build_tree, work / "tree", self.tools.instdir, control, paths, scripts
            )
            if missing:
                await self.ctx.log(
                    f"rebuilding {name} {version}: {len(missing)} file(s) gone from disk: {missing[:5]}"
                )
            out = self.backup_dir / _file_name(name, version, "deb")
            await call(
                [self.tools.dpkg_deb, "--build", str(work / "tree"), str(out)],
                tools=self.tools,
                timeout=self.timeout(),
                on_line=self.ctx.output,
                what=f"dpkg-deb --build {name} {version}",
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return out

    async def way_back(self, old: PackageState | None) -> dict[str, Any]:
        """The undo record: the old version and, where possible, a file of exactly that version."""
        if old is None:
            return {"old_version": None, "via": "absent"}
        record: dict[str, Any] = {"old_version": old.version, "old_status": old.status}
        if not old.is_installed:
            await self.ctx.log(f"{self.step.name} {old.version} is {old.status}, not fully installed")
        kept = await self.kept_file(old.version)
        if kept is not None:
            dest = self.backup_dir / kept.name
            await asyncio.to_thread(_link_or_copy, kept, dest)
            return {**record, "via": "cache", "old_file": self._rel(dest)}
        if self.family == "rpm":
            downloaded = await self.download_rpm(old.version)
            return {**record, "via": "repository", "old_file": self._rel(downloaded)}
        repacked = await self.repack(old.version)
        if repacked is not None:
            return {**record, "via": "dpkg-repack", "old_file": self._rel(repacked)}
        if self.step.manager == "apt" and await self.apt_has(old.version):
            return {**record, "via": "repository"}
        rebuilt = await self.rebuild(old.version)
        return {**record, "via": "rebuilt", "old_file": self._rel(rebuilt)}

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.ctx.state_dir))

    # ---------------------------------------------------------- kernel modules

    async def reload_modules(self) -> None:
        """Reload the loaded kernel modules this package ships (after a rollback put old files back)."""
        if not self.tools.has(self.tools.modprobe):
            return
        if self.family == "deb":
            argv = [self.tools.dpkg_query, *self.tools.dpkg_query_args(), "-L", self.step.name]
        else:
            argv = [self.tools.rpm, *self.tools.rpm_args(), "-ql", self.step.name]
        listed = await self.query(argv, check=False)
        names = {
            Path(line).name.split(".ko")[0].replace("-", "_")
            for line in listed.stdout.splitlines()
            if _KERNEL_MODULE.match(line.strip())
        }
        loaded = await versions.loaded_modules(self.tools)
        for name in sorted(names & loaded):
            await self.ctx.log(f"reloading kernel module {name} of {self.step.name}")
            await module.reload(name, self.ctx)


# ------------------------------------------------------------------ apply, undo


async def _target(job: _Job) -> tuple[str | None, Path | None]:
    """(version, file) to install: from ``src`` (checked against the step) or the step's version."""
    step = job.step
    if step.src is None:
        return step.version, None
    path = job.ctx.cache_dir / step.src
    if not await asyncio.to_thread(path.is_file):
        raise StepError(f"{step.src} is not in the download cache (download it in an earlier step)")
    if job.family == "rpm":
        await job.verify_rpm(path)
    name, version = await job.identity(path)
    if name != step.name:
        raise StepError(f"{step.src} is package {name}, not {step.name}")
    if step.version and not _same_version(job.family, version, step.version):
        raise StepError(f"{step.src} is {name} {version}, not {step.version}")
    return version, path


async def apply(step: PackageStep, ctx: StepContext) -> dict[str, Any]:
    """Keep the way back to the installed version, then install the new one (see the module docstring)."""
    job = _Job(step, ctx, ctx.settings.tools)
    version, path = await _target(job)
    old = await job.state()
    if old is not None and old.is_installed and version and _same_version(job.family, old.version, version):
        await ctx.log(f"{step.name} {old.version} is already installed")
        if path is not None:
            await job.keep(path, old.version)
        return {"unchanged": True, "old_version": old.version}
    await ctx.checkpoint({"old_version": old.version if old else None, "via": "pending"})
    record = {**await job.way_back(old), "new_version": version}
    await ctx.checkpoint(record)
    shown = f"{old.version} ({record['via']})" if old else "not installed"
    await ctx.log(f"{step.name}: way back kept: {shown}")
    state = await job.reach(version, path)
    if path is not None:
        await job.keep(path, state.version)
    await ctx.log(f"{step.name} {state.version} installed (was {old.version if old else 'not installed'})")
    return {**record, "new_version": state.version}


async def undo(step: PackageStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Reinstall exactly the recorded old version (or purge a new package), then reload its modules."""
    if record is None or record.get("unchanged"):
        await ctx.log(f"{step.name} was not changed: nothing to undo")
        return
    if record.get("via") == "pending":
        # Stopped while keeping the way back: nothing was installed yet.
        await ctx.log(f"{step.name} was not changed (stopped before installing): nothing to undo")
        return
    job = _Job(step, ctx, ctx.settings.tools)
    old_version = record.get("old_version")
    current = await job.state()
    if old_version is None:
        if current is None:
            await ctx.log(f"{step.name} is not installed, as before")
        else:
            await job.remove()
            await job.forget()
            await ctx.log(f"{step.name} {current.version} removed (it was not installed before)")
        return
    old_version = str(old_version)
    if (
        current is not None
        and current.is_installed
        and _same_version(job.family, current.version, old_version)
    ):
        await ctx.log(f"{step.name} is at {old_version}, as before")
        return
    old_file = record.get("old_file")
    path = ctx.state_dir / str(old_file) if old_file else None
    if path is not None and not await asyncio.to_thread(path.is_file):
        await ctx.log(f"the kept {path.name} is gone: installing {old_version} from the repositories")
        path = None
    if path is not None and job.family == "rpm":
        try:
            await job.verify_rpm(path)
        except StepError as exc:
            await ctx.log(
                f"the kept {path.name} is damaged ({exc.reason}): "
                f"installing {old_version} from the repositories"
            )
            path = None
    if path is None and step.manager == "dpkg":
        raise StepError(f"no package file left to put {step.name} {old_version} back")
    state = await job.reach(old_version, path)
    if path is not None:
        await job.keep(path, state.version)
    await ctx.log(f"{step.name} {state.version} reinstalled ({record.get('via')})")
    await job.reload_modules()


def dnf_message(result: RunResult) -> str:
    """The words of dnf or yum about a failed lookup: its ``Error``, ``not available``, ``No match`` lines.

    dnf prints some of them on stdout (``Installed package X not available.``), some on stderr.
    """
    text = f"{result.stdout}\n{result.stderr}"
    lines = [line.strip() for line in text.splitlines() if _DNF_WORDS.search(line)]
    return " | ".join(lines[-3:])[:_MESSAGE_CHARS] or tool_message(result)


async def verify_rpm(path: Path, tools: SystemTools, timeout: float) -> None:
    """Check a package file's digests (``rpm -K --nosignature``); the pre-flight uses it too.

    Raises:
        StepError: the file fails them (or is no package), quoting rpm's words.
    """
    result = await call(
        [tools.rpm, "-Kv", "--nosignature", str(path)], tools=tools, timeout=timeout, check=False
    )
    if result.ok:
        return
    text = f"{result.stdout}\n{result.stderr}"
    bad = [line.strip() for line in text.splitlines() if re.search(r"BAD|NOT OK|error:", line)]
    shown = " | ".join(bad[:3]) if bad else tool_message(result)
    raise StepError(f"{path.name} fails rpm's checks (rpm -K): {shown[:_MESSAGE_CHARS]}")


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
