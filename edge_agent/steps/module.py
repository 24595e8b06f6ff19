"""``module`` step: load, unload or reload a kernel driver module with ``modprobe``.

The record keeps whether the module was loaded and its version, so undo puts
back that state: undo of ``load`` unloads (if it was not loaded), of
``unload`` loads (if it was), of ``reload`` reloads (unless the version it
recorded is still loaded; unloads if it was not loaded before).

A module that cannot be unloaded (in use, or built into the kernel) fails the
step with "reboot required: ..." rather than pretending: the running kernel
keeps the old driver, so an unload or reload did not happen. The same when a
reload leaves a version in the kernel that differs from the module file
(``modinfo -F version``): the new driver only takes effect after a reboot.
Failing makes the rollout roll the driver package back, so the node stays
consistent; plan a reboot-time update without a ``module`` step instead.
"""

from __future__ import annotations

from typing import Any

from bus.errors import StepError
from bus.messages import ModuleStep
from edge_agent import versions
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepContext, StepHandler
from edge_agent.tools import SystemTools, call, tool_message

__all__ = ["HANDLER", "apply", "check", "load", "reload", "undo", "unload"]

#: modprobe's words for a module that cannot be removed from the running kernel.
_STUCK = ("is in use", "is builtin", "Resource temporarily unavailable", "Device or resource busy")


def check(step: ModuleStep, settings: ExecutorSettings) -> str | None:
    """Intake: the module is allowed by the policy and modprobe is installed."""
    if not Policy.matches(settings.policy.modules, step.name):
        return f"kernel module {step.name} is not allowed by this node's policy"
    tools = settings.tools
    if not tools.has(tools.modprobe):
        return f"{tools.modprobe} is not installed on this node"
    return None


def _kernel_name(name: str) -> str:
    return name.replace("-", "_")


async def _is_loaded(name: str, tools: SystemTools) -> bool:
    return _kernel_name(name) in await versions.loaded_modules(tools)


async def load(name: str, ctx: StepContext) -> None:
    """``modprobe NAME``.

    Raises:
        StepError: modprobe's own message (no such module, bad parameters, init failed).
    """
    tools = ctx.settings.tools
    await call(
        [tools.modprobe, name], tools=tools, timeout=ctx.timeout, on_line=ctx.output, what=f"modprobe {name}"
    )
    await ctx.log(f"module {name} loaded ({await versions.module_version(name, tools) or 'no version'})")


async def unload(name: str, ctx: StepContext) -> None:
    """``modprobe -r NAME``.

    Raises:
        StepError: "reboot required" when the module is in use or built in; else modprobe's message.
    """
    tools = ctx.settings.tools
    result = await call(
        [tools.modprobe, "-r", name], tools=tools, timeout=ctx.timeout, on_line=ctx.output, check=False
    )
    if not result.ok:
        message = tool_message(result)
        if any(word in message for word in _STUCK):
            raise StepError(f"reboot required: module {name} cannot be unloaded: {message}")
        raise StepError(f"modprobe -r {name} failed (exit {result.returncode}): {message}")
    await ctx.log(f"module {name} unloaded")


async def reload(name: str, ctx: StepContext) -> None:
    """Unload (if loaded) and load ``name``; fail if the kernel still runs another version than the file.

    Raises:
        StepError: "reboot required" (in use, built in, version mismatch) or modprobe's message.
    """
    tools = ctx.settings.tools
    if await _is_loaded(name, tools):
        await unload(name, ctx)
    await load(name, ctx)
    running = await versions.module_version(name, tools)
    if running in (None, "loaded", "builtin") or not tools.has(tools.modinfo):
        return
    on_disk = await versions.module_file_version(name, tools, timeout=ctx.timeout)
    if on_disk is not None and on_disk != running:
        raise StepError(f"reboot required: module {name} {running} runs, the module file is {on_disk}")


async def apply(step: ModuleStep, ctx: StepContext) -> dict[str, Any]:
    """Load, unload or reload; the record keeps whether it was loaded, and its version."""
    tools = ctx.settings.tools
    was_loaded = await _is_loaded(step.name, tools)
    record = {"was_loaded": was_loaded, "version": await versions.module_version(step.name, tools)}
    await ctx.checkpoint(record)
    if step.action == "load":
        if was_loaded:
            await ctx.log(f"module {step.name} is already loaded")
        else:
            await load(step.name, ctx)
    elif step.action == "unload":
        if not was_loaded:
            if record["version"] == "builtin":
                raise StepError(f"reboot required: module {step.name} is built into the kernel")
            await ctx.log(f"module {step.name} is not loaded")
        else:
            await unload(step.name, ctx)
    else:
        await reload(step.name, ctx)
    return record


async def undo(step: ModuleStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Put the module back in the state (loaded or not) it had before the step."""
    if record is None:
        await ctx.log(f"module {step.name} was not touched: nothing to undo")
        return
    tools = ctx.settings.tools
    was_loaded = bool(record.get("was_loaded"))
    loaded = await _is_loaded(step.name, tools)
    version = record.get("version")
    if step.action == "reload" and was_loaded:
        if (
            loaded
            and version not in (None, "loaded")
            and await versions.module_version(step.name, tools) == version
        ):
            await ctx.log(f"module {step.name} {version} is loaded, as before")
        else:
            await reload(step.name, ctx)
    elif was_loaded and not loaded:
        await load(step.name, ctx)
    elif not was_loaded and loaded:
        await unload(step.name, ctx)
    else:
        await ctx.log(f"module {step.name} is {'loaded' if loaded else 'not loaded'}, as before")


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
