"""``fleet broker-config --out DIR --nodes n1,n2 [--port P] [--host H] [--tls] [--add]``.

Writes mosquitto.conf, passwords, acl, amqtt.yaml and one credentials file per
client (DESIGN sections 4 and 7); broker_config/generate.py lists every file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.options import env_default


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    out = env_default("FLEET_OUT")
    nodes = env_default("FLEET_NODES")
    parser.add_argument(
        "--out", type=Path, required=out is None, default=out, help="directory to write (created; FLEET_OUT)"
    )
    parser.add_argument(
        "--nodes",
        required=nodes is None,
        default=nodes,
        help="node ids, comma-separated: each gets its own broker user (FLEET_NODES)",
    )
    parser.add_argument(
        "--host",
        default=env_default("FLEET_HOST"),
        help="name or address clients connect to, in every URL and the TLS "
        "certificate (default 127.0.0.1; FLEET_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_default("FLEET_PORT"),
        help="listener port (default 1883, 8883 with --tls; FLEET_PORT)",
    )
    parser.add_argument(
        "--bind",
        default=env_default("FLEET_BIND"),
        help="listener address if not --host, e.g. 0.0.0.0 in a container (FLEET_BIND)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=_flag("FLEET_TLS"),
        help="TLS listener with a generated CA; URLs become mqtts://...?ca=PATH (FLEET_TLS)",
    )
    parser.add_argument(
        "--prefix",
        default=env_default("FLEET_PREFIX"),
        help="topic prefix of the fleet (default fleet/v1; FLEET_PREFIX)",
    )
    parser.add_argument(
        "--broker-dir",
        default=env_default("FLEET_BROKER_DIR"),
        help="DIR as the broker sees it, e.g. a container mount; paths in the "
        "generated files point there (default: DIR's absolute path)",
    )
    parser.add_argument(
        "--broker-user",
        default=env_default("FLEET_BROKER_USER"),
        help="account mosquitto runs as after start (its `user` option); it must "
        "be able to read DIR's secrets (default: mosquitto's own default)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--add",
        action="store_true",
        help="add nodes to the config in DIR; existing credentials stay unchanged",
    )
    mode.add_argument(
        "--force",
        action="store_true",
        help="replace an existing config in DIR, with new credentials for every client",
    )


def _flag(name: str) -> bool | None:
    value = env_default(name)
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def run(args: argparse.Namespace) -> int:
    """Write the config and say where the credentials are."""
    from broker_config.generate import parse_nodes, write_broker_config

    nodes = parse_nodes(str(args.nodes))
    result = write_broker_config(
        Path(args.out),
        nodes,
        host=args.host,
        port=int(args.port) if args.port is not None else None,
        bind=args.bind,
        tls=True if args.tls else None,
        prefix=args.prefix,
        broker_dir=args.broker_dir,
        broker_user=args.broker_user,
        add=bool(args.add),
        force=bool(args.force),
    )
    settings = result.settings
    scheme = "mqtts" if settings.tls else "mqtt"
    print(f"broker config for {len(settings.nodes)} node(s) in {result.directory}")
    listener = f"{scheme}://{settings.bind or settings.host}:{settings.port}"
    print(f"  listener   {listener}, prefix {settings.prefix}")
    print(f"  mosquitto  mosquitto -c {result.directory / 'mosquitto.conf'}")
    print(f"  embedded   fleet broker --config {result.directory / 'amqtt.yaml'}")
    kept = [c for c in settings.clients if c not in result.created]
    print(f"  new credentials ({len(result.created)}): {', '.join(result.created) or '-'}")
    if kept:
        print(f"  kept credentials ({len(kept)}): {', '.join(kept)}")
    print(f"  each client's broker URL (secret): {result.directory / 'credentials'}/<client>.url")
    return 0
