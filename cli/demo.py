"""``fleet demo [--nodes 5] [--no-tui]``: a whole fleet on this machine.

An embedded broker, the hub with its HTTP bridge, N real agent processes (each
node runs a small HTTP service, ``demo-app``, under the agent's process manager)
and the terminal UI. Everything listens on 127.0.0.1 only, and lives under
``--dir`` (default ``./.fleet-demo``), rebuilt on every start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.options import env_default


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.add_argument(
        "--nodes",
        type=int,
        default=int(env_default("FLEET_NODES", "5") or 5),
        help="how many local agents (default 5)",
    )
    parser.add_argument(
        "--no-tui",
        action="store_true",
        default=(env_default("FLEET_NO_TUI") or "") not in ("", "0"),
        help="print a live node table instead of opening the terminal UI",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(env_default("FLEET_DEMO_DIR", ".fleet-demo") or ""),
        help="working directory of the demo (default ./.fleet-demo)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env_default("FLEET_PORT", "0") or 0),
        help="broker port (default: 1883 if free, else any free port)",
    )
    parser.add_argument(
        "--http",
        default=env_default("FLEET_HTTP", "127.0.0.1:0"),
        help="HTTP bridge address (default 127.0.0.1 on a free port)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds (for scripts)"
    )


def run(args: argparse.Namespace) -> int:
    """Build the demo fleet, run it until Ctrl-C (or --duration), then clean up."""
    from bus.errors import InvalidInput
    from cli.demo_fleet import DemoFleet

    if not 1 <= args.nodes <= 200:
        raise InvalidInput("--nodes must be between 1 and 200 for the local demo")
    fleet = DemoFleet(
        Path(args.dir).absolute(),
        nodes=args.nodes,
        broker_port=args.port,
        http_addr=args.http,
        verbose=bool(args.verbose),
    )
    try:
        fleet.start()
        fleet.print_intro()
        if args.no_tui or not os.isatty(1):
            fleet.watch(args.duration)
        else:
            fleet.run_tui()
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0
