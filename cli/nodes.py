"""``fleet nodes [--json] [--by-version | --summary] [filters]``: the fleet, from the hub.

Filters: ``--state S``, ``--version NAME[=V]``, ``--label K=V``, ``--node GLOB``.
The table ends with counts by state and the versions that drift (more than one
version of the same software in the fleet);
``--by-version`` shows which versions run where instead of one row per node;
``--summary`` only the counts by state and by version (one request, whatever the
fleet's size). The filters go to the hub (it sends only the matching nodes) and
are applied here again (a hub without them sends every node).

Also home of ``hub_session``, the request/reply session ``fleet rollout`` uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fnmatch
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bus.display import printable

if TYPE_CHECKING:
    from bus.mqtt import Message, MqttClient
    from bus.rpc import HubClient
    from bus.topics import Topics
    from hub.config import ClientConfig

_PAGE = 200  # nodes per request (~90 KB with small inventories); smaller if the hub says too large
_MAX_PAGES = 10_000


def add_client_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--broker, --prefix, --config, --request-timeout (each also from FLEET_* and [client] TOML)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--broker", default=default, help="broker URL (FLEET_BROKER)")
    parser.add_argument("--prefix", default=default, help="topic prefix, default fleet/v1 (FLEET_PREFIX)")
    parser.add_argument(
        "--config", type=Path, default=default, help="TOML config file with a [client] table (FLEET_CONFIG)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=default,
        metavar="S",
        help="seconds to wait for the hub's reply, default 10 (FLEET_REQUEST_TIMEOUT)",
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The tool's config from flags, environment and TOML."""
    from hub.config import read_client_config

    flags = {
        "broker": getattr(args, "broker", None),
        "prefix": getattr(args, "prefix", None),
        "request_timeout_s": getattr(args, "request_timeout", None),
    }
    return read_client_config(flags, os.environ, getattr(args, "config", None))


class HubSession:
    """A connected client with request/reply to the hub and a queue of other messages."""

    def __init__(self, client: MqttClient, hub: HubClient, topics: Topics, timeout: float) -> None:
        self.client = client
        self.hub = hub
        self.topics = topics
        self.timeout = timeout
        self.other: asyncio.Queue[Message] = asyncio.Queue()

    async def call(self, op: Any, body: dict[str, Any] | None = None) -> Any:
        """Send one request; the ``Reply``. BusError when the hub does not answer."""
        return await self.hub.call(op, body, timeout=self.timeout)

    async def pump(self) -> None:
        """Feed replies to the hub client, queue everything else."""
        async for message in self.client.messages():
            if not self.hub.feed(message.topic, message.payload):
                self.other.put_nowait(message)


@contextlib.asynccontextmanager
async def hub_session(config: ClientConfig) -> AsyncIterator[HubSession]:
    """Connect, subscribe to this client's reply topic and serve replies until the block ends."""
    from bus.mqtt import MqttClient
    from bus.rpc import HubClient
    from bus.topics import Topics

    topics = Topics(config.prefix)
    async with MqttClient(config.broker, keepalive=30) as client:
        hub = HubClient(client, topics)
        await hub.subscribe()
        session = HubSession(client, hub, topics, config.request_timeout_s)
        pump = asyncio.create_task(session.pump(), name="cli-pump")
        try:
            yield session
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    add_client_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON list (as GET /api/nodes)")
    parser.add_argument(
        "--by-version",
        action="store_true",
        help="which versions run where: one row per software and version (drift view)",
    )
    parser.add_argument("--state", choices=("online", "offline"), help="only nodes in this state")
    parser.add_argument(
        "--version",
        action="append",
        default=[],
        metavar="NAME[=VERSION]",
        help="only nodes that report NAME (at VERSION); repeatable, all must match",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="only nodes with this label; repeatable, all must match",
    )
    parser.add_argument("--node", metavar="GLOB", help="only nodes whose id matches this glob, e.g. 'web-*'")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="only the counts: nodes by state and by software version",
    )


