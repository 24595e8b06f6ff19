"""``fleet rollout [--broker URL] create FILE.json [--wait] | plan FILE.json | list | show ID | ...``.

Every action is one ``Request`` on the ``hub/request`` topic. ``create`` prints
only the new rollout id on stdout; with ``--wait`` it follows the retained
``rollout/{id}`` summary, prints progress to stderr and exits 0 only for
``succeeded``. ``plan`` is a dry run (``hub.plan``; ``bus.plan_view`` renders it):
it prints the plan and every online target's pre-flight, starts nothing, and
exits 0 only when the plan looks good. Exit codes: 0 ok, 1 refused or failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bus.display import printable
from bus.errors import reply_exit_code
from bus.rpc import fetch_show
from cli.nodes import add_client_arguments, ago, client_config, hub_session
from cli.options import env_default

if TYPE_CHECKING:
    from bus.messages import Reply, RolloutSpec, RolloutSummary
    from cli.nodes import HubSession

#: States after which a rollout does nothing more on its own.
FINAL_STATES = frozenset({"succeeded", "rolled_back", "rollback_failed", "aborted", "halted"})
_ID_ACTIONS = {
    "show": "show one rollout",
    "abort": "abort: coordinated rollback of every touched node",
    "rollback": "roll back a finished rollout",
    "pause": "pause: no new commands",
    "resume": "resume a paused rollout",
}


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    add_client_arguments(parser)
    sub = parser.add_subparsers(dest="rollout_command", metavar="ACTION")
    sub.required = True
    create = sub.add_parser("create", help="start a rollout from a RolloutSpec JSON file ('-' for stdin)")
    create.add_argument("file", help="RolloutSpec JSON file, or - for stdin")
    create.add_argument(
        "--wait", action="store_true", help="wait for a final state; exit 0 only for succeeded"
    )
    # argparse converts a string default with `type`, so a bad FLEET_TIMEOUT is a usage error.
    create.add_argument(
        "--timeout",
        type=float,
        default=env_default("FLEET_TIMEOUT", "86400"),
        metavar="S",
        help="with --wait: give up after S seconds, exit 1 (FLEET_TIMEOUT; default 1 day)",
    )
    create.add_argument(
        "--idempotency-key",
        default=env_default("FLEET_IDEMPOTENCY_KEY"),
        metavar="KEY",
        help="the same key again returns the same rollout instead of starting a second one "
        "(FLEET_IDEMPOTENCY_KEY; overrides the file's idempotency_key)",
    )
    add_client_arguments(create, suppress=True)
    planning = sub.add_parser(
        "plan", help="dry run: targets, waves, timing and every online target's pre-flight; starts nothing"
    )
    planning.add_argument("file", help="RolloutSpec JSON file, or - for stdin")
    planning.add_argument("--json", action="store_true", help="print the plan as JSON (as the plan op)")
    planning.add_argument(
        "--preflight-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="wait at most S seconds for the nodes' pre-flight answers (default 10)",
    )
    planning.add_argument("--no-preflight", action="store_true", help="do not ask the nodes")
    add_client_arguments(planning, suppress=True)
    listing = sub.add_parser("list", help="every rollout the hub knows")
    listing.add_argument("--json", action="store_true", help="print the JSON list (as GET /api/rollouts)")
    add_client_arguments(listing, suppress=True)
    for action, help_text in _ID_ACTIONS.items():
        one = sub.add_parser(action, help=help_text)
        one.add_argument("rollout", metavar="ID", help="rollout id")
        if action == "show":
            one.add_argument("--json", action="store_true", help="print the JSON summary")
        add_client_arguments(one, suppress=True)


def run(args: argparse.Namespace) -> int:
    """Carry out one rollout action."""
    config = client_config(args)
    if args.rollout_command == "create":
        spec = read_spec(args.file)
        if args.idempotency_key:
            spec = with_key(spec, args.idempotency_key)
        return asyncio.run(_create(config, spec, wait=args.wait, timeout=args.timeout))
    if args.rollout_command == "plan":
        spec = read_spec(args.file)
        return asyncio.run(
            _plan(config, spec, timeout=args.preflight_timeout, ask=not args.no_preflight, as_json=args.json)
        )
    if args.rollout_command == "list":
        return asyncio.run(_list(config, as_json=args.json))
    as_json = getattr(args, "json", False)
    return asyncio.run(_by_id(config, args.rollout_command, args.rollout, as_json=as_json))


def read_spec(file: str) -> RolloutSpec:
    """Read and validate a RolloutSpec file; InvalidInput (exit 2) naming the field otherwise."""
    from bus.errors import InvalidInput
    from bus.messages import RolloutSpec, decode

    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {file}: {exc}") from exc
    try:
        json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{file}: not valid JSON: {exc}") from exc
    try:
        return decode(RolloutSpec, text)
    except InvalidInput as exc:
        raise InvalidInput(f"{file}: {exc.reason}") from exc


def with_key(spec: RolloutSpec, key: str) -> RolloutSpec:
    """The spec with ``idempotency_key`` set; InvalidInput (exit 2) for a key the hub would refuse."""
    from pydantic import ValidationError

    from bus.errors import InvalidInput
    from bus.messages import RolloutSpec, describe

    data = {**spec.model_dump(mode="json", exclude_unset=True), "idempotency_key": key}
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"--idempotency-key: {describe(exc, data)}") from exc


def _failed(reply: Reply) -> int:
    """Report a refused request in one line; its exit code from the error table (2 for bad input)."""
    body = reply.body if isinstance(reply.body, Mapping) else {}
    error = reply.error or "the hub refused"
    nodes = body.get("nodes")
    if isinstance(nodes, list) and nodes and not all(str(n) in error for n in nodes):
        error += f" (nodes: {', '.join(str(n) for n in nodes)})"
    print(f"fleet rollout: {printable(error)}", file=sys.stderr)
    return reply_exit_code(body.get("kind"))


async def _create(config: Any, spec: RolloutSpec, *, wait: bool, timeout: float) -> int:
    async with hub_session(config) as session:
        reply = await session.call("create_rollout", spec.model_dump(mode="json", exclude_unset=True))
        if not reply.ok:
            return _failed(reply)
        body = reply.body if isinstance(reply.body, Mapping) else {}
        rollout = body.get("rollout")
        if not isinstance(rollout, str):
            print(f"fleet rollout: no rollout id in the hub's reply: {reply.body!r:.200}", file=sys.stderr)
            return 1
        print(printable(rollout), flush=True)
        if body.get("existing"):
            print(
                f"fleet rollout: {rollout} was started earlier with this idempotency key: "
                "nothing new started",
                file=sys.stderr,
                flush=True,
            )
        if not wait:
            return 0
        return await _wait(session, rollout, timeout)


async def _plan(config: Any, spec: RolloutSpec, *, timeout: float, ask: bool, as_json: bool) -> int:
    """Print the hub's plan; exit 0 when it looks good, 1 when it would fail."""
    from bus.errors import InvalidInput
    from bus.plan_view import MAX_PREFLIGHT_TIMEOUT_S, plan_lines

    if not 0 < timeout <= MAX_PREFLIGHT_TIMEOUT_S:
        raise InvalidInput(f"--preflight-timeout must be above 0 and at most {MAX_PREFLIGHT_TIMEOUT_S:g}")
    body = {
        "spec": spec.model_dump(mode="json", exclude_unset=True),
        "preflight_timeout_s": timeout,
        "preflight": ask,
    }
    async with hub_session(config) as session:
        session.timeout = max(session.timeout, timeout + 10.0)
        reply = await session.call("plan", body)
    if not reply.ok:
        return _failed(reply)
    plan = reply.body if isinstance(reply.body, Mapping) else {}
    if as_json:
        print(json.dumps(plan, indent=2))
    else:
        print(printable("\n".join(plan_lines(plan))))
    return 0 if plan.get("ok") else 1


