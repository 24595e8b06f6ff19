"""Rollout latency: create_rollout -> succeeded on N simulated nodes, beside the raw MQTT limit.

One wave, two steps, every step reported (each node publishes running and
succeeded for both steps and its retained job snapshot after each change).
The raw limit is measured first in the same run on the same broker: a bare
paho fan-out/fan-in (one retained message to each of N clients, one reply
from each; bench/_raw.py).

    python bench/rollout_latency.py --broker mosquitto --nodes 1000 [--simulators 2]
    python bench/rollout_latency.py --broker nats --nodes 1000     # a 3-server NATS cluster

With ``--simulators K`` the fleet is split over K ``fleet simulate``
processes (nodes ``sim-a-*``, ``sim-b-*``...), so the simulated agents use
more than one core, as real nodes each have their own.

Prints one JSON object: seconds (median rollout), raw_seconds (median raw
round), ratio, and per run: messages/s through the hub, CPU seconds of hub,
simulator and broker, summary publishes and bytes, store rewrites.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from _common import PLAN, Bench, Observer, arguments, cpu_window, emit, median, rounded
from _raw import raw_fanout


def _reported(obs: Observer, rollout: str, expected: int) -> bool:
    return sum(1 for _, s in obs.statuses if s.rollout == rollout) >= expected


async def measure(bench: Bench, nodes: int, repeat: int, heartbeat_s: float) -> dict[str, Any]:
    sims = [c for c in bench.children if c.name.startswith("simulate")]
    runs: list[dict[str, Any]] = []
    async with Observer(bench.url, bench.topics) as obs:
        targets = await obs.wait_online(nodes, 300, prefix="sim-")
        for index in range(repeat):
            if index:
                # The agents re-announce their inventory after a job: let that pass.
                await asyncio.sleep(heartbeat_s + 1)
            before = bench.metrics()
            spec = {"name": f"bench {index}", "targets": targets, "plan": PLAN}
            with cpu_window(bench.child("hub"), *sims, *bench.broker_children) as cpu:
                started = time.perf_counter()
                body = await obs.call("create_rollout", spec)
                rollout = body["rollout"]
                replied = time.perf_counter()
                at, state = await obs.until(functools.partial(obs.final, rollout), "final state", 600)
            seconds = at - started
            expected = nodes * len(PLAN) * 2
            with contextlib.suppress(TimeoutError):
                await obs.until(functools.partial(_reported, obs, rollout, expected), "every step report", 30)
            after = bench.metrics()
            reports = {(s.node, s.index, s.state) for _, s in obs.statuses if s.rollout == rollout}
            times = sorted(t for t, s in obs.statuses if s.rollout == rollout)
            complete = all(
                (node, step, phase) in reports
                for node in targets
                for step in range(len(PLAN))
                for phase in ("running", "succeeded")
            )
            summaries = obs.summaries.get(rollout, [])
            messages = sum(
                after.get(f'fleet_hub_messages_total{{direction="{d}"}}', 0)
                - before.get(f'fleet_hub_messages_total{{direction="{d}"}}', 0)
                for d in ("in", "out")
            )
            key = "fleet_store_rewrites_total"
            rewrites = after.get(key, 0) - before.get(key, 0)
            runs.append(
                {
                    "rollout": rollout,
                    "state": state,
                    "seconds": rounded(seconds),
                    "reply_seconds": rounded(replied - started),
                    "first_report_s": rounded(times[0] - started) if times else None,
                    "last_report_s": rounded(times[-1] - started) if times else None,
                    "every_step_reported": complete,
                    "step_reports": len(reports),
                    "hub_messages": int(messages),
                    "messages_per_s": round(messages / seconds) if seconds else None,
                    "summary_publishes": len(summaries),
                    "summary_bytes": sum(size for _, size, _ in summaries),
                    "change_messages": len(obs.node_changes.get(rollout, [])),
                    "change_bytes": sum(obs.node_changes.get(rollout, [])),
                    "store_rewrites": int(rewrites),
                    "cpu_s": _cpu_by_role(cpu),
                }
            )
    return {
        "runs": runs,
        "hub_rss_mib": bench.child("hub").rss_mib(),
        "sim_rss_mib": round(sum(sim.rss_mib() for sim in sims), 1),
        "broker_rss_mib": round(sum(child.rss_mib() for child in bench.broker_children), 1),
    }


def _cpu_by_role(cpu: dict[str, float]) -> dict[str, float | None]:
    """CPU seconds of hub, broker, wall, and of every simulator process together ("simulate")."""
    roles: dict[str, float] = {}
    for name, seconds in cpu.items():
        role = "simulate" if name.startswith("simulate") else "broker" if name.startswith("broker") else name
        roles[role] = roles.get(role, 0.0) + seconds
    return {k: rounded(v) for k, v in roles.items()}


def main() -> None:
    parser = arguments(__doc__ or "", nodes=100)
    parser.add_argument("--repeat", type=int, default=3, help="rollouts to time")
    parser.add_argument("--raw-repeat", type=int, default=5, help="raw fan-out/fan-in rounds")
    parser.add_argument("--step-ms", type=float, default=0, help="simulated duration of each step")
    parser.add_argument("--heartbeat-s", type=float, default=5)
    parser.add_argument(
        "--simulators",
        type=int,
        default=1,
        help="split the fleet over this many `fleet simulate` processes (default 1: one core)",
    )
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal, sub_qos=args.sub_qos) as bench:
        raw = raw_fanout(bench.single_url, args.nodes, args.raw_repeat)
        bench.start_hub()
        bench.start_simulators(
            args.nodes, args.simulators, lettered=False, step_ms=args.step_ms, heartbeat_s=args.heartbeat_s
        )
        figures = asyncio.run(measure(bench, args.nodes, args.repeat, args.heartbeat_s))
    seconds = median([r["seconds"] for r in figures["runs"]])
    raw_seconds = median(raw)
    emit(
        {
            "bench": "rollout_latency",
            "broker": args.broker,
            "nodes": args.nodes,
            "steps": len(PLAN),
            "step_ms": args.step_ms,
            "journal": args.journal,
            "simulators": args.simulators,
            "sub_qos": args.sub_qos,
            "seconds": rounded(seconds),
            "raw_seconds": rounded(raw_seconds),
            "raw_rounds": [rounded(r, 4) for r in raw],
            "ratio": round(seconds / raw_seconds, 2) if raw_seconds else None,
            "ok": all(r["state"] == "succeeded" and r["every_step_reported"] for r in figures["runs"]),
            **figures,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
