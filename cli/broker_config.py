"""``fleet broker-config --out DIR --nodes n1,n2 [--port P] [--host H] [--tls] [--add]``.

Writes mosquitto.conf, passwords, acl, amqtt.yaml and one credentials file per
client (DESIGN sections 4 and 7); broker_config/generate.py lists every file.
With ``--kind nats --servers N``: the configs of an N-server NATS cluster
(JetStream, MQTT, routes) with the same users and permissions, and credential
files listing every server's URL; broker_config/nats.py lists every file.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    parser.add_argument(
        "--kind",
        choices=("mosquitto", "nats"),
        default=env_default("FLEET_BROKER_KIND", "mosquitto"),
        help="mosquitto (and the embedded broker; default) or a NATS cluster (FLEET_BROKER_KIND)",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=env_default("FLEET_SERVERS", "3"),
        help="--kind nats: how many servers, server i's MQTT on --port + i - 1 (default 3; FLEET_SERVERS)",
    )
    parser.add_argument(
        "--client-port",
        type=int,
        default=env_default("FLEET_CLIENT_PORT"),
        help="--kind nats: first NATS client port (default 4222)",
    )
    parser.add_argument(
        "--cluster-port",
        type=int,
        default=env_default("FLEET_CLUSTER_PORT"),
        help="--kind nats: first cluster route port (default 6222)",
    )
    parser.add_argument(
        "--tools",
        default=env_default("FLEET_TOOLS"),
        help="more tool users with the TUI's rights, comma-separated "
        "(credentials/<name>.url): on mosquitto, tools running at once need "
        "one each (FLEET_TOOLS)",
    )
    parser.add_argument(
        "--hub-port",
        type=int,
        default=env_default("FLEET_HUB_PORT"),
        help="a listener of the hubs' own, for standby hubs: several `fleet hub` share "
        "credentials/hub.url there, each with its own --client-id (FLEET_HUB_PORT)",
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
    from broker_config.generate import (
        MOSQUITTO_DEFAULT_USER,
        broker_owned,
        hand_to_broker_user,
        parse_nodes,
        write_broker_config,
    )

    nodes = parse_nodes(str(args.nodes))
    if args.kind == "nats":
        return _run_nats(args, nodes)
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
        tools=[t.strip() for t in str(args.tools or "").split(",") if t.strip()],
        hub_port=int(args.hub_port) if args.hub_port is not None else None,
        add=bool(args.add),
        force=bool(args.force),
    )
    settings = result.settings
    scheme = "mqtts" if settings.tls else "mqtt"
    todo: str | None = None
    if settings.broker_user is None and os.geteuid() == 0:
        # mosquitto started as root drops to its own user before reading the secrets.
        todo = hand_to_broker_user(result)
    print(f"broker config for {len(settings.nodes)} node(s) in {result.directory}")
    listener = f"{scheme}://{settings.bind or settings.host}:{settings.port}"
    print(f"  listener   {listener}, prefix {settings.prefix}")
    if settings.hub_port is not None:
        hubs = f"{scheme}://{settings.bind or settings.host}:{settings.hub_port}"
        print(f"  hubs       {hubs} (credentials/hub.url; standby hubs share it)")
    print(f"  mosquitto  mosquitto -c {result.directory / 'mosquitto.conf'}")
    print(f"  embedded   fleet broker --config {result.directory / 'amqtt.yaml'}")
    kept = [c for c in settings.clients if c not in result.created]
    print(f"  new credentials ({len(result.created)}): {', '.join(result.created) or '-'}")
    if kept:
        print(f"  kept credentials ({len(kept)}): {', '.join(kept)}")
    print(f"  each client's broker URL (secret): {result.directory / 'credentials'}/<client>.url")
    if settings.broker_user is None and os.geteuid() == 0 and todo is None:
        print(
            f"  owner      {MOSQUITTO_DEFAULT_USER} (mosquitto runs as it once started as root): "
            + ", ".join(str(p.relative_to(result.directory)) for p in broker_owned(result))
        )
    if todo is not None:
        print(f"fleet broker-config: before `mosquitto -c`: {todo}", file=sys.stderr)
    return 0


def _run_nats(args: argparse.Namespace, nodes: tuple[str, ...]) -> int:
    from broker_config.nats import write_nats_config
    from bus.errors import InvalidInput

    if args.tls or args.bind or args.broker_dir or args.broker_user or args.hub_port:
        raise InvalidInput(
            "--kind nats takes no --tls, --bind, --broker-dir, --broker-user or --hub-port (yet)"
        )
    result = write_nats_config(
        Path(args.out),
        nodes,
        servers=int(args.servers),
        host=args.host,
        port=int(args.port) if args.port is not None else None,
        client_port=int(args.client_port) if args.client_port is not None else None,
        cluster_port=int(args.cluster_port) if args.cluster_port is not None else None,
        prefix=args.prefix,
        add=bool(args.add),
        force=bool(args.force),
    )
    settings = result.settings
    print(f"NATS cluster of {settings.servers} servers, {len(settings.nodes)} node(s), in {result.directory}")
    for index, port in enumerate(settings.mqtt_ports, 1):
        print(f"  server {index}  nats-server -c {result.server_conf(index)}   (MQTT {settings.host}:{port})")
    print(f"  prefix {settings.prefix}; node ids and the prefix must not contain '.'")
    print("  after --add: reload every running server (kill -HUP <its pid>) to take the new users")
    print(f"  new credentials ({len(result.created)}): {', '.join(result.created) or '-'}")
    print(f"  each client's broker URL list (secret): {result.directory / 'credentials'}/<client>.url")
    return 0