async def _wait(session: HubSession, rollout: str, timeout: float) -> int:
    """Follow the retained summary until a final state; 0 only for succeeded."""
    from bus.errors import InvalidInput
    from bus.messages import RolloutSummary, decode

    topic = session.topics.rollout(rollout)
    await session.client.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout
    last: tuple[Any, ...] | None = None
    state = "unknown"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"fleet rollout: gave up after {timeout:g} s; {rollout} is {state}", file=sys.stderr)
            return 1
        try:
            message = await asyncio.wait_for(session.other.get(), remaining)
        except asyncio.TimeoutError:
            continue
        if message.topic != topic or not message.payload:
            continue
        try:
            summary = decode(RolloutSummary, message.payload)
        except InvalidInput:
            continue
        state = summary.state
        seen = (summary.state, summary.wave, summary.counts, summary.detail)
        if seen != last:
            last = seen
            print(printable(progress_line(summary)), file=sys.stderr, flush=True)
        if summary.state in FINAL_STATES:
            return 0 if summary.state == "succeeded" else 1


def progress_line(summary: RolloutSummary) -> str:
    """One line of ``--wait`` progress."""
    c = summary.counts
    wave = f" wave {summary.wave}/{summary.waves}" if summary.waves else ""
    detail = f" - {summary.detail}" if summary.detail else ""
    extra = "".join(
        f", {count} {label}"
        for count, label in (
            (c.rollback_failed, "not restored"),
            (c.lost, "lost"),
            (c.not_started, "not started"),
        )
        if count
    )
    return (
        f"rollout {summary.id[:8]} {summary.state}{wave}: {c.succeeded} succeeded, {c.running} running, "
        f"{c.failed} failed, {c.rolled_back} rolled back, {c.pending} pending{extra}{detail}"
    )


