"""Pre-flight: check a plan on this node without changing anything.

The hub's ``plan`` request sends every online target a signed ``preflight``
command (unretained, so the node's retained command stays what it was). The
runner hands its plan to ``run_preflight`` and reports each ``Check`` as a
``StepStatus`` on the node's ``status`` topic (not retained: a plan must never
replace the retained job snapshot the hub rebuilds from after a restart), then
one final status ``index -1, type "preflight"``.

What is checked, read-only:

- every step: supported by this agent, allowed by the local policy, and the
  handler's own intake check (scripts present and executable, services
  defined, file destinations allowed, tools installed) - what the intake of
  the real apply would refuse;
- ``download``: already in the cache with that sha256, else the URL answers
  (HTTP status below 400); its size counts against the free disk when the
  step declares ``max_bytes``;
- ``package``: a simulated install, ``apt-get -s install`` / ``dpkg
  --dry-run -i`` / ``dnf|yum --assumeno install`` (in the node's RPM install
  root, with its dnf config; an .rpm in the cache passes ``rpm -K`` first,
  and when dnf/yum would change an installed package, the way back is there:
  the agent kept its file, or ``--assumeno reinstall`` finds exactly that
  version in a repository, else the apply would refuse: failed);
  a package file that an earlier step downloads cannot be simulated yet
  (skipped, said so);
- ``service`` under systemd: the unit exists (``systemctl status`` exit 4 is
  "no such unit");
- ``file``: its ``src`` comes from an earlier download step or the cache;
- node-wide: free disk in the cache's file system against the downloads, and
  whether the agent is busy with another rollout (an apply now would be
  refused) or its update lock is held (an apply would be deferred).

A check is ``succeeded``, ``failed`` (the apply would fail or be refused) or
``skipped`` (could not be decided here; the detail says why - a warning).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bus.errors import StepError
from bus.messages import DownloadStep, FileStep, PackageStep, ServiceStep, Step
from edge_agent import system, versions
from edge_agent.intake import check_step
from edge_agent.settings import ExecutorSettings
from edge_agent.steps import HANDLERS, StepHandler
from edge_agent.tools import call, tool_message

__all__ = ["Check", "CheckState", "run_preflight", "summarize"]

CheckState = Literal["succeeded", "failed", "skipped"]
#: Longest a single probe (HTTP, apt-get -s, ...) may take.
PROBE_TIMEOUT_S = 20.0
_MIB = 1024 * 1024
_DETAIL = 500


@dataclass(frozen=True)
class Check:
    """One finding: ``index`` is the step's, or -1 for a node-wide check (``type`` disk, busy, lock)."""

    index: int
    type: str
    state: CheckState
    detail: str


#: Optional node-wide check (the runner's deferral lock): returns a reason the node is busy, or None.
LockProbe = Callable[[], Awaitable[str | None]]


def summarize(checks: Sequence[Check]) -> tuple[CheckState, str]:
    """The final status of a pre-flight: ``failed`` if any check failed, with a one-line summary."""
    failed = [c for c in checks if c.state == "failed"]
    skipped = [c for c in checks if c.state == "skipped"]
    passed = len(checks) - len(failed) - len(skipped)
    text = f"{passed} passed, {len(failed)} failed, {len(skipped)} not checked"
    if failed:
        first = failed[0]
        where = f"step {first.index} ({first.type})" if first.index >= 0 else first.type
        return "failed", f"{text}; first: {where}: {first.detail}"[:_DETAIL]
    return "succeeded", text


async def run_preflight(
    plan: Sequence[Step],
    settings: ExecutorSettings,
    handlers: Mapping[str, StepHandler] | None = None,
    *,
    busy_with: str | None = None,
    lock: LockProbe | None = None,
    timeout: float = 60.0,
) -> list[Check]:
    """Check ``plan`` on this node; change nothing.

    Args:
        plan: the steps of the rollout.
        settings: this node's settings (policy, dirs, tools).
        handlers: the runner's step handlers; probes beyond the handler's own
            check run only for the real handlers (a simulator's are not probed).
        busy_with: the rollout the agent is busy with, if any.
        lock: a probe of the agent's update lock (deferral), if any.
        timeout: the whole pre-flight's budget; probes past it are skipped.

    Returns:
        One ``Check`` per step, then the node-wide ones.
    """
    handlers = HANDLERS if handlers is None else handlers
    deadline = time.monotonic() + timeout
    checks: list[Check] = []
    sizes: list[int | None] = []
    downloads: dict[str, int] = {}
    for index, step in enumerate(plan):
        remaining = deadline - time.monotonic()
        reason = check_step(step, settings, handlers)
        if reason is not None:
            checks.append(Check(index, step.type, "failed", reason))
        elif handlers.get(step.type) is not HANDLERS.get(step.type):
            checks.append(Check(index, step.type, "succeeded", "allowed (not probed: a custom handler)"))
        elif remaining <= 0:
            checks.append(Check(index, step.type, "skipped", "pre-flight ran out of time"))
        else:
            probe_s = min(PROBE_TIMEOUT_S, remaining)
            try:
                checks.append(await _probe(index, step, settings, downloads, sizes, probe_s))
            except StepError as exc:
                checks.append(Check(index, step.type, "failed", exc.reason))
        if isinstance(step, DownloadStep):
            downloads[step.name] = index
    checks.append(await _disk(settings, sizes))
    if busy_with is not None:
        checks.append(
            Check(-1, "busy", "failed", f"busy with rollout {busy_with}: an apply now would be refused")
        )
    if lock is not None:
        held = await lock()
        if held is not None:
            checks.append(Check(-1, "lock", "skipped", f"update lock held ({held}): an apply would wait"))
        else:
            checks.append(Check(-1, "lock", "succeeded", "no update lock held"))
    return [Check(c.index, c.type, c.state, c.detail[:_DETAIL]) for c in checks]


