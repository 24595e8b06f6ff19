"""Dead-node detection latency: a real agent killed (or frozen) again and again beside N simulated nodes.

    python bench/dead_node.py --broker mosquitto --nodes 1000 --kills 20 --freezes 5

A real ``fleet agent`` process is killed with SIGKILL (the kernel closes its
socket: the broker publishes its last will) or frozen with SIGSTOP (the
socket stays open: only missed heartbeats, or the broker's keepalive, tell).
Latency is from the signal to the hub's ``node_offline`` event as a separate
client receives it. After each trial the agent is restarted (or continued)
and the next trial waits for it to be back online. The simulated fleet
heartbeats at ``--heartbeat-s`` meanwhile, so the hub is not idle.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from typing import Any

from _common import Bench, Child, Observer, arguments, emit, median, rounded

VICTIM = "victim-1"


def _since(obs: Observer, kind: str, after: float) -> tuple[float, str] | None:
    for at, event in obs.events:
        if at > after and event.kind == kind and event.node == VICTIM:
            return at, event.message
    return None


async def _back_online(obs: Observer, after: float) -> None:
    await obs.until(lambda: _since(obs, "node_online", after), f"{VICTIM} online", 60)


async def measure(bench: Bench, args: Any) -> dict[str, Any]:
    agent_args = ("--heartbeat-s", str(args.heartbeat_s), "--keepalive-s", str(args.keepalive_s))
    kills: list[float] = []
    freezes: list[float] = []
    reasons: dict[str, int] = {}
    agent_rss = 0.0
    async with Observer(bench.url, bench.topics, statuses=False) as obs:
        await obs.wait_online(args.nodes, 300, prefix="sim-")
        started = time.perf_counter()
        agent: Child = bench.start_agent(VICTIM, *agent_args)
        await _back_online(obs, started)
        agent_rss = agent.rss_mib()
        for trial in range(args.kills + args.freezes):
            freeze = trial >= args.kills
            signalled = time.perf_counter()
            os.kill(agent.pid, signal.SIGSTOP if freeze else signal.SIGKILL)
            at, message = await obs.until(
                functools.partial(_since, obs, "node_offline", signalled), "node_offline", 120
            )
            (freezes if freeze else kills).append(at - signalled)
            reason = message.rsplit("(", 1)[-1].rstrip(")")
            reasons[reason] = reasons.get(reason, 0) + 1
            resumed = time.perf_counter()
            if freeze:
                os.kill(agent.pid, signal.SIGCONT)
            else:
                agent.proc.wait(10)
                bench.children.remove(agent)
                agent = bench.start_agent(VICTIM, *agent_args)
            await _back_online(obs, resumed)
    return {
        "kills": len(kills),
        "kill_median_s": rounded(median(kills)) if kills else None,
        "kill_max_s": rounded(max(kills)) if kills else None,
        "freezes": len(freezes),
        "freeze_median_s": rounded(median(freezes)) if freezes else None,
        "freeze_max_s": rounded(max(freezes)) if freezes else None,
        "seconds": rounded(median(kills + freezes)) if kills or freezes else None,
        "detected_by": reasons,
        "agent_rss_mib": agent_rss,
        "hub_rss_mib": bench.child("hub").rss_mib(),
    }


def main() -> None:
    parser = arguments(__doc__ or "", nodes=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument(
        "--heartbeat-s", type=float, default=1.0, help="of the real agent and the simulated fleet"
    )
    parser.add_argument("--keepalive-s", type=int, default=10, help="MQTT keepalive of the real agent")
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal) as bench:
        bench.start_hub()
        bench.start_simulator(args.nodes, heartbeat_s=args.heartbeat_s)
        figures = asyncio.run(measure(bench, args))
    emit(
        {
            "bench": "dead_node",
            "broker": args.broker,
            "nodes": args.nodes,
            "heartbeat_s": args.heartbeat_s,
            "keepalive_s": args.keepalive_s,
            **figures,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
