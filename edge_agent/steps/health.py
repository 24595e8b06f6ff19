"""``health`` step: a command, HTTP, TCP or systemd-unit check, retried; nothing to undo.

After an undo the runner runs every health step of the plan again in *restore
mode* (``verify``) to show the old state answering: ``HealthStep.verify`` set
to a ``RestoreCheck`` replaces the target and/or the expected text (e.g. the
old version); ``"skip"`` leaves the check out; unset, the same check runs with
``expect`` dropped. A ``command`` check in restore mode runs with
``FLEET_PHASE=verify`` in its environment, so one script can tell the cases
apart.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any
from urllib.parse import urlsplit

from bus.errors import StepError
from bus.messages import HealthStep, RestoreCheck
from edge_agent import system
from edge_agent.managers import check_systemd, check_unit_name
from edge_agent.settings import ExecutorSettings
from edge_agent.steps.base import StepContext, StepHandler, check_script
from edge_agent.steps.script import run_script

__all__ = [
    "HANDLER",
    "SUPPORTED_CHECKS",
    "apply",
    "check",
    "describe",
    "parse_host_port",
    "restore_check",
    "undo",
    "verify",
]

SUPPORTED_CHECKS = ("command", "http", "tcp", "systemd")
#: Longest a single attempt may take (the step's own timeout bounds them all).
_ATTEMPT_TIMEOUT = 30.0


def parse_host_port(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port).

    Raises:
        StepError: not host:port with a port in 1..65535.
    """
    host, sep, port_text = target.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StepError(f"tcp target {target[:80]!r} is not host:port")
    return host, int(port_text)


def _command(target: str) -> list[str]:
    try:
        words = shlex.split(target)
    except ValueError as exc:
        raise StepError(f"command target {target[:80]!r}: {exc}") from exc
    if not words:
        raise StepError("command target is empty")
    return words


def restore_check(step: HealthStep) -> HealthStep | None:
    """The check that verifies a restore (``verify``), or None when it is skipped."""
    if step.verify == "skip":
        return None
    if isinstance(step.verify, RestoreCheck):
        target = step.verify.target or step.target
        return step.model_copy(update={"target": target, "expect": step.verify.expect, "verify": None})
    return step.model_copy(update={"expect": None, "verify": None})


def describe(step: HealthStep) -> str:
    """``http http://host/ expecting '1.0'``: what a check looks at, in one line."""
    shown = system.redact_url(step.target) if step.check == "http" else step.target
    return f"{step.check} {shown}" + (f" expecting {step.expect!r}" if step.expect is not None else "")


def check(step: HealthStep, settings: ExecutorSettings) -> str | None:
    """Refuse checks this agent cannot run and targets that are not well-formed (restore check too)."""
    reason = _check_one(step, settings)
    restore = restore_check(step)
    if reason is None and restore is not None and restore.target != step.target:
        reason = _check_one(restore, settings)
        if reason is not None:
            reason = f"verify: {reason}"
    return reason


def _check_one(step: HealthStep, settings: ExecutorSettings) -> str | None:
    if step.check not in SUPPORTED_CHECKS:
        return f"health check {step.check} is not supported by this agent"
    if step.check == "systemd":
        return check_unit_name(step.target)
    try:
        if step.check == "command":
            return check_script(settings, _command(step.target)[0])
        if step.check == "tcp":
            parse_host_port(step.target)
        elif urlsplit(step.target).scheme not in ("http", "https") or not urlsplit(step.target).hostname:
            return f"http health target {step.target[:80]!r} is not an http(s) URL"
    except (StepError, ValueError) as exc:
        return exc.reason if isinstance(exc, StepError) else f"bad health target: {exc}"
    return None


async def _once(step: HealthStep, ctx: StepContext, timeout: float) -> None:
    if step.check == "command":
        words = _command(step.target)
        result = await run_script(words[0], words[1:], ctx, "verify" if ctx.phase == "verify" else "apply")
        if step.expect is not None and step.expect not in result.stdout:
            said = result.tail(200) or "nothing"
            raise StepError(f"{words[0]} output lacks {step.expect!r} (it said: {said})")
    elif step.check == "http":
        response = await system.http_get(step.target, timeout=timeout)
        if not 200 <= response.status < 300:
            raise StepError(f"HTTP {response.status} from {system.redact_url(step.target)}")
        if step.expect is not None and step.expect not in response.body:
            said = " ".join(response.body.split())[:120] or "an empty body"
            raise StepError(
                f"{step.expect!r} not in the response of {system.redact_url(step.target)} (it said: {said})"
            )
    elif step.check == "tcp":
        host, port = parse_host_port(step.target)
        await system.tcp_connect(host, port, timeout=timeout)
    elif step.check == "systemd":
        reason = await check_systemd(step.target, ctx)
        if reason is not None:
            raise StepError(reason)
    else:
        raise StepError(f"health check {step.check} is not supported by this agent")


async def _attempts(step: HealthStep, ctx: StepContext) -> str | None:
    """Check up to ``retries`` times, ``interval_s`` apart; None once one passes, else the last reason."""
    timeout = min(ctx.timeout, _ATTEMPT_TIMEOUT)
    reason = ""
    for attempt in range(1, step.retries + 1):
        try:
            await _once(step, ctx, timeout)
        except StepError as exc:
            reason = exc.reason
            await ctx.log(f"health {step.check} attempt {attempt}/{step.retries}: {reason}")
        else:
            await ctx.log(f"health {describe(step)}: ok (attempt {attempt})")
            return None
        if attempt < step.retries:
            await asyncio.sleep(step.interval_s)
    return reason


async def apply(step: HealthStep, ctx: StepContext) -> dict[str, Any]:
    """Check up to ``retries`` times, ``interval_s`` apart; fail with the last reason."""
    reason = await _attempts(step, ctx)
    if reason is not None:
        raise StepError(f"health check {describe(step)} failed after {step.retries} attempts: {reason}")
    return {}


async def verify(step: HealthStep, ctx: StepContext) -> str:
    """Run ``step`` in restore mode (``restore_check``), retried like the step; return what passed.

    Raises:
        StepError: the restored state does not answer as expected (the last attempt's reason).
    """
    restore = restore_check(step)
    if restore is None:
        return "skipped"
    reason = await _attempts(restore, ctx)
    if reason is not None:
        raise StepError(f"{restore.check} {restore.target}: {reason} ({restore.retries} attempts)")
    return describe(restore)


async def undo(step: HealthStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """A check changes nothing: nothing to undo."""


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
