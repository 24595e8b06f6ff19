"""The ``docker`` service manager and the Docker calls of the ``container`` step (``docker`` CLI).

A service named N is the container named N: ``docker start|stop|restart N``,
active when ``docker container inspect -f '{{.State.Running}}' N`` says true.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bus.errors import StepError
from edge_agent.system import LineSink
from edge_agent.tools import SystemTools, call, tool_message

__all__ = ["DockerManager"]


def _is_missing(stderr: str) -> bool:
    # "Error: No such container: x", "Error response from daemon: No such container: x",
    # "Error: No such object: x", "Error response from daemon: No such image: x".
    return "No such " in stderr


class DockerManager:
    """Containers as services, and the container operations the ``container`` step needs."""

    kind = "docker"

    def __init__(self, tools: SystemTools) -> None:
        self._tools = tools

    async def _docker(
        self, args: Sequence[str], *, timeout: float, on_line: LineSink | None = None, what: str | None = None
    ) -> str:
        result = await call(
            [self._tools.docker, *args],
            tools=self._tools,
            timeout=timeout,
            on_line=on_line,
            what=what or f"docker {args[0]}",
        )
        return result.stdout

    # ------------------------------------------------------------ service manager

    async def start(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Start container ``name``; fail if it is not running right after.

        Raises:
            StepError: docker's own message, or how the container ended.
        """
        await self._docker(["start", name], timeout=timeout, on_line=on_line, what=f"docker start {name}")
        await self.expect_running(name, timeout=timeout)

    async def stop(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Stop container ``name`` (SIGTERM, SIGKILL after docker's grace period).

        Raises:
            StepError: docker's own message (e.g. no such container).
        """
        await self._docker(["stop", name], timeout=timeout, on_line=on_line, what=f"docker stop {name}")

    async def restart(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """Restart container ``name`` (start it if it was stopped).

        Raises:
            StepError: docker's own message, or how the container ended.
        """
        await self._docker(["restart", name], timeout=timeout, on_line=on_line, what=f"docker restart {name}")
        await self.expect_running(name, timeout=timeout)

    async def state(self, name: str, *, timeout: float) -> str:
        """The container's status (running, exited, created, paused, ...), ``absent`` if there is none."""
        container = await self.inspect_container(name, timeout=timeout)
        if container is None:
            return "absent"
        return str(container.get("State", {}).get("Status") or "unknown")

    async def is_active(self, name: str, *, timeout: float) -> bool:
        """True when container ``name`` exists and runs.

        Raises:
            StepError: docker cannot answer (no daemon).
        """
        result = await call(
            [self._tools.docker, "container", "inspect", "-f", "{{.State.Running}}", name],
            tools=self._tools,
            timeout=timeout,
            check=False,
        )
        if not result.ok:
            if _is_missing(result.stderr):
                return False
            raise StepError(f"docker container inspect {name} failed: {tool_message(result)}")
        return result.stdout.strip() == "true"

    async def expect_running(self, name: str, *, timeout: float) -> None:
        """Fail unless container ``name`` runs, quoting its exit code and error.

        Raises:
            StepError: the container is gone or not running.
        """
        container = await self.inspect_container(name, timeout=timeout)
        if container is None:
            raise StepError(f"container {name} is gone")
        state = container.get("State", {})
        if not state.get("Running"):
            detail = f"exit code {state.get('ExitCode')}"
            if state.get("Error"):
                detail += f": {state['Error']}"
            raise StepError(f"container {name} is {state.get('Status', 'not running')} ({detail})")

    # ------------------------------------------------------------------ containers

    async def _inspect(self, kind: str, name: str, timeout: float) -> dict[str, Any] | None:
        result = await call(
            [self._tools.docker, kind, "inspect", name], tools=self._tools, timeout=timeout, check=False
        )
        if not result.ok:
            if _is_missing(result.stderr):
                return None
            raise StepError(f"docker {kind} inspect {name} failed: {tool_message(result)}")
        try:
            found = json.loads(result.stdout)
        except ValueError as exc:
            raise StepError(f"docker {kind} inspect {name}: unreadable output: {exc}") from exc
        if not isinstance(found, list) or not found or not isinstance(found[0], dict):
            return None
        return found[0]

    async def inspect_container(self, name: str, *, timeout: float) -> dict[str, Any] | None:
        """``docker container inspect NAME`` (the first object), or None if there is no such container."""
        return await self._inspect("container", name, timeout)

    async def inspect_image(self, ref: str, *, timeout: float) -> dict[str, Any] | None:
        """``docker image inspect REF``, or None if there is no such image locally."""
        return await self._inspect("image", ref, timeout)

    async def pull(self, image: str, *, timeout: float, on_line: LineSink | None = None) -> None:
        """``docker pull IMAGE``.

        Raises:
            StepError: docker's own message (unknown image, no registry, denied).
        """
        await self._docker(["pull", image], timeout=timeout, on_line=on_line, what=f"docker pull {image}")

    async def remove(self, name: str, *, timeout: float, on_line: LineSink | None = None) -> bool:
        """Stop and remove container ``name``; False if there was none.

        Raises:
            StepError: docker's own message.
        """
        if await self.inspect_container(name, timeout=timeout) is None:
            return False
        await self._docker(["stop", name], timeout=timeout, on_line=on_line, what=f"docker stop {name}")
        await self._docker(["rm", name], timeout=timeout, on_line=on_line, what=f"docker rm {name}")
        return True

    async def create(
        self, args: Sequence[str], *, start: bool, timeout: float, on_line: LineSink | None = None
    ) -> str:
        """``docker run -d ARGS`` (``start``) or ``docker create ARGS``; returns the new container's id.

        Raises:
            StepError: docker's own message (name in use, bad option, image not found).
        """
        verb = ["run", "-d"] if start else ["create"]
        out = await self._docker([*verb, *args], timeout=timeout, on_line=on_line, what=f"docker {verb[0]}")
        lines = out.strip().splitlines()
        return lines[-1].strip() if lines else ""
