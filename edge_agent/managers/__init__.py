"""Service-manager backends (``systemd``, ``docker``) and the ``service`` step on top of them.

A backend starts, stops and restarts a service by name and tells whether it is
active. The ``service`` step (``edge_agent.steps.service``) hands a step to
``apply``/``undo`` here when the node's ``service_manager`` is one of
``MANAGERS``; the ``process`` manager stays in the step module.

The undo record keeps whether the service was active before, so undo restores
exactly that: undo of ``stop`` starts it again (if it was active), of
``start`` stops it (if it was not), of ``restart`` restarts it (or stops it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from bus.errors import StepError
from bus.messages import ServiceStep
from edge_agent.managers.docker import DockerManager
from edge_agent.managers.systemd import SystemdManager, check_systemd, check_unit_name
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.system import LineSink
from edge_agent.tools import SystemTools

if TYPE_CHECKING:
    from edge_agent.steps.base import StepContext

__all__ = [
    "MANAGERS",
    "DockerManager",
    "ServiceBackend",
    "SystemdManager",
    "apply",
    "backend",
    "check",
    "check_systemd",
    "check_unit_name",
    "undo",
]

#: Service managers served by this package.
MANAGERS = ("systemd", "docker")


class ServiceBackend(Protocol):
    """What the service step needs from a service manager."""

    kind: str

    async def start(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Start the service (raises StepError with the tool's message)."""

    async def stop(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Stop the service (raises StepError with the tool's message)."""

    async def restart(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Restart the service (raises StepError with the tool's message)."""

    async def is_active(self, name: str, *, timeout: float) -> bool:
        """True when the service runs."""
        ...


def backend(kind: str, tools: SystemTools) -> ServiceBackend:
    """The backend of service manager ``kind`` (``systemd`` or ``docker``).

    Raises:
        StepError: another kind.
    """
    if kind == "systemd":
        return SystemdManager(tools)
    if kind == "docker":
        return DockerManager(tools)
    raise StepError(f"service manager {kind} is not supported by this agent")


def check(step: ServiceStep, settings: ExecutorSettings) -> str | None:
    """Intake: the service is allowed by the policy and the manager's tool is installed."""
    if settings.service_manager not in MANAGERS:
        return f"service manager {settings.service_manager} is not supported by this agent"
    if not Policy.matches(settings.policy.services, step.name):
        return f"service {step.name} is not allowed by this node's policy"
    tools = settings.tools
    binary = tools.systemctl if settings.service_manager == "systemd" else tools.docker
    if not tools.has(binary):
        return f"{binary} is not installed on this node"
    if settings.service_manager == "systemd":
        return check_unit_name(step.name)
    return None


async def _act(manager: ServiceBackend, action: str, name: str, ctx: StepContext) -> None:
    if action == "stop":
        await manager.stop(name, timeout=ctx.timeout, on_line=ctx.output)
    elif action == "start":
        await manager.start(name, timeout=ctx.timeout, on_line=ctx.output)
    else:
        await manager.restart(name, timeout=ctx.timeout, on_line=ctx.output)
    await ctx.log(f"{manager.kind}: {action} {name}: done")


async def apply(step: ServiceStep, ctx: StepContext) -> dict[str, Any]:
    """Stop, start or restart the service; the record keeps whether it was active."""
    manager = backend(ctx.settings.service_manager, ctx.settings.tools)
    was_active = await manager.is_active(step.name, timeout=ctx.timeout)
    record = {"manager": manager.kind, "was_active": was_active}
    await ctx.checkpoint(record)
    await _act(manager, step.action, step.name, ctx)
    return record


async def _reset_failed(manager: ServiceBackend, name: str, ctx: StepContext) -> None:
    """Before an undo starts a systemd unit: clear its start-limit counter (and say so)."""
    if not isinstance(manager, SystemdManager):
        return
    refused = await manager.reset_failed(name, timeout=ctx.timeout, on_line=ctx.output)
    if refused is None:
        await ctx.log(f"systemd: reset-failed {name} (a fast update and undo may reach its start limit)")
    else:
        await ctx.log(f"systemd: reset-failed {name} refused: {refused}")


async def undo(step: ServiceStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Bring the service back to the active/inactive state it had before the step."""
    if record is None:
        await ctx.log(f"service {step.name} was not touched: nothing to undo")
        return
    manager = backend(str(record.get("manager") or ctx.settings.service_manager), ctx.settings.tools)
    active = await manager.is_active(step.name, timeout=ctx.timeout)
    if bool(record.get("was_active")):
        if step.action == "restart":
            await _reset_failed(manager, step.name, ctx)
            await _act(manager, "restart", step.name, ctx)
        elif not active:
            await _reset_failed(manager, step.name, ctx)
            await _act(manager, "start", step.name, ctx)
        else:
            await ctx.log(f"service {step.name} is active, as before")
    elif active:
        await _act(manager, "stop", step.name, ctx)
    else:
        await ctx.log(f"service {step.name} is stopped, as before")
