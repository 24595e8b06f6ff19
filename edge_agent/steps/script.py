"""``script`` step: run a script of the scripts directory; its ``rollback`` script undoes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bus.errors import StepError
from bus.messages import ScriptStep
from edge_agent import system
from edge_agent.settings import ExecutorSettings
from edge_agent.steps.base import Phase, StepContext, StepHandler, check_script, resolve_script

__all__ = ["HANDLER", "apply", "check", "run_script", "undo"]


def check(step: ScriptStep, settings: ExecutorSettings) -> str | None:
    """The script (and its rollback script) must be allowed and present in the scripts dir."""
    reason = check_script(settings, step.name)
    if reason is None and step.rollback:
        reason = check_script(settings, step.rollback)
    return reason


async def run_script(
    name: str,
    args: list[str],
    ctx: StepContext,
    phase: Phase,
    on_start: Callable[[int], Awaitable[None]] | None = None,
) -> system.RunResult:
    """Run ``scripts_dir/name`` with cwd = state dir and the FLEET_* environment, output to the log.

    Raises:
        StepError: no such script, it timed out (its process group is killed), or it exited non-zero.
    """
    path = resolve_script(ctx.scripts_dir, name)
    result = await system.run(
        [str(path), *args],
        timeout=ctx.timeout,
        cwd=ctx.state_dir,
        env=ctx.script_env(phase),
        on_line=ctx.output,
        on_start=on_start,
    )
    if result.returncode < 0:
        raise StepError(f"{name} was killed by signal {-result.returncode}: {result.tail()}".rstrip(": "))
    if not result.ok:
        raise StepError(f"{name} exited with status {result.returncode}: {result.tail()}".rstrip(": "))
    return result


async def apply(step: ScriptStep, ctx: StepContext) -> dict[str, Any]:
    """Run the script with FLEET_PHASE=apply; its scope, then its pid, are journalled while it runs."""
    scope = system.current_scope_token()
    begun: dict[str, Any] = {"started": True, **({"scope": scope} if scope else {})}
    await ctx.checkpoint(begun)

    async def started(pid: int) -> None:
        await ctx.checkpoint({**begun, "pid": pid, "pid_started": system.process_start_time(pid)})

    await run_script(step.name, list(step.args), ctx, "apply", on_start=started)
    return {"started": True}


async def undo(step: ScriptStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Run the ``rollback`` script with the same args and FLEET_PHASE=rollback (none: nothing to do).

    A script an agent crash left running (its own process group, pid journalled) is killed first.
    """
    if record is None:
        await ctx.log(f"{step.name} never started: nothing to undo")
        return
    pid, started = record.get("pid"), record.get("pid_started")
    if isinstance(pid, int) and isinstance(started, str) and await system.kill_process_group(pid, started):
        await ctx.log(f"killed {step.name} (pid {pid}), still running from before the restart")
    scope = record.get("scope")
    if isinstance(scope, str) and scope != system.current_scope_token():
        # Spawned before its pid was journalled, or escaped its group: the marker finds it.
        killed = await system.kill_left_scope(scope)
        if killed:
            await ctx.log(f"killed what {step.name} left running before the restart (pids {killed})")
    if not step.rollback:
        await ctx.log(f"{step.name} has no rollback script: nothing to undo")
        return
    await run_script(step.rollback, list(step.args), ctx, "rollback")


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