async def _probe(
    index: int,
    step: Step,
    settings: ExecutorSettings,
    downloads: Mapping[str, int],
    sizes: list[int | None],
    timeout: float,
) -> Check:
    if isinstance(step, DownloadStep):
        return await _download(index, step, settings, sizes, timeout)
    if isinstance(step, PackageStep):
        return await _package(index, step, settings, downloads, timeout)
    if isinstance(step, ServiceStep) and settings.service_manager == "systemd":
        return await _unit(index, step, settings, timeout)
    if isinstance(step, FileStep):
        return await _file_source(index, step, settings, downloads)
    return Check(index, step.type, "succeeded", "allowed and present")


def _has_sha256(path: Path, sha256: str) -> bool:
    """Tell whether ``path`` is a file with this sha256. Call through asyncio.to_thread."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_MIB):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256.lower()


async def _download(
    index: int, step: DownloadStep, settings: ExecutorSettings, sizes: list[int | None], timeout: float
) -> Check:
    if await asyncio.to_thread(_has_sha256, settings.cache_dir / step.name, step.sha256):
        return Check(index, step.type, "succeeded", f"{step.name} is already in the cache (sha256 ok)")
    size = step.max_bytes
    sizes.append(size)  # needed space, whether or not the URL answers now
    shown = system.redact_url(step.url)
    # The same host policy as the real download, redirects included (issue 16).
    response = await system.http_get(
        step.url, timeout=timeout, max_bytes=1, allowed_hosts=settings.policy.download_hosts
    )
    if response.status >= 400:
        return Check(index, step.type, "failed", f"HTTP {response.status} from {shown}")
    note = f"; at most {size / _MIB:.1f} MiB" if size is not None else "; size unknown (no max_bytes)"
    return Check(index, step.type, "succeeded", f"{shown} answers HTTP {response.status}{note}")


def _free_bytes(path: Path) -> tuple[Path, int]:
    """(nearest existing directory, free bytes there). Call through asyncio.to_thread."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


async def _disk(settings: ExecutorSettings, sizes: Sequence[int | None]) -> Check:
    where, free = await asyncio.to_thread(_free_bytes, settings.cache_dir)
    known = sum(s for s in sizes if s is not None)
    unknown = sum(1 for s in sizes if s is None)
    need = f"downloads need at most {known / _MIB:.1f} MiB" + (
        f" (+{unknown} of unknown size)" if unknown else ""
    )
    if known > free:
        return Check(-1, "disk", "failed", f"{need}, only {free / _MIB:.1f} MiB free in {where}")
    return Check(-1, "disk", "succeeded", f"{free / _MIB:.1f} MiB free in {where}; {need}")


async def _package(
    index: int, step: PackageStep, settings: ExecutorSettings, downloads: Mapping[str, int], timeout: float
) -> Check:
    tools = settings.tools
    target: str | None = None
    if step.src is not None:
        path = settings.cache_dir / step.src
        if await asyncio.to_thread(path.is_file):
            target = str(path)
        elif step.src in downloads:
            return Check(
                index,
                step.type,
                "skipped",
                f"{step.src} is downloaded by step {downloads[step.src]}: its install is simulated then, "
                "not before",
            )
        else:
            reason = f"{step.src} is neither in the cache nor downloaded first"
            return Check(index, step.type, "failed", reason)
    if step.manager == "dpkg":
        assert target is not None  # noqa: S101 - a dpkg step has src (intake checked)
        argv = [tools.dpkg, *tools.dpkg_args(), "--dry-run", "-i", target]
    elif step.manager == "apt":
        spec = target or (f"{step.name}={step.version}" if step.version else step.name)
        argv = [tools.apt_get, *tools.apt_args(), "-s", "install", "--allow-downgrades", spec]
    else:
        if target is not None:
            from edge_agent.steps.package import verify_rpm  # the step module, imported on first use

            await verify_rpm(Path(target), tools, timeout)
        binary = tools.dnf if step.manager == "dnf" else tools.yum
        spec = target or (f"{step.name}-{step.version}" if step.version else step.name)
        argv = [binary, *tools.dnf_args(), "--assumeno", "install", spec]
    quiet = {"DEBIAN_FRONTEND": "noninteractive"}
    result = await call(argv, tools=tools, timeout=timeout, check=False, env=quiet)
    found = _simulated(index, step, result)
    if step.manager in ("dnf", "yum") and found.state == "succeeded" and _rpm_would_change(result):
        state = await versions.package_state(step.name, step.manager, tools, timeout=timeout)
        if state is not None:  # else the way back is removing it
            missing = await _rpm_way_back(step, settings, state.version, timeout)
            if missing is not None:
                return Check(index, step.type, "failed", missing)
            detail = f"{found.detail}; the way back to {state.version} is there"
            return Check(index, step.type, "succeeded", detail)
    return found


