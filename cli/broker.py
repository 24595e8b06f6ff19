"""``fleet broker [--host H] [--port P] [--config FILE]``: the embedded amqtt broker."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.options import env_default


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.add_argument(
        "--host", default=env_default("FLEET_HOST"), help="bind address (default: the config's, 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=env_default("FLEET_PORT"), help="TCP port (default: the config's, 1883)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=env_default("FLEET_BROKER_CONFIG"),
        help="amqtt YAML config (default: broker_config/amqtt.yaml)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the broker until interrupted."""
    import asyncio
    import signal

    from bus.broker import FleetBroker, load_config

    config = load_config(args.config, args.host, int(args.port) if args.port is not None else None)

    async def serve() -> None:
        broker = FleetBroker(config)
        await broker.start()
        print(f"fleet broker listening on {config['listeners']['default']['bind']}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(serve())
    return 0