def run(args: argparse.Namespace) -> int:
    """Ask the hub for its node table and print it."""
    from bus.errors import InvalidInput

    wanted = [parse_version_filter(text) for text in args.version]
    if any(not name for name, _ in wanted):
        raise InvalidInput("--version needs NAME or NAME=VERSION")
    labels = dict(parse_label_filter(text) for text in args.label)
    query: dict[str, Any] = {"labels": labels} if labels else {}
    if args.state:
        query["state"] = args.state
    if args.node:
        query["node"] = args.node
    if wanted:
        query["versions"] = dict(wanted)
    config = client_config(args)
    hubs: list[str] = []
    if args.summary:
        counts, error = asyncio.run(fetch_summary(config, query))
        if error is None and counts is not None:
            print(json.dumps(counts, indent=2) if args.json else printable(render_summary(counts)))
            return 0
        if error is not None:
            print(f"fleet nodes: {printable(error)}", file=sys.stderr)
            return 1
    nodes, error = asyncio.run(fetch_nodes(config, hubs, query))
    if error is not None:
        print(f"fleet nodes: {printable(error)}", file=sys.stderr)
        return 1
    nodes = [n for n in nodes if matches(n, state=args.state, versions=wanted, labels=labels, glob=args.node)]
    if args.summary:  # a hub that does not count: count here
        counts = summarise_rows(nodes)
        print(json.dumps(counts, indent=2) if args.json else printable(render_summary(counts)))
    elif args.by_version:
        groups = version_groups(nodes)
        if args.json:
            drift = set(drifting_names(groups))
            rows = [{**dataclasses.asdict(g), "drift": g.software in drift} for g in groups]
            print(json.dumps(rows, indent=2))
        else:
            print(printable(render_versions(nodes)))
    elif args.json:
        print(json.dumps(nodes, indent=2))
    else:
        # Node text never drives the terminal.
        print(printable(render_table(nodes, time.time())))
        for line in hubs:  # which hub answers (DESIGN 3.9)
            print(printable(line))
        print(printable(summary_line(nodes)))
    return 0