def _rpm_would_change(result: system.RunResult) -> bool:
    """Whether dnf's or yum's ``--assumeno`` answer shows a transaction (not "Nothing to do")."""
    return "Nothing to do" not in f"{result.stdout}\n{result.stderr}"


async def _rpm_way_back(
    step: PackageStep, settings: ExecutorSettings, version: str, timeout: float
) -> str | None:
    """Why an apply would find no way back to the installed ``version`` (None: it would find one)."""
    from edge_agent.steps import package  # the step module, imported on first use

    tools = settings.tools
    kept = package.kept_path(settings.state_dir, "rpm", step.name, version)
    if await asyncio.to_thread(kept.is_file):
        return None
    binary = tools.dnf if step.manager == "dnf" else tools.yum
    argv = [binary, *tools.dnf_args(), "--assumeno", "reinstall", f"{step.name}-{version}"]
    result = await call(argv, tools=tools, timeout=timeout, check=False)
    text = f"{result.stdout}\n{result.stderr}"
    if result.ok or ("Operation aborted" in text and "Error:" not in text):
        return None
    return (
        f"no way back to {step.name} {version}: the agent did not keep it and no repository of "
        f"this node offers it ({Path(binary).name} --assumeno reinstall: {package.dnf_message(result)})"
    )


def _simulated(index: int, step: PackageStep, result: system.RunResult) -> Check:
    text = f"{result.stdout}\n{result.stderr}"
    name = Path(result.argv[0]).name
    if step.manager in ("dnf", "yum"):
        # --assumeno answers "no": exit 1 with "Operation aborted." when there was something to do.
        would = result.ok or ("Operation aborted" in text and "Error:" not in text)
        if would:
            return Check(index, step.type, "succeeded", f"{name} --assumeno: the install would proceed")
        if "No match for argument" in text or "Unable to find a match" in text:
            reason = f"{name} --assumeno install: not in this node's repositories: {tool_message(result)}"
            return Check(index, step.type, "failed", reason)
        return Check(index, step.type, "failed", f"{name} --assumeno install: {tool_message(result)}")
    if result.ok:
        planned = [line for line in result.stdout.splitlines() if line.startswith(("Inst ", "Selecting"))]
        shown = f": {planned[0]}" if planned else ""
        return Check(index, step.type, "succeeded", f"{name} simulation ok{shown}")
    if step.manager == "apt" and ("was not found" in text or "Unable to locate" in text):
        # The apply refreshes the lists once (apt-get update); a pre-flight changes nothing.
        return Check(
            index,
            step.type,
            "skipped",
            f"apt does not know {step.name}{'=' + step.version if step.version else ''} from its current "
            "lists (the update refreshes them once; not refreshed by a pre-flight)",
        )
    return Check(index, step.type, "failed", f"{name} simulation failed: {tool_message(result)}")


async def _unit(index: int, step: ServiceStep, settings: ExecutorSettings, timeout: float) -> Check:
    tools = settings.tools
    result = await call(
        [tools.systemctl, "status", "--no-pager", step.name], tools=tools, timeout=timeout, check=False
    )
    if result.returncode == 4:
        return Check(index, step.type, "failed", f"systemd has no unit {step.name}: {tool_message(result)}")
    return Check(index, step.type, "succeeded", f"systemd knows {step.name}")


async def _file_source(
    index: int, step: FileStep, settings: ExecutorSettings, downloads: Mapping[str, int]
) -> Check:
    if step.src in downloads:
        return Check(index, step.type, "succeeded", f"{step.src} comes from step {downloads[step.src]}")
    if await asyncio.to_thread((settings.cache_dir / step.src).is_file):
        return Check(index, step.type, "succeeded", f"{step.src} is in the cache")
    return Check(index, step.type, "failed", f"{step.src} is neither in the cache nor downloaded first")
