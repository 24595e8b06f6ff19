"""``fleet hub --broker URL [--http H:P] [--db FILE] [--signing-key FILE] [--http-token T]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.config import HubConfig


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments (each also from FLEET_* and the [hub] TOML table)."""
    parser.add_argument("--broker", help="broker URL mqtt://[user:pass@]host:port (FLEET_BROKER)")
    parser.add_argument("--prefix", help="topic prefix, default fleet/v1 (FLEET_PREFIX)")
    parser.add_argument("--db", type=Path, help="TinyDB file, default ./fleet-hub.json (FLEET_DB)")
    parser.add_argument(
        "--signing-key", type=Path, help="Ed25519 private key that signs commands (FLEET_SIGNING_KEY)"
    )
    parser.add_argument("--http", metavar="H:P", help="serve the HTTP bridge on H:P (FLEET_HTTP)")
    parser.add_argument(
        "--http-token",
        metavar="T",
        help="bearer token for the HTTP bridge; required off loopback (FLEET_HTTP_TOKEN)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        help="heartbeat period assumed for nodes that announce none, default 5 (FLEET_HEARTBEAT_S)",
    )
    parser.add_argument(
        "--commit-interval-s",
        type=float,
        help="database group-commit interval, default 0.05 (FLEET_COMMIT_INTERVAL_S)",
    )
    parser.add_argument(
        "--keep-rollouts",
        type=int,
        metavar="N",
        help="finished rollouts kept, default 100; older ones go to DB.archive.jsonl (FLEET_KEEP_ROLLOUTS)",
    )
    parser.add_argument("--client-id", help="MQTT client id, default fleet-hub (FLEET_HUB_CLIENT_ID)")
    parser.add_argument("--config", type=Path, help="TOML config file with a [hub] table (FLEET_CONFIG)")


def run(args: argparse.Namespace) -> int:
    """Run the hub until SIGTERM or SIGINT."""
    from hub.config import read_hub_config

    flags = {
        "broker": args.broker,
        "prefix": args.prefix,
        "db": args.db,
        "signing_key": args.signing_key,
        "http": args.http,
        "http_token": args.http_token,
        "heartbeat_s": args.heartbeat_s,
        "commit_interval_s": args.commit_interval_s,
        "keep_rollouts": args.keep_rollouts,
        "client_id": args.client_id,
    }
    config = read_hub_config(flags, os.environ, args.config)
    return asyncio.run(_serve(config))


async def _serve(config: HubConfig) -> int:
    import signal

    from bus import memory
    from bus.errors import FleetError
    from bus.mqtt import parse_broker_url
    from hub.service import HubService

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = HubService(config)
    await service.start()
    memory.settle_after_start()
    http_task: asyncio.Task[None] | None = None
    stopper = asyncio.ensure_future(stop.wait())
    code = 0
    try:
        address = config.http_address
        if address is not None:
            try:
                from hub.http import serve_http
            except ModuleNotFoundError as exc:
                if exc.name != "hub.http":
                    raise
                print("fleet hub: HTTP bridge not available yet; serving MQTT only", file=sys.stderr)
            else:
                http_task = asyncio.create_task(
                    serve_http(service, address[0], address[1], config.http_token), name="hub-http"
                )
                # serve_http binds before its first await: one turn of the loop tells.
                await asyncio.sleep(0)
                if http_task.done() and not http_task.cancelled():
                    error = http_task.exception()
                    if isinstance(error, FleetError):
                        print(f"fleet hub: {error.reason}", file=sys.stderr)
                        return 2
        http_text = f", http {address[0]}:{address[1]}" if http_task is not None and address else ""
        print(
            f"fleet hub: connected to {parse_broker_url(config.broker).redacted()}, "
            f"prefix {config.prefix}, db {config.db}{http_text}",
            flush=True,
        )
        waiting: set[asyncio.Future[Any]] = {stopper}
        if http_task is not None:
            waiting.add(http_task)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if http_task is not None and http_task.done() and not stopper.done():
            error = http_task.exception() if not http_task.cancelled() else None
            print(f"fleet hub: HTTP bridge stopped: {error or 'cancelled'}", file=sys.stderr)
            code = 1
    finally:
        stopper.cancel()
        if http_task is not None and not http_task.done():
            http_task.cancel()
            try:
                await http_task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # reported; shutdown goes on
                print(f"fleet hub: HTTP bridge: {exc}", file=sys.stderr)
        await service.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return code
