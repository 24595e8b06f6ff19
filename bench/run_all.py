"""Run every benchmark on both brokers and sizes; keep each JSON in bench/results/; print the table.

    python bench/run_all.py                      # everything (about half an hour)
    python bench/run_all.py --brokers mosquitto --sizes 1000
    python bench/run_all.py --table              # only the table, from bench/results/*.json

The table is the README's "Scale" table. Every script also runs on its own
(see its docstring); this file only chains them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _runs(sizes: list[int]) -> list[tuple[str, list[str], list[int]]]:
    big = [max(sizes)]
    return [
        ("rollout_latency", [], sizes),
        ("hub_ingest", ["--seconds", "20"], sizes),
        ("rollback_latency", [], sizes),
        ("rss", [], big),
        ("dead_node", ["--kills", "20", "--freezes", "5"], big),
    ]


def run(brokers: list[str], sizes: list[int], timeout: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    for name, extra, ns in _runs(sizes):
        for broker in brokers:
            for nodes in ns:
                out = RESULTS / f"{name}-{broker}-{nodes}.json"
                argv = [sys.executable, str(HERE / f"{name}.py"), "--broker", broker, "--nodes", str(nodes)]
                print(f"... {name} {broker} {nodes}", file=sys.stderr, flush=True)
                try:
                    proc = subprocess.run(
                        [*argv, *extra, "--out", str(out)], capture_output=True, timeout=timeout, check=False
                    )
                except subprocess.TimeoutExpired:
                    _failed(out, name, broker, nodes, f"no result within {timeout:g} s")
                    continue
                if proc.returncode != 0:
                    _failed(out, name, broker, nodes, proc.stderr.decode(errors="replace")[-600:])


def _failed(out: Path, name: str, broker: str, nodes: int, why: str) -> None:
    print(f"    failed: {why}", file=sys.stderr, flush=True)
    failure = {"bench": name, "broker": broker, "nodes": nodes, "error": why}
    out.write_text(json.dumps(failure, indent=2) + "\n")


def _load() -> dict[tuple[str, str, int], dict[str, Any]]:
    found = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        found[(data["bench"], data["broker"], int(data["nodes"]))] = data
    return found


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def table() -> str:
    found = _load()
    rows = [
        "| figure | broker | N=100 | N=500 | N=1000 |",
        "|---|---|---|---|---|",
    ]

    def line(label: str, bench: str, broker: str, show: Any) -> None:
        cells = []
        for n in (100, 500, 1000):
            data = found.get((bench, broker, n))
            if data is None:
                cells.append("")
            elif "error" in data:
                cells.append("failed")
            else:
                cells.append(show(data))
        if any(cells):
            rows.append(f"| {label} | {broker} | " + " | ".join(cells) + " |")

    for broker in ("mosquitto", "amqtt"):
        line("(a) rollout, create -> succeeded (s)", "rollout_latency", broker, lambda d: _cell(d["seconds"]))
        line(
            "(a) raw fan-out/fan-in, same run (s)",
            "rollout_latency",
            broker,
            lambda d: _cell(d["raw_seconds"]),
        )
        line("(a) ratio rollout / raw", "rollout_latency", broker, lambda d: _cell(d["ratio"], "x"))
        line("(a) CPU s per rollout: hub / simulator / broker", "rollout_latency", broker, _cpu)
        line(
            "(a) summary publishes / KB, store rewrites per rollout",
            "rollout_latency",
            broker,
            lambda d: (
                f"{d['runs'][-1]['summary_publishes']} / {d['runs'][-1]['summary_bytes'] // 1000}, "
                f"{d['runs'][-1]['store_rewrites']}"
            ),
        )
        line(
            "(b) hub CPU at 1 Hz heartbeats (% of a core)",
            "hub_ingest",
            broker,
            lambda d: _cell(d["hub_cpu_pct"], "%") + (" ok" if d["keeps_up"] else " BEHIND"),
        )
        line("(b) heartbeats taken in per s", "hub_ingest", broker, lambda d: _cell(d["messages_per_s"]))
        line(
            "(e) rollback, first failure -> rolled back (s)",
            "rollback_latency",
            broker,
            lambda d: _cell(d["seconds"]),
        )
        line("(d) hub RSS after a rollout (MiB)", "rss", broker, lambda d: _cell(d["hub_rss_mib"]))
        line(
            "(d) one real agent's RSS, as deployed (MiB)", "rss", broker, lambda d: _cell(d["agent_rss_mib"])
        )
        line(
            "(d) the same agent without PYTHONOPTIMIZE (MiB)",
            "rss",
            broker,
            lambda d: _cell(d.get("agent_plain_rss_mib")),
        )
        line("(d) simulator RSS (MiB)", "rss", broker, lambda d: _cell(d["sim_rss_mib"]))
        line("(d) broker RSS (MiB)", "rss", broker, lambda d: _cell(d["broker_rss_mib"]))
        line(
            "(c) dead node, SIGKILL: median / max (s)",
            "dead_node",
            broker,
            lambda d: f"{_cell(d['kill_median_s'])} / {_cell(d['kill_max_s'])}",
        )
        line(
            "(c) dead node, SIGSTOP: median / max (s)",
            "dead_node",
            broker,
            lambda d: f"{_cell(d['freeze_median_s'])} / {_cell(d['freeze_max_s'])}",
        )
    return "\n".join(rows)


def _cpu(data: dict[str, Any]) -> str:
    runs = data["runs"]
    broker = "mosquitto" if data["broker"] == "mosquitto" else "broker"
    return " / ".join(_cell(median_of(runs, key)) for key in ("hub", "simulate", broker))


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = sorted(r["cpu_s"][key] for r in runs if key in r["cpu_s"])
    return values[len(values) // 2] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", default="mosquitto,amqtt")
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument("--timeout", type=float, default=900, help="per script run")
    parser.add_argument("--table", action="store_true", help="only print the table of bench/results/")
    args = parser.parse_args()
    if not args.table:
        run(args.brokers.split(","), [int(n) for n in args.sizes.split(",")], args.timeout)
    print(table())


if __name__ == "__main__":
    main()
