"""``fleet simulate --broker URL --nodes N [...]``: N simulated agents in one process.

The nodes run the real agent code (``edge_agent.simulator``); only the work of
each step is simulated (``--step-ms``). Every flag also comes from a
``FLEET_*`` environment variable (``--trust`` and ``--fail`` comma-separated).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.options import env_default


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    add = parser.add_argument
    add(
        "--broker",
        default=env_default("FLEET_BROKER", "mqtt://127.0.0.1:1883"),
        help="broker URL [FLEET_BROKER; default mqtt://127.0.0.1:1883]",
    )
    add(
        "--nodes",
        type=int,
        default=env_default("FLEET_NODES"),
        help="how many nodes to simulate [FLEET_NODES; required]",
    )
    add(
        "--trust",
        metavar="FILE",
        action="append",
        type=Path,
        help="PEM public key of a trusted command signer; repeatable [FLEET_TRUST, comma-separated]",
    )
    add(
        "--heartbeat-s",
        type=float,
        default=env_default("FLEET_HEARTBEAT_S", "5"),
        help="seconds between each node's heartbeats [FLEET_HEARTBEAT_S; default 5]",
    )
    add(
        "--step-ms",
        type=float,
        default=env_default("FLEET_STEP_MS", "100"),
        help="how long every simulated step (and undo) takes [FLEET_STEP_MS; default 100]",
    )
    add(
        "--fail",
        metavar="NODE[:STEP]",
        action="append",
        help="this node's apply fails at step STEP (default 0); repeatable [FLEET_FAIL, comma-separated]",
    )
    add(
        "--prefix",
        default=env_default("FLEET_PREFIX", "fleet/v1"),
        help="topic prefix [FLEET_PREFIX; default fleet/v1]",
    )
    add(
        "--node-prefix",
        default=env_default("FLEET_NODE_PREFIX", "sim-"),
        help="node ids are this plus a number [FLEET_NODE_PREFIX; default sim-]",
    )
    add(
        "--first",
        type=int,
        default=env_default("FLEET_FIRST", "0"),
        help="number of the first node, to run several simulators [FLEET_FIRST; default 0]",
    )
    add(
        "--label",
        metavar="K=V",
        action="append",
        help="a label of every simulated node (each also has sim=1); repeatable [FLEET_LABELS]",
    )
    add(
        "--keepalive-s",
        type=int,
        default=env_default("FLEET_KEEPALIVE_S", "10"),
        help="MQTT keepalive of each node [FLEET_KEEPALIVE_S; default 10]",
    )
    add(
        "--state-dir",
        type=Path,
        default=env_default("FLEET_STATE_DIR"),
        help="parent of the nodes' state dirs [FLEET_STATE_DIR; default a temp dir in /dev/shm]",
    )
    add(
        "--start-batch",
        type=int,
        default=env_default("FLEET_START_BATCH", "100"),
        help="nodes connecting at once while the fleet starts [FLEET_START_BATCH; default 100]",
    )
    add(
        "--start-timeout-s",
        type=float,
        default=env_default("FLEET_START_TIMEOUT_S", "120"),
        help="how long the whole fleet may take to come online [FLEET_START_TIMEOUT_S; default 120]",
    )
    add(
        "--journal",
        choices=["file", "memory"],
        default=env_default("FLEET_JOURNAL", "file"),
        help="file: each node keeps journal.json like a real agent; memory: no journal file "
        "[FLEET_JOURNAL; default file]",
    )
    add(
        "--threaded-io",
        action="store_true",
        default=bool(env_default("FLEET_THREADED_IO")),
        help="file I/O through a thread pool even on a RAM-backed state dir [FLEET_THREADED_IO]",
    )


def run(args: argparse.Namespace) -> int:
    """Run the simulated fleet until SIGTERM or SIGINT."""
    import asyncio
    import os
    import signal

    from pydantic import ValidationError

    from bus import memory
    from bus.errors import ConfigError
    from bus.messages import describe
    from edge_agent.simulator import InlineExecutor, SimulationConfig, Simulator, parse_fail

    if args.nodes is None:
        raise ConfigError("--nodes is required (or FLEET_NODES)")
    labels = {}
    for item in args.label or _split(os.environ.get("FLEET_LABELS")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"invalid label {item[:80]!r}: expected key=value")
        labels[key.strip()] = value.strip()
    try:
        config = SimulationConfig(
            broker=args.broker,
            nodes=args.nodes,
            prefix=args.prefix,
            node_prefix=args.node_prefix,
            first=args.first,
            trust=args.trust or [Path(p) for p in _split(os.environ.get("FLEET_TRUST"))],
            labels=labels,
            heartbeat_s=args.heartbeat_s,
            keepalive_s=args.keepalive_s,
            step_ms=args.step_ms,
            fail=parse_fail(args.fail or _split(os.environ.get("FLEET_FAIL"))),
            state_root=args.state_dir,
            start_batch=args.start_batch,
            start_timeout_s=args.start_timeout_s,
            journal=args.journal,
            threaded_io=args.threaded_io,
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid simulation: {describe(exc)}") from exc
    if not config.trust:
        print("fleet simulate: no --trust key: every command will be rejected", flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.inline_io():
            # Journal writes to RAM take microseconds: no thread hand-off for them
            # (edge_agent/simulator.py explains why).
            loop.set_default_executor(InlineExecutor())
        simulator = Simulator(config)
        starting = asyncio.ensure_future(simulator.start())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start failure is raised here
                memory.settle_after_start()  # a thousand agents built: out of the collector's way
                ids = simulator.node_ids
                print(
                    f"fleet simulate: {len(ids)} nodes online ({ids[0]} .. {ids[-1]}) in "
                    f"{simulator.start_s:.2f} s; prefix {config.prefix}, step {config.step_ms:g} ms, "
                    f"state in {simulator.state_root}",
                    flush=True,
                )
                await stopping
        finally:
            for future in (starting, stopping):
                future.cancel()
            for future in (starting, stopping):
                try:
                    await future
                except asyncio.CancelledError:
                    pass
                except Exception:  # noqa: S110 - starting's error was raised above already
                    pass
            await simulator.stop()
            print("fleet simulate: stopped", flush=True)

    asyncio.run(serve())
    return 0
