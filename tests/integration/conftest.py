"""Helpers shared by the tests that drive one node's ``CommandRunner`` in-process.

``command`` signs a command for ``NODE``, ``make_settings`` builds the node's
settings, ``Recorder`` is the fake ``publish`` that records what the runner says
and wakes waiters, ``run_command`` hands a command over and waits for its final
job snapshot; the ``key`` and ``recorder`` fixtures give each test its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.messages import Command, JobSnapshot, LogLine, StepStatus, encode, new_id
from bus.signing import public_key_of, sign_command
from bus.topics import Topics
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "scripts"
NODE = "node-1"
FINAL = {"succeeded", "failed", "rolled_back", "rollback_failed", "rejected"}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_settings(tmp_path: Path, scripts: Path, key: Ed25519PrivateKey, **extra: Any) -> ExecutorSettings:
    return ExecutorSettings(
        node=NODE,
        state_dir=tmp_path / "state",
        scripts_dir=scripts,
        trusted_keys=(public_key_of(key),),
        **extra,
    )


_last_issued = [0.0]


def command(
    key: Ed25519PrivateKey, plan: list[Any], *, rollout: str = "r1", action: str = "apply", **fields: Any
) -> Command:
    """A signed command, issued later than every command made before it."""
    issued = max(time.time(), _last_issued[0] + 0.001)
    _last_issued[0] = issued
    cmd = Command.model_validate(
        {
            "id": new_id(),
            "node": NODE,
            "rollout": rollout,
            "action": action,
            "issued_at": issued,
            "expires_at": issued + 600,
            "plan": [p.model_dump() for p in plan],
            **fields,
        }
    )
    return sign_command(cmd, key)


@dataclass
class Recorder:
    """A fake ``publish`` that records every message and wakes waiters."""

    messages: list[tuple[str, bytes, int, bool]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.messages.append((topic, payload, qos, retain))
        self.changed.set()

    def of(self, channel: str) -> list[tuple[str, bytes, int, bool]]:
        return [m for m in self.messages if m[0].endswith(f"/{channel}")]

    def statuses(self, command_id: str | None = None) -> list[StepStatus]:
        found = [StepStatus.model_validate_json(m[1]) for m in self.of("status")]
        return [s for s in found if command_id is None or s.command == command_id]

    def snapshots(self) -> list[JobSnapshot]:
        return [JobSnapshot.model_validate_json(m[1]) for m in self.of("job")]

    def logs(self) -> list[LogLine]:
        return [LogLine.model_validate_json(m[1]) for m in self.of("log")]

    def final(self, command_id: str) -> JobSnapshot | None:
        snaps = [s for s in self.snapshots() if s.id == command_id and s.phase in FINAL]
        return snaps[-1] if snaps else None

    async def wait(self, predicate: Callable[[], object], timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.changed.clear()
            if predicate():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout} s; published: {self.summary()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def final_of(self, command_id: str, timeout: float = 60.0) -> JobSnapshot:
        await self.wait(lambda: self.final(command_id), timeout)
        snap = self.final(command_id)
        assert snap is not None
        return snap

    def summary(self) -> list[str]:
        out = []
        for s in self.statuses():
            out.append(f"status {s.index} {s.type} {s.state} {s.detail[:120]}")
        for j in self.snapshots():
            out.append(f"job {j.action} {j.phase} {j.detail[:120]}")
        return out


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def cmd_topic(topics: Topics) -> str:
    return topics.node(NODE, "cmd")


async def run_command(runner: CommandRunner, recorder: Recorder, topics: Topics, cmd: Command) -> JobSnapshot:
    """Hand ``cmd`` to the runner as the broker would; its final job snapshot."""
    await runner.handle_command(cmd_topic(topics), encode(cmd))
    return await recorder.final_of(cmd.id)
