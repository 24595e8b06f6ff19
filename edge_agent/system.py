"""The agent's only door to processes (and, with steps/, to HTTP): run commands safely.

Commands run with ``asyncio.create_subprocess_exec`` (an argument list, never a
shell), a timeout, and their output streamed line by line to a callback (the
``log`` topic). On timeout the whole process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bus.errors import StepError

__all__ = ["LineSink", "RunResult", "run"]

_LOGGER = logging.getLogger(__name__)

LineSink = Callable[[str, str], Awaitable[None]]
"""Receives (stream, line) for every output line: stream is "stdout" or "stderr"."""

_MAX_KEPT = 64 * 1024


@dataclass(frozen=True)
class RunResult:
    """How a command ended, with the tail of its output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def tail(self, limit: int = 400) -> str:
        """The last lines of output, for an error message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-3:])[-limit:]


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    stdin: bytes | None = None,
) -> RunResult:
    """Run ``argv`` to completion.

    Raises:
        StepError: the program cannot be started, or it ran past ``timeout``
            (then its whole process group has been killed).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd) if cwd else None,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise StepError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    kept: dict[str, list[str]] = {"stdout": [], "stderr": []}

    async def pump(stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        size = 0
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            size += len(line)
            if size < _MAX_KEPT:
                kept[name].append(line)
            if on_line is not None:
                try:
                    await on_line(name, line)
                except Exception:  # a failing log sink must not fail the step
                    _LOGGER.exception("log sink failed")

    async def communicate() -> int:
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.drain()
            proc.stdin.close()
        await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
        return await proc.wait()

    try:
        code = await asyncio.wait_for(communicate(), timeout)
    except asyncio.TimeoutError as exc:
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise StepError(f"{Path(argv[0]).name} timed out after {timeout:g} s") from exc
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    return RunResult(tuple(argv), code, "\n".join(kept["stdout"]), "\n".join(kept["stderr"]))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
