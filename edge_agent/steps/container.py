"""``container`` step: recreate a Docker container with a new image, keeping its configuration.

Apply: make the image present as the step's ``pull`` policy says (``always``:
``docker pull``; ``missing``, the default: pull only when ``docker image
inspect`` does not find it on the node, so an air-gapped node with a loaded or
imported image needs no registry; ``never``: fail, changing nothing, when it is
not on the node); read the old container's configuration
(``docker container inspect``: environment, published ports, volumes, restart
policy, command, network) and the id of its image; stop and remove it; ``docker
run -d --name NAME`` the new image with that configuration. Undo: stop and
remove the new container and create the old one again from the record, with
the old image (by id when its tag has moved on), running if it ran.

What the configuration keeps: environment variables and the command only
where they differ from the image's defaults (so the new image's own defaults
apply), port bindings, bind mounts and named volumes (``HostConfig.Binds``),
the restart policy and a non-default network. Anonymous volumes, labels,
entrypoint overrides, resource limits and extra networks are not carried over.
"""

from __future__ import annotations

from typing import Any

from bus.errors import StepError
from bus.messages import ContainerStep
from edge_agent.managers.docker import DockerManager
from edge_agent.settings import ExecutorSettings, Policy
from edge_agent.steps.base import StepContext, StepHandler

__all__ = ["HANDLER", "apply", "check", "container_config", "run_args", "undo"]

_DEFAULT_NETWORKS = ("", "default", "bridge")


def check(step: ContainerStep, settings: ExecutorSettings) -> str | None:
    """Intake: the image is allowed by the policy (globs) and docker is installed."""
    if not Policy.matches(settings.policy.images, step.image):
        return f"image {step.image} is not allowed by this node's policy"
    tools = settings.tools
    if not tools.has(tools.docker):
        return f"{tools.docker} is not installed on this node"
    return None


# ------------------------------------------------------------------ pure parts


