"""``fleet agent --broker URL --node-id ID [...]``: the edge agent of one node.

Every flag also comes from a ``FLEET_*`` environment variable and from the
``[agent]`` table of the TOML config (``edge_agent/config.py``). This module
imports nothing heavy at registration; the agent itself never imports Textual,
FastAPI or uvicorn (edge nodes stay lean).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: argparse destination -> AgentConfig field
_FLAG_FIELDS = {
    "broker": "broker",
    "node_id": "node_id",
    "prefix": "prefix",
    "state_dir": "state_dir",
    "scripts_dir": "scripts_dir",
    "trust": "trust",
    "label": "labels",
    "heartbeat_s": "heartbeat_s",
    "keepalive_s": "keepalive_s",
    "service_manager": "service_manager",
    "policy": "policy",
    "package": "packages",
    "driver": "drivers",
    "config": "config",
}


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments (defaults come from the config loader, not argparse)."""
    add = parser.add_argument
    add("--broker", metavar="URL", help="broker URL [FLEET_BROKER; default mqtt://127.0.0.1:1883]")
    add("--node-id", metavar="ID", help="this node's id [FLEET_NODE_ID; required]")
    add("--prefix", help="topic prefix [FLEET_PREFIX; default fleet/v1]")
    add(
        "--state-dir",
        metavar="D",
        help="journal and cache directory [FLEET_STATE_DIR; default fleet-state/ID]",
    )
    add(
        "--scripts-dir",
        metavar="D",
        help="scripts that steps may run [FLEET_SCRIPTS_DIR; default D-scripts, beside the state dir]",
    )
    add(
        "--trust",
        metavar="FILE",
        action="append",
        help="PEM public key file(s) of trusted command signers; repeatable [FLEET_TRUST, comma-separated]",
    )
    add(
        "--label",
        metavar="K=V",
        action="append",
        help="a label rollouts can target; repeatable [FLEET_LABELS=k=v,k2=v2]",
    )
    add("--heartbeat-s", metavar="S", help="seconds between heartbeats [FLEET_HEARTBEAT_S; default 5]")
    add("--keepalive-s", metavar="S", help="MQTT keepalive in seconds [FLEET_KEEPALIVE_S; default 10]")
    add(
        "--service-manager",
        choices=["process", "systemd", "docker"],
        help="how service steps act [FLEET_SERVICE_MANAGER; default process]",
    )
    add("--policy", metavar="FILE", help="TOML or JSON policy file [FLEET_POLICY]")
    add(
        "--package",
        metavar="NAME",
        action="append",
        help="package whose version the inventory reports; repeatable [FLEET_PACKAGES]",
    )
    add(
        "--driver",
        metavar="NAME",
        action="append",
        help="kernel module the inventory reports; repeatable [FLEET_DRIVERS; default all loaded]",
    )
    add(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML config file, [agent] table [FLEET_CONFIG; default ./fleet.toml if present]",
    )


def run(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM or SIGINT; exit 0 after a clean shutdown.

    The agent logs at INFO unless ``-v`` or ``FLEET_LOG_LEVEL`` says otherwise: each
    command it accepts and each step it runs (``journalctl -u fleet-agent -f``).
    """
    import asyncio
    import logging
    import os
    import signal

    from edge_agent.config import read_agent_config
    from edge_agent.service import Agent

    if not os.environ.get("FLEET_LOG_LEVEL") and not getattr(args, "verbose", 0):
        logging.getLogger().setLevel(logging.INFO)
    flags = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items()}
    config = read_agent_config(flags, os.environ, Path.cwd())

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).run(stop)

    asyncio.run(serve())
    return 0
