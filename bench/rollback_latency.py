"""Coordinated rollback latency: first failure -> every node rolled back, on N simulated nodes.

    python bench/rollback_latency.py --broker mosquitto --nodes 1000

One wave, two steps; one node (``sim-0000``) fails its step ``--fail-step``
(default 1, the last), so it restores itself while the hub sends ``abort``
to the nodes still applying and ``rollback`` to those done (DESIGN 3.4).
Timed from the failed step's report (as a separate client receives it) to
the rollout's final state; ``total_seconds`` is from create_rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from _common import PLAN, Bench, Observer, arguments, cpu_window, emit, median, rounded

from bus.messages import RolloutSummary

FAILING = "sim-0000"


def _summary(obs: Observer, rollout: str, state: str) -> RolloutSummary | None:
    for _, _, summary in reversed(obs.summaries.get(rollout, [])):
        if summary is not None and summary.state == state:
            return summary
    return None


async def measure(bench: Bench, nodes: int, repeat: int, heartbeat_s: float) -> dict[str, Any]:
    sim = bench.child("simulate")
    runs: list[dict[str, Any]] = []
    async with Observer(bench.url, bench.topics) as obs:
        targets = await obs.wait_online(nodes, 300, prefix="sim-")
        for index in range(repeat):
            if index:
                await asyncio.sleep(heartbeat_s + 1)  # inventory re-announcements after the jobs
            spec = {"name": f"rollback bench {index}", "targets": targets, "plan": PLAN}
            with cpu_window(bench.child("hub"), sim, bench.broker_child) as cpu:
                started = time.perf_counter()
                rollout = (await obs.call("create_rollout", spec))["rollout"]
                at, state = await obs.until(functools.partial(obs.final, rollout), "final state", 600)
            with contextlib.suppress(TimeoutError):  # the coalesced summary follows the event
                await obs.until(functools.partial(_summary, obs, rollout, state), "final summary", 30)
            failed = [t for t, s in obs.statuses if s.rollout == rollout and s.state == "failed"]
            restored = {s.node for _, s in obs.statuses if s.rollout == rollout and s.state == "rolled_back"}
            summary = _summary(obs, rollout, state)
            runs.append(
                {
                    "rollout": rollout,
                    "state": state,
                    "seconds": rounded(at - min(failed)) if failed else None,
                    "total_seconds": rounded(at - started),
                    "nodes_reporting_rolled_back": len(restored),
                    "counts": summary.counts.model_dump() if summary is not None else None,
                    "cpu_s": {k: rounded(v) for k, v in cpu.items()},
                }
            )
    return {"runs": runs, "hub_rss_mib": bench.child("hub").rss_mib()}


def main() -> None:
    parser = arguments(__doc__ or "", nodes=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=0)
    parser.add_argument("--fail-step", type=int, default=1)
    parser.add_argument("--heartbeat-s", type=float, default=5)
    args = parser.parse_args()
    with Bench(args.broker, keep=args.keep, journal=args.journal) as bench:
        bench.start_hub()
        bench.start_simulator(
            args.nodes,
            step_ms=args.step_ms,
            heartbeat_s=args.heartbeat_s,
            fail=(f"{FAILING}:{args.fail_step}",),
        )
        figures = asyncio.run(measure(bench, args.nodes, args.repeat, args.heartbeat_s))
    times = [r["seconds"] for r in figures["runs"] if r["seconds"] is not None]
    emit(
        {
            "bench": "rollback_latency",
            "broker": args.broker,
            "nodes": args.nodes,
            "steps": len(PLAN),
            "step_ms": args.step_ms,
            "journal": args.journal,
            "seconds": rounded(median(times)) if times else None,
            "total_seconds": rounded(median([r["total_seconds"] for r in figures["runs"]])),
            "ok": all(r["state"] == "rolled_back" for r in figures["runs"]),
            **figures,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
