"""A CommandRunner alone in a process (a fault test kills it -9), seeing the fakes' kernel.

``fleet agent`` reads the live ``/proc/modules``; the ``module`` step's crash
test needs the fakes' view instead, which only ``SystemTools`` can point at.

Usage: python -m tests.fault.runner_child STATE_DIR SCRIPTS_DIR NODE PUBKEY FAKE_STATE COMMAND_JSON
Reports go to STATE_DIR/../reports.jsonl (one {"topic", "payload"} per line).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from bus.signing import load_public_keys
from bus.topics import Topics
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings
from edge_agent.tools import SystemTools

PREFIX = "fleet-fault/v1"


def settings_for(
    state_dir: Path, scripts_dir: Path, node: str, pub: Path, fake_state: Path
) -> ExecutorSettings:
    """The runner's settings, with the fakes' /proc/modules and /sys/module."""
    tools = SystemTools(
        sys_module=fake_state / "sys" / "module", proc_modules=fake_state / "proc" / "modules"
    )
    return ExecutorSettings(
        node=node,
        state_dir=state_dir,
        scripts_dir=scripts_dir,
        trusted_keys=tuple(load_public_keys(pub)),
        tools=tools,
    )


async def main() -> None:
    state_dir, scripts_dir, node, pub, fake_state, command = (Path(a) for a in sys.argv[1:7])
    reports = state_dir.parent / "reports.jsonl"

    async def publish(topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        with reports.open("a") as out:
            out.write(json.dumps({"topic": topic, "payload": payload.decode()}) + "\n")

    topics = Topics(PREFIX)
    runner = CommandRunner(settings_for(state_dir, scripts_dir, str(node), pub, fake_state), topics, publish)
    await runner.recover()
    await runner.handle_command(topics.node(str(node), "cmd"), command.read_bytes())
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main())