def _strings(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _ports(bindings: Any) -> list[str]:
    """``HostConfig.PortBindings`` -> ``-p`` values (``[ip:]hostport:port/proto``)."""
    ports: list[str] = []
    if not isinstance(bindings, dict):
        return ports
    for container_port, hosts in sorted(bindings.items()):
        for host in hosts if isinstance(hosts, list) else []:
            ip = str(host.get("HostIp") or "")
            port = str(host.get("HostPort") or "")
            if ip:
                ports.append(f"{ip}:{port}:{container_port}")
            elif port:
                ports.append(f"{port}:{container_port}")
            else:
                ports.append(str(container_port))
    return ports


def container_config(container: dict[str, Any], image: dict[str, Any] | None) -> dict[str, Any]:
    """What ``run_args`` needs to recreate ``container`` (``docker container inspect`` output).

    ``image`` is ``docker image inspect`` of its image: environment entries and a
    command equal to the image's own defaults are left out.
    """
    config = container.get("Config") or {}
    host = container.get("HostConfig") or {}
    image_config = (image or {}).get("Config") or {}
    image_env = set(_strings(image_config.get("Env")))
    cmd = _strings(config.get("Cmd"))
    restart = host.get("RestartPolicy") or {}
    policy = str(restart.get("Name") or "")
    if policy == "on-failure" and int(restart.get("MaximumRetryCount") or 0) > 0:
        policy = f"on-failure:{int(restart['MaximumRetryCount'])}"
    network = str(host.get("NetworkMode") or "")
    return {
        "id": str(container.get("Id") or ""),
        "image": str(config.get("Image") or ""),
        "image_id": str(container.get("Image") or ""),
        "running": bool((container.get("State") or {}).get("Running")),
        "env": [item for item in _strings(config.get("Env")) if item not in image_env],
        "cmd": cmd if cmd != _strings(image_config.get("Cmd")) else [],
        "ports": _ports(host.get("PortBindings")),
        "volumes": _strings(host.get("Binds")),
        "restart": "" if policy in ("", "no") else policy,
        "network": "" if network in _DEFAULT_NETWORKS else network,
    }


def run_args(name: str, image: str, config: dict[str, Any]) -> list[str]:
    """``docker run``/``create`` arguments (after ``run -d``) for ``name`` from a ``container_config``."""
    args = ["--name", name]
    for item in _strings(config.get("env")):
        args += ["-e", item]
    for item in _strings(config.get("ports")):
        args += ["-p", item]
    for item in _strings(config.get("volumes")):
        args += ["-v", item]
    if config.get("restart"):
        args += ["--restart", str(config["restart"])]
    if config.get("network"):
        args += ["--network", str(config["network"])]
    return [*args, image, *_strings(config.get("cmd"))]


# ----------------------------------------------------------------- apply, undo


async def _old_config(docker: DockerManager, name: str, timeout: float) -> dict[str, Any] | None:
    container = await docker.inspect_container(name, timeout=timeout)
    if container is None:
        return None
    image = await docker.inspect_image(str(container.get("Image") or ""), timeout=timeout)
    return container_config(container, image)


async def _image(docker: DockerManager, step: ContainerStep, ctx: StepContext) -> dict[str, Any]:
    """The step's image, pulled or not as its ``pull`` policy says; its ``docker image inspect``.

    Raises:
        StepError: ``never`` and the image is not on the node; the pull failed.
    """
    local = None if step.pull == "always" else await docker.inspect_image(step.image, timeout=ctx.timeout)
    if local is not None:
        await ctx.log(f"image {step.image} is on the node (pull: {step.pull}): not pulled")
        return local
    if step.pull == "never":
        raise StepError(
            f"image {step.image} is not on this node and the step says pull: never "
            "(load it first: docker load, docker import or docker pull)"
        )
    await docker.pull(step.image, timeout=ctx.timeout, on_line=ctx.output)
    pulled = await docker.inspect_image(step.image, timeout=ctx.timeout)
    if pulled is None:
        raise StepError(f"docker pull {step.image} succeeded but the image is not on the node")
    return pulled


async def apply(step: ContainerStep, ctx: StepContext) -> dict[str, Any]:
    """Get the image (pull policy), then replace the container with one of it and the old configuration."""
    docker = DockerManager(ctx.settings.tools)
    old = await _old_config(docker, step.name, ctx.timeout)
    await ctx.checkpoint({"old": old, "created": False})
    pulled = await _image(docker, step, ctx)  # changes no container: its undo finds the old one
    if old is not None and pulled.get("Id") == old["image_id"] and old["running"]:
        await ctx.log(f"container {step.name} already runs {step.image}")
        return {"old": old, "created": False, "unchanged": True}
    if old is not None:
        await docker.remove(step.name, timeout=ctx.timeout, on_line=ctx.output)
        await ctx.log(f"removed container {step.name} ({old['image']})")
    new_id = await docker.create(
        run_args(step.name, step.image, old or {}), start=True, timeout=ctx.timeout, on_line=ctx.output
    )
    record = {"old": old, "created": True, "new_id": new_id}
    await ctx.checkpoint(record)
    await docker.expect_running(step.name, timeout=ctx.timeout)
    await ctx.log(f"container {step.name} runs {step.image}")
    return record


def _is_old(current: dict[str, Any], old: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``current`` is the old container or one recreated from it (not the new one)."""
    if current.get("Id") == old.get("id"):
        return True
    return current.get("Image") == old.get("image_id") and current.get("Id") != record.get("new_id")


async def undo(step: ContainerStep, ctx: StepContext, record: dict[str, Any] | None) -> None:
    """Remove the new container and recreate the old one (its image and configuration, its run state)."""
    if record is None or record.get("unchanged"):
        await ctx.log(f"container {step.name} was not changed: nothing to undo")
        return
    docker = DockerManager(ctx.settings.tools)
    old = record.get("old")
    current = await docker.inspect_container(step.name, timeout=ctx.timeout)
    if current is not None and isinstance(old, dict) and _is_old(current, old, record):
        # Apply stopped before removing the old container, or an earlier undo recreated it.
        running = bool((current.get("State") or {}).get("Running"))
        if old.get("running") and not running:
            await docker.start(step.name, timeout=ctx.timeout, on_line=ctx.output)
        await ctx.log(f"container {step.name} is the old one, as before")
        return
    if current is not None:
        await docker.remove(step.name, timeout=ctx.timeout, on_line=ctx.output)
        await ctx.log(f"removed container {step.name} ({(current.get('Config') or {}).get('Image')})")
    if not isinstance(old, dict):
        return
    image = str(old.get("image") or old.get("image_id"))
    found = await docker.inspect_image(image, timeout=ctx.timeout)
    if old.get("image_id") and (found is None or found.get("Id") != old["image_id"]):
        # The tag now names another image (e.g. ":latest" was re-pulled): use the exact old one.
        if await docker.inspect_image(str(old["image_id"]), timeout=ctx.timeout) is not None:
            image = str(old["image_id"])
        else:
            await ctx.log(f"old image {old['image_id']} is gone: recreating from {image}")
    await docker.create(
        run_args(step.name, image, old),
        start=bool(old.get("running")),
        timeout=ctx.timeout,
        on_line=ctx.output,
    )
    if old.get("running"):
        await docker.expect_running(step.name, timeout=ctx.timeout)
    await ctx.log(f"container {step.name} recreated from {image}")


HANDLER = StepHandler(apply=apply, undo=undo, check=check)
