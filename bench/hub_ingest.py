"""Hub ingest: N nodes heartbeating at 1 Hz; the hub's CPU share and whether it keeps up.

    python bench/hub_ingest.py --broker mosquitto --nodes 1000 --seconds 20

After a warm-up, the hub's CPU seconds are read from /proc over a window of
``--seconds``. The hub keeps up when every node stays online, it took in
(nearly) every heartbeat sent in the window (its message counter), and the
last heartbeat it holds of every node is fresh (``staleness``: now minus the
heartbeat's own timestamp) and was taken in quickly (``lag``: the hub's
``last_seen`` minus that timestamp).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _common import Bench, Observer, arguments, cpu_window, emit, median, rounded


async def measure(bench: Bench, nodes: int, seconds: float, heartbeat_s: float) -> dict[str, Any]:
    sim = bench.child("simulate")
    async with Observer(bench.url, bench.topics, statuses=False) as obs:
        await obs.wait_online(nodes, 300, prefix="sim-")
        await asyncio.sleep(3 * heartbeat_s)  # warm-up: every node has beaten a few times
        before = bench.metrics()
        offline_before = sum(1 for _, e in obs.events if e.kind == "node_offline")
        with cpu_window(bench.child("hub"), sim, bench.broker_child) as cpu:
            await asyncio.sleep(seconds)
        after = bench.metrics()
        queried = time.time()
        rows = await obs.nodes()
        offline_events = sum(1 for _, e in obs.events if e.kind == "node_offline") - offline_before
    key = 'fleet_hub_messages_total{direction="in"}'
    received = after.get(key, 0) - before.get(key, 0)
    wall = cpu["wall"]
    expected = nodes / heartbeat_s
    sims = [r for r in rows if r["node"].startswith("sim-")]
    beats = [r["heartbeat"] for r in sims if r["heartbeat"] is not None]
    lags = [r["last_seen"] - r["heartbeat"]["ts"] for r in sims if r["heartbeat"] is not None]
    staleness = [queried - b["ts"] for b in beats]
    online = sum(1 for r in sims if r["online"])
    rate = received / wall if wall else 0.0
    keeps_up = (
        online == nodes
        and offline_events == 0
        and len(beats) == nodes
        and rate >= 0.95 * expected
        and max(staleness, default=0) < 2 * heartbeat_s + 1
    )
    return {
        "seconds": rounded(wall),
        "expected_per_s": round(expected),
        "messages_per_s": round(rate),
        "hub_cpu_pct": round(100 * cpu["hub"] / wall, 1),
        "sim_cpu_pct": round(100 * cpu["simulate"] / wall, 1),
        "broker_cpu_pct": round(100 * cpu[bench.broker_child.name] / wall, 1),
        "online": online,
        "offline_events": offline_events,
        "keeps_up": keeps_up,
        "max_lag_s": rounded(max(lags, default=0.0)),
        "median_lag_s": rounded(median(lags) if lags else 0.0),
        "max_staleness_s": rounded(max(staleness, default=0.0)),
        "hub_rss_mib": bench.child("hub").rss_mib(),
        "sim_rss_mib": sim.rss_mib(),
        "broker_rss_mib": bench.broker_child.rss_mib(),
    }


def main() -> None:
    parser = arguments(__doc__ or "", nodes=100)
    parser.add_argument("--seconds", type=float, default=20, help="length of the measured window")
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal) as bench:
        bench.start_hub()
        bench.start_simulator(args.nodes, heartbeat_s=args.heartbeat_s)
        figures = asyncio.run(measure(bench, args.nodes, args.seconds, args.heartbeat_s))
    emit(
        {
            "bench": "hub_ingest",
            "broker": args.broker,
            "nodes": args.nodes,
            "heartbeat_s": args.heartbeat_s,
            **figures,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
