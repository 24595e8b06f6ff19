"""``fleet hub --broker URL [--http H:P] [--db FILE] [--signing-key FILE] [--http-token-file F]``.

The HTTP token is best given as a file (``--http-token-file``, mode 600) or in
``FLEET_HTTP_TOKEN``: ``--http-token T`` puts it on the command line, which
every local user can read (``ps``, ``/proc/PID/cmdline``).
"""

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
    parser.add_argument("--broker", help="broker URL mqtt://[user:pass@]host:port, or a list (FLEET_BROKER)")
    parser.add_argument("--prefix", help="topic prefix, default fleet/v1 (FLEET_PREFIX)")
    parser.add_argument("--db", type=Path, help="TinyDB file, default ./fleet-hub.json (FLEET_DB)")
    parser.add_argument(
        "--signing-key", type=Path, help="Ed25519 private key that signs commands (FLEET_SIGNING_KEY)"
    )
    parser.add_argument("--http", metavar="H:P", help="serve the HTTP bridge on H:P (FLEET_HTTP)")
    parser.add_argument(
        "--http-token",
        metavar="T",
        help="bearer token for the HTTP bridge; required off loopback (FLEET_HTTP_TOKEN); "
        "visible to every local user: prefer --http-token-file or the variable",
    )
    parser.add_argument(
        "--http-token-file",
        metavar="F",
        type=Path,
        help="file holding the HTTP bridge's bearer token (first line)",
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

    if args.http_token is not None:
        print(
            "fleet hub: --http-token is readable by every local user (ps); "
            "prefer --http-token-file or FLEET_HTTP_TOKEN",
            file=sys.stderr,
        )
    token = args.http_token
    if args.http_token_file is not None:
        token = read_token_file(args.http_token_file, given=args.http_token is not None)
    flags = {
        "broker": args.broker,
        "prefix": args.prefix,
        "db": args.db,
        "signing_key": args.signing_key,
        "http": args.http,
        "http_token": token,
        "heartbeat_s": args.heartbeat_s,
        "commit_interval_s": args.commit_interval_s,
        "keep_rollouts": args.keep_rollouts,
        "client_id": args.client_id,
    }
    config = read_hub_config(flags, os.environ, args.config)
    return asyncio.run(_serve(config))


def read_token_file(path: Path, *, given: bool = False) -> str:
    """The token in the first line of ``path``.

    Raises:
        ConfigError: both --http-token and a file, an unreadable or empty file.
    """
    from bus.errors import ConfigError

    if given:
        raise ConfigError("give the HTTP token once: --http-token or --http-token-file, not both")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --http-token-file {path}: {exc}") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"--http-token-file {path} is empty")
    return token


async def _serve(config: HubConfig) -> int:
    import signal

    from bus import memory
    from bus.errors import FleetError
    from bus.mqtt import redacted_urls
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
            from hub.http import serve_http  # FastAPI only when the bridge is asked for

            http_task = asyncio.create_task(
                serve_http(service, address[0], address[1], config.http_token), name="hub-http"
            )
            # serve_http binds before its first await: one turn of the loop tells.
            await asyncio.sleep(0)
            if http_task.done() and not http_task.cancelled():
                error = http_task.exception()
                if isinstance(error, FleetError):
                    print(f"fleet hub: {error.reason}", file=sys.stderr)
                    return error.status.exit
        http_text = f", http {address[0]}:{address[1]}" if http_task is not None and address else ""
        print(
            f"fleet hub: connected to {redacted_urls(config.broker)}, "
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
