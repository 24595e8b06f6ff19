"""Ten thousand simulated nodes on one hub: ingest, a waved rollout, memory, operator surfaces, dead nodes.

    python bench/ten_thousand.py --nodes 10000 --simulators 4

The fleet is split over ``--simulators`` ``fleet simulate`` processes (nodes
``sim-a-*``, ``sim-b-*``...) heartbeating every ``--heartbeat-s`` (default 5,
the agents' default). Then, in order:

1. ingest: after a warm-up, the hub's CPU share over ``--seconds`` and whether
   it keeps up (every node online, every heartbeat taken in, none stale);
2. a two-step rollout over every node in waves of ``--waves`` (default 10%):
   create -> succeeded, the hub's CPU per node-job (also net of the heartbeat
   load measured in 1.), the bytes of retained summaries and of per-node
   change messages the hub published for it;
3. the operator surfaces: ``fleet nodes`` (the table, ``--summary``, a
   filter), ``GET /api/nodes`` whole and a page;
4. the hub's RSS;
5. dead-node detection: a real ``fleet agent`` beside the fleet killed
   (SIGKILL) and frozen (SIGSTOP), as bench/dead_node.py does.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

import dead_node
from _common import PLAN, Bench, Observer, arguments, child_env, cpu_window, emit, rounded


def _http_nodes(bench: Bench, query: str = "") -> tuple[list[dict[str, Any]], int]:
    """GET /api/nodes[?query]: (rows, X-Total-Count)."""
    url = f"http://127.0.0.1:{bench.http_port}/api/nodes{query}"
    with urllib.request.urlopen(url, timeout=120) as response:
        return json.loads(response.read()), int(response.headers["X-Total-Count"])


async def _wait_online(bench: Bench, nodes: int, timeout: float) -> None:
    """Until the hub counts ``nodes`` online (one small page asked, its total read)."""
    deadline = time.monotonic() + timeout
    while True:
        _, online = await asyncio.to_thread(_http_nodes, bench, "?state=online&limit=1")
        if online >= nodes:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"hub sees {online} of {nodes} nodes online after {timeout:g} s")
        await asyncio.sleep(1)


async def _ingest(
    bench: Bench, obs: Observer, nodes: int, seconds: float, heartbeat_s: float
) -> dict[str, Any]:
    await asyncio.sleep(2 * heartbeat_s)  # warm-up: every node has beaten twice
    before = bench.metrics()
    offline_before = sum(1 for _, e in obs.events if e.kind == "node_offline")
    with cpu_window(bench.child("hub"), *bench.broker_children) as cpu:
        await asyncio.sleep(seconds)
    after = bench.metrics()
    queried = time.time()
    rows, _ = await asyncio.to_thread(_http_nodes, bench)
    key = 'fleet_hub_messages_total{direction="in"}'
    received = after.get(key, 0) - before.get(key, 0)
    wall = cpu["wall"]
    expected = nodes / heartbeat_s
    sims = [r for r in rows if r["node"].startswith("sim-")]
    beats = [r["heartbeat"] for r in sims if r.get("heartbeat") is not None]
    staleness = [queried - b["ts"] for b in beats]
    online = sum(1 for r in sims if r["online"])
    offline_events = sum(1 for _, e in obs.events if e.kind == "node_offline") - offline_before
    rate = received / wall if wall else 0.0
    return {
        "seconds": rounded(wall),
        "expected_per_s": round(expected),
        "messages_per_s": round(rate),
        "hub_cpu_pct": round(100 * cpu["hub"] / wall, 1),
        "broker_cpu_pct": round(100 * sum(cpu[c.name] for c in bench.broker_children) / wall, 1),
        "online": online,
        "offline_events": offline_events,
        "max_staleness_s": rounded(max(staleness, default=0.0)),
        "keeps_up": online == nodes
        and offline_events == 0
        and len(beats) == nodes
        and rate >= 0.95 * expected
        and max(staleness, default=0) < 2 * heartbeat_s + 1,
    }


async def _rollout(
    bench: Bench, obs: Observer, targets: list[str], waves: str, idle_hub_pct: float
) -> dict[str, Any]:
    sims = [c for c in bench.children if c.name.startswith("simulate")]
    before = bench.metrics()
    spec = {"name": "ten thousand", "targets": targets, "plan": PLAN, "strategy": {"waves": [waves]}}
    with cpu_window(bench.child("hub"), *sims, *bench.broker_children) as cpu:
        started = time.perf_counter()
        rollout = (await obs.call("create_rollout", spec, timeout=120))["rollout"]
        at, state = await obs.until(functools.partial(obs.final, rollout), "final state", 1200)
    seconds = at - started
    await asyncio.sleep(1)  # the last summary and changes arrive
    after = bench.metrics()
    messages = sum(
        after.get(f'fleet_hub_messages_total{{direction="{d}"}}', 0)
        - before.get(f'fleet_hub_messages_total{{direction="{d}"}}', 0)
        for d in ("in", "out")
    )
    summaries = obs.summaries.get(rollout, [])
    changes = obs.node_changes.get(rollout, [])
    hub_cpu = cpu["hub"]
    heartbeat_share = idle_hub_pct / 100 * cpu["wall"]
    last = next((summary for _, _, summary in reversed(obs.summaries.get(rollout, [])) if summary), None)
    largest = max((size for _, size, _ in summaries), default=0)
    return {
        "rollout": rollout,
        "state": state,
        "counts": last.counts.model_dump() if last is not None else None,
        "summary_nodes": len(last.nodes) if last is not None else None,
        "summary_nodes_total": last.nodes_total if last is not None else None,
        "seconds": rounded(seconds),
        "hub_messages": int(messages),
        "hub_cpu_s": rounded(hub_cpu),
        "hub_cpu_ms_per_node_job": rounded(1000 * hub_cpu / len(targets)),
        "hub_cpu_ms_per_node_job_net_of_heartbeats": rounded(
            1000 * (hub_cpu - heartbeat_share) / len(targets)
        ),
        "sim_cpu_s": rounded(sum(cpu[c.name] for c in sims)),
        "broker_cpu_s": rounded(sum(cpu[c.name] for c in bench.broker_children)),
        "summary_publishes": len(summaries),
        "summary_bytes": sum(size for _, size, _ in summaries),
        "summary_largest_bytes": largest,
        "record_messages": len(obs.record_bytes.get(rollout, [])),
        "record_bytes": sum(obs.record_bytes.get(rollout, [])),
        "record_parts": len(obs.record_parts.get(rollout, ())),
        "change_messages": len(changes),
        "change_bytes": sum(changes),
    }


def _timed(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=120, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[3:]} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds, done.stdout


def _surfaces(bench: Bench) -> dict[str, Any]:
    base = [sys.executable, "-m", "cli.main", "nodes", "--broker", bench.url, "--prefix", bench.prefix]
    table_s, table = _timed(base)
    try:
        summary_s, summary = _timed([*base, "--summary", "--json"])
        filter_s, filtered = _timed([*base, "--node", "sim-a-*", "--state", "online", "--json"])
    except RuntimeError as exc:  # an older `fleet nodes` without them
        summary_s, summary, filter_s, filtered = 0.0, json.dumps(str(exc)), 0.0, "[]"
    http: dict[str, Any] = {}
    for name, query in (("all", ""), ("page", "?limit=100"), ("filtered", "?node=sim-b-*&limit=500")):
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{bench.http_port}/api/nodes{query}", timeout=60) as r:
            body = r.read()
        http[name] = {"seconds": rounded(time.perf_counter() - started), "bytes": len(body)}
    return {
        "fleet_nodes_s": rounded(table_s),
        "fleet_nodes_lines": len(table.splitlines()),
        "fleet_nodes_summary_s": rounded(summary_s),
        "fleet_nodes_summary": json.loads(summary),
        "fleet_nodes_filter_s": rounded(filter_s),
        "fleet_nodes_filter_rows": len(json.loads(filtered)),
        "http_nodes": http,
    }


async def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with Observer(bench.url, bench.topics, statuses=False) as obs:
        started = time.perf_counter()
        await _wait_online(bench, args.nodes, 600)
        result["online_after_s"] = rounded(time.perf_counter() - started)
        targets = sorted(
            row["node"] for row in (await asyncio.to_thread(_http_nodes, bench, "?node=sim-*"))[0]
        )
        result["ingest"] = await _ingest(bench, obs, args.nodes, args.seconds, args.heartbeat_s)
        result["hub_rss_mib_idle"] = bench.child("hub").rss_mib()
        if not args.no_rollout:
            result["rollout"] = await _rollout(
                bench, obs, targets, args.waves, result["ingest"]["hub_cpu_pct"]
            )
            result["hub_rss_mib_after_rollout"] = bench.child("hub").rss_mib()
    result["surfaces"] = await asyncio.to_thread(_surfaces, bench)
    if args.kills or args.freezes:
        dead = argparse.Namespace(nodes=args.nodes, kills=args.kills, freezes=args.freezes)
        dead.heartbeat_s, dead.keepalive_s = args.victim_heartbeat_s, 10
        figures = await dead_node.measure(bench, dead)
        result["dead_node"] = {k: figures[k] for k in figures if k.startswith(("kill", "freeze", "detected"))}
    sims = [c for c in bench.children if c.name.startswith("simulate")]
    result["hub_rss_mib"] = bench.child("hub").rss_mib()
    result["sim_rss_mib"] = round(sum(s.rss_mib() for s in sims), 1)
    result["broker_rss_mib"] = round(sum(c.rss_mib() for c in bench.broker_children), 1)
    return result


def main() -> None:
    parser = arguments(__doc__ or "", nodes=10000)
    parser.add_argument("--simulators", type=int, default=4)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30, help="length of the ingest window")
    parser.add_argument("--waves", default="10%", help="the rollout's wave size (repeats)")
    parser.add_argument("--no-rollout", action="store_true")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--freezes", type=int, default=2)
    parser.add_argument("--victim-heartbeat-s", type=float, default=1.0, help="of the real agent killed")
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal) as bench:
        bench.start_hub()
        bench.start_simulators(args.nodes, args.simulators, heartbeat_s=args.heartbeat_s, timeout=600)
        figures = asyncio.run(measure(bench, args))
    emit(
        {
            "bench": "ten_thousand",
            "broker": args.broker,
            "nodes": args.nodes,
            "simulators": args.simulators,
            "heartbeat_s": args.heartbeat_s,
            "waves": args.waves,
            "journal": args.journal,
            "seconds": figures.get("rollout", {}).get("seconds"),
            **figures,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