def parse_version_filter(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=VERSION`` of ``--version``."""
    name, sep, version = text.partition("=")
    return name.strip(), (version.strip() if sep else None)


def parse_label_filter(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--label``."""
    from bus.errors import InvalidInput

    name, sep, value = text.partition("=")
    if not name.strip() or not sep:
        raise InvalidInput(f"--label needs NAME=VALUE, not {text!r}")
    return name.strip(), value.strip()


def summarise_rows(nodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The counts ``--summary`` prints (as the hub's ``nodes`` summary), from node rows."""
    from hub.core.node_query import count_nodes

    return count_nodes((bool(node.get("online")), node_versions(node)) for node in nodes)


def render_summary(counts: Mapping[str, Any]) -> str:
    """``--summary`` for people: the state counts, then one line per software and its versions."""
    states = counts.get("by_state") or {}
    lines = [
        f"{counts.get('total', 0)} nodes: "
        f"{states.get('online', 0)} online, {states.get('offline', 0)} offline"
    ]
    versions = counts.get("by_version") or {}
    width = max((len(str(name)) for name in versions), default=0)
    for software, seen in versions.items():
        drift = "  DRIFT" if isinstance(seen, dict) and len(seen) > 1 else ""
        listed = ", ".join(f"{v} x{n}" for v, n in seen.items()) if isinstance(seen, dict) else "?"
        lines.append(f"  {str(software).ljust(width)}  {listed}{drift}")
    if not versions:
        lines.append("  (no versions reported)")
    return "\n".join(lines)


def node_versions(node: Mapping[str, Any]) -> dict[str, str]:
    """A node's ``{software: version}`` (agent, drivers, packages, services) from the hub's record."""
    from tui.versions import software_versions

    inventory = node.get("inventory") if isinstance(node.get("inventory"), dict) else {}
    assert isinstance(inventory, dict)  # noqa: S101 - narrowed just above

    def group(kind: str) -> dict[str, str]:
        value = inventory.get(kind)
        return value if isinstance(value, dict) else {}

    agent = node.get("agent_version")
    return software_versions(
        group("services"), group("packages"), group("drivers"), agent if isinstance(agent, str) else ""
    )


def matches(
    node: Mapping[str, Any],
    *,
    state: str | None,
    versions: Sequence[tuple[str, str | None]],
    labels: Mapping[str, str] | None = None,
    glob: str | None = None,
) -> bool:
    """Whether a node passes ``--state``, every ``--version``, every ``--label`` and ``--node``."""
    if state is not None and ("online" if node.get("online") else "offline") != state:
        return False
    if glob is not None and not fnmatch.fnmatchcase(str(node.get("node", "")), glob):
        return False
    have_labels = node.get("labels") if isinstance(node.get("labels"), dict) else {}
    assert isinstance(have_labels, dict)  # noqa: S101 - narrowed just above
    if any(have_labels.get(k) != v for k, v in (labels or {}).items()):
        return False
    have = node_versions(node)
    return all(name in have and (version is None or have[name] == version) for name, version in versions)


def version_groups(nodes: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The nodes grouped by software and version (``tui.versions.VersionGroup``)."""
    from tui.versions import group_versions

    return group_versions((str(n.get("node", "?")), bool(n.get("online")), node_versions(n)) for n in nodes)


def drifting_names(groups: Sequence[Any]) -> list[str]:
    """Software running in more than one version."""
    from tui.versions import drifting

    return drifting(groups)


def summary_line(nodes: Sequence[Mapping[str, Any]]) -> str:
    """``5 nodes: 4 online, 1 offline | drift: demo-app 2.0 x4, 1.0 x1`` (or ``no version drift``)."""
    online = sum(1 for n in nodes if n.get("online"))
    text = f"{len(nodes)} nodes: {online} online, {len(nodes) - online} offline"
    groups = version_groups(nodes)
    drift = drifting_names(groups)
    contradicted = sum(
        1 for n in nodes if isinstance(n.get("inventory"), dict) and n["inventory"].get("health_saw")
    )
    if contradicted:
        text += f" | {contradicted} reporting a version their health check contradicts"
    if not drift:
        return text + (" | no version drift" if nodes else "")
    parts = [
        name + " " + ", ".join(f"{g.version} x{len(g.nodes)}" for g in groups if g.software == name)
        for name in drift
    ]
    return text + " | drift: " + "; ".join(parts)


def render_versions(nodes: Sequence[Mapping[str, Any]], width: int = 60) -> str:
    """The drift view of ``fleet nodes --by-version``: which versions run where."""
    groups = version_groups(nodes)
    drift = set(drifting_names(groups))
    rows = [("SOFTWARE", "VERSION", "NODES", "DRIFT", "WHERE")]
    for group in groups:
        names = ", ".join(f"{n} (offline)" if n in group.offline else n for n in group.nodes)
        rows.append(
            (
                _cut(group.software, 32),
                _cut(group.version, 24),
                str(len(group.nodes)),
                "DRIFT" if group.software in drift else "-",
                "all" if len(group.nodes) == len(nodes) and not group.offline else _cut(names, width),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not groups:
        lines.append("(no versions reported)")
    lines.extend(f"MISMATCH {line}" for line in health_disagreements(nodes))
    lines.append(summary_line(nodes))
    return "\n".join(lines)


async def fetch_summary(
    config: ClientConfig, query: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """The hub's counts of the matching nodes.

    (counts, None); (None, None) from a hub that does not count (it answered with
    rows); or (None, the hub's error).
    """
    async with hub_session(config) as session:
        reply = await session.call("nodes", {**query, "summary": True, "limit": 1})
    if not reply.ok:
        return None, reply.error or "the hub refused"
    return (reply.body, None) if isinstance(reply.body, dict) else (None, None)


async def fetch_nodes(
    config: ClientConfig, hubs: list[str] | None = None, query: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Every node the hub knows that passes ``query``'s filters, page by page.

    (nodes, None) or ([], the hub's error).

    ``hubs`` (when given) receives one line saying which hub is active and which stand by.
    """
    nodes: list[dict[str, Any]] = []
    size = _PAGE
    async with hub_session(config) as session:
        for _ in range(_MAX_PAGES):
            reply = await session.call("nodes", {**(query or {}), "offset": len(nodes), "limit": size})
            kind = reply.body.get("kind") if isinstance(reply.body, dict) else None
            if not reply.ok and kind == "too_large" and size > 1:
                size = max(1, size // 4)  # big inventories: ask for fewer nodes per reply
                continue
            if not reply.ok:
                return [], reply.error or "the hub refused"
            batch = reply.body if isinstance(reply.body, list) else []
            nodes.extend(item for item in batch if isinstance(item, dict))
            if len(batch) < size:
                break
        if hubs is not None:
            hubs.append(session.hub.hubs_line())
    return nodes, None


# ---------------------------------------------------------------------- table


def ago(then: float | None, now: float) -> str:
    """``"2s ago"``, ``"5m ago"``, ``"3h ago"``, ``"2d ago"`` or ``"never"``."""
    if not then:
        return "never"
    seconds = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _cut(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _versions(node: Mapping[str, Any]) -> str:
    parts = [f"agent {node['agent_version']}"] if node.get("agent_version") else []
    inventory = node.get("inventory") or {}
    saw = _health_saw(node)
    for kind in ("services", "packages", "drivers"):
        versions = inventory.get(kind) or {}
        if isinstance(versions, dict):
            parts.extend(
                f"{name} {version}" + (f" (health saw {saw[name]})" if name in saw else "")
                for name, version in sorted(versions.items())
            )
    return ", ".join(parts) or "-"


def _health_saw(node: Mapping[str, Any]) -> dict[str, Any]:
    inventory = node.get("inventory")
    saw = inventory.get("health_saw") if isinstance(inventory, dict) else None
    return saw if isinstance(saw, dict) else {}


def health_disagreements(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """``node-3: demo-app reports 1.0, its health check saw 2.0``, one line per disagreement."""
    lines = []
    for node in nodes:
        saw = _health_saw(node)
        reported = node_versions(node) if saw else {}
        for name, seen in sorted(saw.items()):
            lines.append(
                f"{node.get('node', '?')}: {name} reports {reported.get(name, '?')}, "
                f"its health check saw {seen} answering"
            )
    return lines


def _job(job: Any) -> str:
    if not isinstance(job, dict) or not job.get("rollout"):
        return "-"
    step = job.get("step")
    # Steps are counted from 1, as people count (the wire's index is 0-based).
    return f"{str(job['rollout'])[:8]}" + (f" step {step + 1}" if isinstance(step, int) else "")


def _figure(beat: Any, key: str, fmt: str) -> str:
    if not isinstance(beat, dict) or not isinstance(beat.get(key), int | float):
        return "-"
    return fmt.format(beat[key])


def render_table(nodes: Sequence[Mapping[str, Any]], now: float) -> str:
    """The human table of ``fleet nodes``."""
    header = ("NODE", "STATE", "LAST SEEN", "LOAD", "MEM", "DISK", "LABELS", "JOB", "VERSIONS")
    rows = [header]
    for node in nodes:
        beat = node.get("heartbeat")
        labels = node.get("labels") or {}
        rows.append(
            (
                _cut(str(node.get("node", "?")), 32),
                "online" if node.get("online") else "offline",
                ago(node.get("last_seen"), now),
                _figure(beat, "load1", "{:.2f}"),
                _figure(beat, "mem_used_pct", "{:.0f}%"),
                _figure(beat, "disk_free_pct", "{:.0f}% free"),
                _cut(",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"),
                _cut(_job(node.get("job")), 24),
                _cut(_versions(node), 60),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if not nodes:
        lines.append("(no nodes known to the hub)")
    return "\n".join(lines)
