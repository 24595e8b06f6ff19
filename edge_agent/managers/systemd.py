"""The ``systemd`` service manager: ``systemctl start|stop|restart|is-active|reset-failed UNIT``.

Also the ``systemd`` health check (DESIGN section 2): the unit must be active.

systemd refuses a unit started too often (by default 5 starts in 10 s:
"start of the service was attempted too often", or "start request repeated
too quickly" in the journal), which a fast rollout and rollback reach. A start
refused so is reported as a start-limit hit, and an undo clears the counter
first (``reset_failed``, issue 24).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from bus.errors import StepError
from edge_agent.system import LineSink
from edge_agent.tools import SystemTools, call, tool_message

if TYPE_CHECKING:
    from edge_agent.steps.base import StepContext

__all__ = ["SystemdManager", "check_systemd", "check_unit_name", "is_start_limit"]

#: systemd's unit name characters (``systemd.unit(5)``), never an option-like leading dash.
_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]{0,254}$")
#: States in which a unit just started is not (yet) a failure.
_STARTED = ("active", "activating", "reloading")
#: Longest a single health probe may take (the step's own timeout bounds them all).
_PROBE_TIMEOUT = 30.0
#: What systemctl and the journal say when a unit hit its start limit.
_START_LIMIT = ("attempted too often", "start request repeated too quickly", "start-limit-hit")


def is_start_limit(message: str) -> bool:
    """True when ``message`` (systemctl's or the journal's) says the unit hit its start limit."""
    lowered = message.lower()
    return any(words in lowered for words in _START_LIMIT)


def check_unit_name(unit: str) -> str | None:
    """The reason ``unit`` is not a systemd unit name, or None."""
    if not _UNIT.match(unit):
        return f"{unit[:80]!r} is not a systemd unit name"
    return None


class SystemdManager:
    """Start, stop, restart units and read their state through ``systemctl``."""

    kind = "systemd"

    def __init__(self, tools: SystemTools) -> None:
        self._tools = tools

    async def _ctl(self, verb: str, unit: str, timeout: float, on_line: LineSink | None) -> None:
        reason = check_unit_name(unit)
        if reason is not None:
            raise StepError(reason)
        result = await call(
            [self._tools.systemctl, verb, unit],
            tools=self._tools,
            timeout=timeout,
            on_line=on_line,
            check=False,
        )
        if result.ok:
            return
        said = f"{result.stderr}\n{result.stdout}"
        if verb in ("start", "restart") and is_start_limit(said):
            raise StepError(
                f"systemctl {verb} {unit}: {unit} hit systemd's start limit (start attempted too often); "
                f"'systemctl reset-failed {unit}' clears it"
            )
        raise StepError(f"systemctl {verb} {unit} failed (exit {result.returncode}): {tool_message(result)}")

    async def reset_failed(self, unit: str, *, timeout: float, on_line: LineSink | None = None) -> str | None:
        """``systemctl reset-failed UNIT``: clear its failed state and start-limit counter.

        Returns:
            None, or systemctl's words when it could not (e.g. the unit is not loaded).
        """
        reason = check_unit_name(unit)
        if reason is not None:
            raise StepError(reason)
        result = await call(
            [self._tools.systemctl, "reset-failed", unit],
            tools=self._tools,
            timeout=timeout,
            on_line=on_line,
            check=False,
        )
        return None if result.ok else tool_message(result)

    async def start(self, unit: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Start ``unit``; fail if it is not active (or activating) right after.

        Raises:
            StepError: systemctl's own message, or the state the unit ended in.
        """
        await self._ctl("start", unit, timeout, on_line)
        await self._expect_started(unit, timeout)

    async def stop(self, unit: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Stop ``unit`` (a stopped unit stays stopped).

        Raises:
            StepError: systemctl's own message.
        """
        await self._ctl("stop", unit, timeout, on_line)

    async def restart(self, unit: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Restart ``unit`` (start it if it was stopped).

        Raises:
            StepError: systemctl's own message, or the state the unit ended in.
        """
        await self._ctl("restart", unit, timeout, on_line)
        await self._expect_started(unit, timeout)

    async def state(self, unit: str, *, timeout: float) -> str:
        """``systemctl is-active`` of ``unit``: active, inactive, failed, activating, ...

        Raises:
            StepError: systemctl cannot answer (no systemd, bad name).
        """
        reason = check_unit_name(unit)
        if reason is not None:
            raise StepError(reason)
        result = await call(
            [self._tools.systemctl, "is-active", unit], tools=self._tools, timeout=timeout, check=False
        )
        words = result.stdout.split()
        # is-active exits 0 when active and 3 (LSB "not running") otherwise, printing the state either way.
        if result.returncode not in (0, 3) or not words:
            raise StepError(
                f"systemctl is-active {unit} failed (exit {result.returncode}): {tool_message(result)}"
            )
        return words[0]

    async def is_active(self, unit: str, *, timeout: float) -> bool:
        """True when ``unit`` is active."""
        return await self.state(unit, timeout=timeout) == "active"

    async def _expect_started(self, unit: str, timeout: float) -> None:
        state = await self.state(unit, timeout=timeout)
        if state not in _STARTED:
            raise StepError(f"{unit} is {state} after systemctl started it")


async def check_systemd(target: str, ctx: StepContext) -> str | None:
    """Health check ``systemd``: None when unit ``target`` is active, else why not."""
    try:
        state = await SystemdManager(ctx.settings.tools).state(
            target, timeout=min(ctx.timeout, _PROBE_TIMEOUT)
        )
    except StepError as exc:
        return exc.reason
    return None if state == "active" else f"unit {target} is {state}"