async def _list(config: Any, *, as_json: bool) -> int:
    async with hub_session(config) as session:
        reply = await session.call("list", {})
    if not reply.ok:
        return _failed(reply)
    items = reply.body if isinstance(reply.body, list) else []
    if as_json:
        print(json.dumps(items, indent=2))
    else:
        print(printable(render_list([i for i in items if isinstance(i, Mapping)], time.time())))
    return 0


async def _by_id(config: Any, op: str, rollout: str, *, as_json: bool) -> int:
    async with hub_session(config) as session:
        if op == "show":
            reply = await fetch_show(session.call, rollout)
        else:
            reply = await session.call(op, {"rollout": rollout})
    if not reply.ok:
        return _failed(reply)
    if op == "show":
        if as_json:
            print(json.dumps(reply.body, indent=2))
        else:
            print(printable(render_show(reply.body if isinstance(reply.body, Mapping) else {}, time.time())))
        return 0
    body = reply.body if isinstance(reply.body, Mapping) else {}
    state = body.get("state")
    now = f", now {state}" if isinstance(state, str) else ""
    print(printable(f"rollout {rollout}: {op} accepted{now}"))
    return 0


# ---------------------------------------------------------------------- rendering


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _counts(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    counts = summary.get("counts")
    return counts if isinstance(counts, Mapping) else {}


def render_list(summaries: list[Mapping[str, Any]], now: float) -> str:
    """The human table of ``fleet rollout list``."""
    # FAILED counts every node that failed, restored or not; NOT RESTORED the nodes whose
    # restore failed or could not be verified (DESIGN 3.11).
    rows: list[tuple[str, ...]] = [
        ("ID", "NAME", "STATE", "OK/NODES", "FAILED", "ROLLED BACK", "NOT RESTORED", "UPDATED")
    ]
    for s in summaries:
        counts = _counts(s)
        nodes = s.get("nodes")
        total = (
            len(nodes)
            if isinstance(nodes, Mapping)
            else sum(int(v) for v in counts.values() if isinstance(v, int))
        )
        rows.append(
            (
                str(s.get("id", "?")),
                str(s.get("name", ""))[:40],
                str(s.get("state", "?")),
                f"{counts.get('succeeded', 0)}/{total}",
                str(counts.get("failed", 0)),
                str(counts.get("rolled_back", 0)),
                str(counts.get("rollback_failed", 0)),
                ago(s.get("updated_at") if isinstance(s.get("updated_at"), int | float) else None, now),
            )
        )
    lines = _columns(rows)
    if not summaries:
        lines.append("(no rollouts)")
    return "\n".join(lines)


def render_show(body: Mapping[str, Any], now: float) -> str:
    """The human view of ``fleet rollout show``: header, node table, latest audit entries."""
    summary = body.get("summary") if isinstance(body.get("summary"), Mapping) else body
    assert isinstance(summary, Mapping)  # noqa: S101 - narrowed above
    counts = _counts(summary)
    wave = f"  wave {summary.get('wave')}/{summary.get('waves')}" if summary.get("waves") else ""
    lines = [
        f"rollout {summary.get('id', '?')}  {summary.get('name', '')}",
        f"state   {summary.get('state', '?')}{wave}",
        "counts  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()),
    ]
    updated = summary.get("updated_at")
    if isinstance(updated, int | float):
        lines.append(f"updated {ago(updated, now)}")
    if summary.get("detail"):
        lines.append(f"detail  {summary['detail']}")
    nodes = summary.get("nodes")
    if isinstance(nodes, Mapping) and nodes:
        rows: list[tuple[str, ...]] = [("NODE", "PHASE", "STEP", "DETAIL")]
        for name, info in sorted(nodes.items()):
            info = info if isinstance(info, Mapping) else {}
            step = info.get("step")
            # The wire's step index is 0-based; people count from 1 (DESIGN 3.11).
            shown = str(step + 1) if isinstance(step, int) else "-"
            rows.append((str(name), str(info.get("phase", "?")), shown, str(info.get("detail", ""))[:80]))
        lines += ["", *_columns(rows)]
    lines += render_grid(body.get("steps"))
    audit = body.get("audit")
    if isinstance(audit, list) and audit:
        lines += ["", "audit (latest last):"]
        for entry in audit[-20:]:
            if isinstance(entry, Mapping):
                when = entry.get("ts")
                text = entry.get("message") or entry.get("event") or entry.get("kind") or json.dumps(entry)
                lines.append(f"  {ago(when, now) if isinstance(when, int | float) else '':>8}  {text}")
    return "\n".join(lines)


_CELL = {"pending": "-", "running": "run", "succeeded": "ok", "failed": "FAIL", "rolled_back": "undone",
         "skipped": "skip", "rejected": "REJECTED", "deferred": "defer", "not_started": "."}  # fmt: skip


def render_grid(steps: object) -> list[str]:
    """The step grid of ``show`` (the hub's record, steps numbered from 1), then each failure's reason."""
    if not isinstance(steps, Mapping) or not steps:
        return []
    grids = {str(n): g for n, g in steps.items() if isinstance(g, list)}
    first = next(iter(grids.values()), [])
    header = ["NODE", *(f"{c.get('index', i) + 1}.{c.get('type', '?')}" for i, c in enumerate(first))]
    rows: list[tuple[str, ...]] = [tuple(header)]
    reasons: list[str] = []
    for name, grid in sorted(grids.items()):
        cells = [c for c in grid if isinstance(c, Mapping)]
        rows.append((name, *(_CELL.get(str(c.get("state")), str(c.get("state"))) for c in cells)))
        for c in cells:
            if c.get("state") in ("failed", "rejected") and c.get("detail"):
                number = int(c.get("index", 0)) + 1
                reasons.append(f"  {name} step {number} ({c.get('type')}) {c.get('state')}: {c['detail']}")
    return ["", "steps:", *_columns(rows), *reasons]
