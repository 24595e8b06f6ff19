"""``service`` step: the ``process`` manager here, ``systemd`` and ``docker`` in ``edge_agent.managers``.

The record says whether the service was running before, so undo restores
exactly that: undo of ``stop`` starts it again (if it ran), of ``start`` stops
it (if it did not run), of ``restart`` restarts it (or stops it, if it did not
run). The process manager supervises services declared in the agent config.
"""

from __future__ import annotations

import os
from typing import Any

from bus.errors import StepError
from bus.messages import ServiceStep
from edge_agent import managers, system
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepContext, StepHandler

__all__ = ["HANDLER", "MANAGERS", "apply", "check", "undo"]

#: Service managers this handler drives.
MANAGERS = ("process", *managers.MANAGERS)


def check(step: ServiceStep, settings: ExecutorSettings) -> str | None:
    """The service must be allowed by the policy and defined for the process manager."""
    if settings.service_manager not in MANAGERS:
        return f"service manager {settings.service_manager} is not supported by this agent"
    if settings.service_manager in managers.MANAGERS:
        return managers.check(step, settings)
    if not Policy.matches(settings.policy.services, step.name):
        return f"service {step.name} is not allowed by this node's policy"
    if step.name not in settings.services:
        return f"service {step.name} is not defined for the process manager"
    return None


async def _start(name: str, ctx: StepContext) -> None:
    spec = ctx.settings.services.get(name)
    if spec is None:
        raise StepError(f"service {name} is not defined for the process manager")
    env = {"PATH": os.environ.get("PATH", os.defpath), **spec.env}
    pid = await system.start_service(
        name,
        argv=spec.command,
        cwd=ctx.state_dir / spec.cwd if spec.cwd else ctx.state_dir,
        env=env,
        state_dir=ctx.state_dir,
        settle_s=ctx.settings.service_start_settle_s,
        timeout=ctx.timeout,
    )
    await ctx.log(f"service {name} running (pid {pid})")


async def _stop(name: str, ctx: StepContext) -> None:
    was = await system.stop_service(name, state_dir=ctx.state_dir, grace_s=ctx.settings.service_stop_grace_s)
    await ctx.log(f"service {name} stopped" if was else f"service {name} was not running")


async def apply(step: ServiceStep, ctx: StepContext) -> dict[str, Any]:
    """Stop, start or restart the service; the record keeps whether it was running."""
    if ctx.settings.service_manager in managers.MANAGERS:
        return await managers.apply(step, ctx)
    was_running = system.service_pid(ctx.state_dir, step.name) is not None
    await ctx.checkpoint({"was_running": was_running})
    if step.action in ("stop", "restart"):
        await _stop(step.name, ctx)
    if step.action in ("start", "restart"):
        await _start(step.name, ctx)
    return {"was_running": was_running}


async def undo(step: ServiceStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Bring the service back to its running/stopped state from before the step."""
    if ctx.settings.service_manager in managers.MANAGERS:
        await managers.undo(step, ctx, record)
        return
    if record is None:
        await ctx.log(f"service {step.name} was not touched: nothing to undo")
        return
    if bool(record.get("was_running")):
        if step.action == "restart":
            await _stop(step.name, ctx)
        await _start(step.name, ctx)
    else:
        await _stop(step.name, ctx)


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
