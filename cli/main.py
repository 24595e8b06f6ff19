"""The ``fleet`` command: one subcommand per module, each imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from bus.errors import FleetError

__all__ = ["COMMANDS", "FleetArgumentParser", "main"]

#: subcommand -> (module under cli/, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cli.demo", "embedded broker + hub + HTTP bridge + N local agents (+ TUI)"),
    "broker": ("cli.broker", "embedded amqtt broker"),
    "hub": ("cli.hub", "the rollout hub (and its HTTP bridge)"),
    "agent": ("cli.agent", "the edge agent of one node"),
    "tui": ("cli.tui", "terminal UI"),
    "rollout": ("cli.rollout", "create, list, show, abort or roll back rollouts"),
    "nodes": ("cli.nodes", "fleet table on stdout"),
    "broker-config": ("cli.broker_config", "mosquitto/amqtt config, passwords and ACL"),
    "keys": ("cli.keys", "Ed25519 signing keys"),
    "schema": ("cli.schema", "JSON Schema of every message"),
    "simulate": ("cli.simulate", "N simulated agents in one process"),
}


class FleetArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = FleetArgumentParser(prog="fleet", description="Update a fleet of Linux machines over MQTT.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=FleetArgumentParser)
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if wanted == name:
            module = importlib.import_module(module_name)
            module.register(sub.add_parser(name, help=help_text, description=help_text))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _shown(reason: str) -> str:
    """An error for the terminal: no password of a URL, no control characters (issue 16)."""
    from bus.display import printable
    from bus.mqtt import redact_url_text

    return printable(redact_url_text(reason))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleet`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(args_list)
    args = parser.parse_args(args_list)
    verbosity = "DEBUG" if args.verbose > 1 else "INFO" if args.verbose else "WARNING"
    level = os.environ.get("FLEET_LOG_LEVEL") or verbosity
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        code: int = module.run(args)
    except KeyboardInterrupt:
        return 130
    except FleetError as exc:
        print(f"fleet {args.command}: {_shown(exc.reason)}", file=sys.stderr)
        return exc.status.exit
    return code


if __name__ == "__main__":
    sys.exit(main())
