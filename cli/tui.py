"""``fleet tui --broker URL [--prefix P] [--serve H:P]``: the terminal UI (MQTT only)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys
from pathlib import Path

from bus.errors import ConfigError
from bus.topics import DEFAULT_PREFIX
from cli.options import env_default

__all__ = ["is_loopback", "parse_serve", "register", "run"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.add_argument(
        "--broker",
        default=env_default("FLEET_BROKER", "mqtt://127.0.0.1:1883"),
        help="broker URL, mqtt://[user:pass@]host:port or mqtts://... (FLEET_BROKER)",
    )
    parser.add_argument(
        "--prefix",
        default=env_default("FLEET_PREFIX", DEFAULT_PREFIX),
        help=f"topic prefix (FLEET_PREFIX, default {DEFAULT_PREFIX})",
    )
    parser.add_argument(
        "--serve",
        metavar="H:P",
        default=env_default("FLEET_SERVE"),
        help="serve the same app to a browser on H:P with textual-serve (FLEET_SERVE); "
        "loopback unless you mean otherwise",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=env_default("FLEET_EXAMPLES", "examples"),
        help="directory of rollout specs offered by the new-rollout screen (FLEET_EXAMPLES)",
    )
    parser.add_argument(
        "--utc",
        action="store_true",
        default=env_default("FLEET_UTC") == "1",
        help="show times in UTC (FLEET_UTC=1)",
    )


def parse_serve(value: str) -> tuple[str, int]:
    """Split ``H:P`` (``[::1]:P`` for IPv6; a bare ``P`` means 127.0.0.1); ConfigError if malformed."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", value.strip()
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"--serve {value!r}: expected HOST:PORT") from exc
    if not 0 < port < 65536:
        raise ConfigError(f"--serve {value!r}: port must be 1-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(host: str, port: int, args: argparse.Namespace) -> int:
    try:
        from textual_serve.server import Server
    except ImportError as exc:
        raise ConfigError("--serve needs the textual-serve package (pip install textual-serve)") from exc
    if not is_loopback(host):
        print(
            f"fleet tui: warning: serving on {host}:{port}, which is not loopback: anyone who reaches it "
            "can abort and roll back rollouts without logging in. Prefer an SSH tunnel to 127.0.0.1.",
            file=sys.stderr,
        )
    # Each browser session runs `fleet tui` as a child; the broker URL (maybe with a
    # password) travels in its environment, never on a command line others can read.
    os.environ["FLEET_BROKER"] = args.broker
    os.environ["FLEET_PREFIX"] = args.prefix
    os.environ["FLEET_EXAMPLES"] = str(args.examples)
    os.environ["FLEET_UTC"] = "1" if args.utc else "0"
    os.environ.pop("FLEET_SERVE", None)
    command = f"{shlex.quote(sys.executable)} -m cli.main tui"
    print(f"fleet tui: serving on http://{host}:{port}", flush=True)
    Server(command, host=host, port=port, title="fleet").serve()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the TUI in this terminal, or serve it to browsers."""
    from bus.mqtt import parse_broker_url
    from bus.topics import Topics
    from tui.config import TuiConfig

    parse_broker_url(args.broker)  # a bad URL is a usage error (exit 2), before any screen
    topics = Topics(args.prefix)
    config = TuiConfig(broker=args.broker, prefix=args.prefix, examples_dir=args.examples, utc=args.utc)
    if args.serve:
        host, port = parse_serve(args.serve)
        return _serve(host, port, args)

    from tui.app import make_app
    from tui.feed import MqttFeed

    app = make_app(config, MqttFeed(config.broker, topics))
    app.run()
    return 0
