"""Memory: RSS of the hub with N nodes (after a rollout over all of them) and of one real agent.

    python bench/rss.py --broker mosquitto --nodes 1000

The hub (``fleet hub`` with its HTTP bridge) is measured idle, with N
simulated nodes online, and after a two-step rollout over all of them. A real
agent (``fleet agent``) is measured after it ran one real command (a TCP
health check of the broker's port) and sent a few heartbeats: as
deploy/fleet-agent.service runs it, with PYTHONOPTIMIZE=2 (``agent_rss_mib``),
and without (``agent_plain_rss_mib``). The simulator's and the broker's RSS
are reported too (the simulator's per node).
"""

from __future__ import annotations

import asyncio
from typing import Any

from _common import PLAN, Bench, Observer, arguments, emit


async def measure(bench: Bench, nodes: int, heartbeat_s: float) -> dict[str, Any]:
    sim = bench.child("simulate")
    async with Observer(bench.url, bench.topics, statuses=False) as obs:
        targets = await obs.wait_online(nodes, 300, prefix="sim-")
        await asyncio.sleep(2)
        hub_online = bench.child("hub").rss_mib()
        body = await obs.call("create_rollout", {"name": "rss", "targets": targets, "plan": PLAN})
        await obs.until(lambda: obs.final(body["rollout"]), "final state", 600)
        await asyncio.sleep(heartbeat_s + 1)  # the agents re-announce their inventory after a job
        hub_after = bench.child("hub").rss_mib()
        # As deploy/fleet-agent.service runs it (PYTHONOPTIMIZE=2); the first run compiles
        # the optimised bytecode (deploy/setup.sh does that at install), the second is measured.
        await _agent_after_a_job(bench, obs, "warm-agent", optimized=True)
        agent, final = await _agent_after_a_job(bench, obs, "rss-agent", optimized=True)
        plain, _ = await _agent_after_a_job(bench, obs, "plain-agent", optimized=False)
        return {
            "seconds": None,
            "hub_rss_mib": hub_after,
            "hub_online_rss_mib": hub_online,
            "agent_rss_mib": agent,
            "agent_plain_rss_mib": plain,
            "agent_job": final,
            "sim_rss_mib": sim.rss_mib(),
            "sim_kib_per_node": round(sim.rss_mib() * 1024 / nodes, 1),
            "broker_rss_mib": bench.broker_child.rss_mib(),
        }


async def _agent_after_a_job(bench: Bench, obs: Observer, node: str, *, optimized: bool) -> tuple[float, str]:
    """Start a real agent, run one job on it, wait for a few heartbeats: (its RSS, the job's end)."""
    agent = bench.start_agent(node, "--heartbeat-s", "1", optimized=optimized)
    await obs.wait_online(1, 60, prefix=node)
    check = {"type": "health", "check": "tcp", "target": f"127.0.0.1:{bench.broker_port}"}
    body = await obs.call("create_rollout", {"name": f"rss {node}", "targets": [node], "plan": [check]})
    final = await obs.until(lambda: obs.final(body["rollout"]), "final state", 60)
    await asyncio.sleep(2)  # a couple of heartbeats after the job
    rss = agent.rss_mib()
    agent.stop()
    return rss, str(final[1])


def main() -> None:
    parser = arguments(__doc__ or "", nodes=100)
    parser.add_argument("--heartbeat-s", type=float, default=5, help="of the simulated nodes")
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal) as bench:
        bench.start_hub()
        hub_idle = bench.child("hub").rss_mib()
        bench.start_simulator(args.nodes, heartbeat_s=args.heartbeat_s)
        figures = asyncio.run(measure(bench, args.nodes, args.heartbeat_s))
    emit(
        {"bench": "rss", "broker": args.broker, "nodes": args.nodes, "hub_idle_rss_mib": hub_idle, **figures},
        args.out,
    )


if __name__ == "__main__":
    main()
