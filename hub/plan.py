"""Plan a rollout before acting: targets, waves, timing, and a pre-flight on every online target.

``fleet rollout plan FILE``, the ``plan`` request op, ``POST
/api/updates?dry_run=true`` and the TUI's preview all come here and get the
same answer (``Planner.plan``): a JSON object labelled ``"kind": "plan"``,
``"dry_run": true``, that

- resolves the targets as ``create_rollout`` would (unknown ones named,
  offline ones flagged, nodes busy in another rollout named),
- splits them into waves exactly as the engine will (``bus.waves``), with a
  worst-case timing estimate from the step timeouts, ``max_parallel`` and
  ``soak_s``,
- asks every online target to run the plan's pre-flight
  (``edge_agent.preflight``: package simulation, free disk against the
  downloads, artifact URLs, scripts present and allowed, services known)
  and collects each node's answer, so a plan that would fail says so per
  node before anything starts,
- says ``"ok": false`` with every ``problems`` entry when ``create_rollout``
  would be refused or a node's pre-flight failed.

Pre-flight commands are signed like every command, carry a ``plan-`` id in
their ``rollout`` field, and are published *unretained* on the node's ``cmd``
topic (the retained command stays what it was); answers come back as
``StepStatus`` on the node's ``status`` topic, which the hub reads anyway and
which is not retained, so a plan never touches the retained job snapshots
the hub rebuilds from after a restart. A node that does not answer within
``preflight_timeout_s`` is named (an agent older than the ``preflight``
action rejects the command: named too).

``build_draft``, ``estimate`` and ``plan_lines`` are pure; ``Planner`` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from bus import params
from bus.errors import BusError, InvalidInput
from bus.messages import PLAN_PREFIX, Command, RolloutSpec, StepStatus, describe, encode, new_id
from bus.pace import projected_waves
from bus.signing import sign_command
from bus.topics import Topics
from bus.waves import plan_waves
from hub.core.windows import schedule_of

__all__ = [
    "DEFAULT_PREFLIGHT_TIMEOUT_S",
    "PLAN_PREFIX",
    "Draft",
    "Planner",
    "build_draft",
    "estimate",
    "labels_from",
    "plan_lines",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_PREFLIGHT_TIMEOUT_S = 10.0
MAX_PREFLIGHT_TIMEOUT_S = 120.0
#: Nodes listed with every check (beyond this, only the nodes with findings are detailed).
_DETAILED_NODES = 20
_CHECKS_PER_NODE = 70
#: Beyond this many asked nodes, nodes that passed every check are counted, not listed.
_PASSED_LISTED = 200
_LISTED = 50
#: How many targets the plan shows per-node parameters for (every target is checked).
_SHOWN_PARAMETER_NODES = 20
NOTICE = "PLAN ONLY (dry run): nothing was started, nothing on any node was changed"


# ---------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Draft:
    """A spec resolved against the fleet, before any node was asked."""

    spec: RolloutSpec
    targets: list[str]
    unknown: list[str]
    offline: list[str]
    busy: list[str]
    waves: list[list[str]]

    @property
    def asked(self) -> list[str]:
        """The targets a pre-flight goes to: every online one."""
        offline = set(self.offline)
        return [node for node in self.targets if node not in offline]


def build_draft(
    spec: RolloutSpec,
    known: Sequence[str],
    unknown: Sequence[str],
    online: Callable[[str], bool],
    busy: Sequence[str],
) -> Draft:
    """Resolve targets and waves as ``create_rollout`` and the engine will."""
    targets = list(known)
    adaptive = spec.strategy.adaptive
    if not targets:
        waves: list[list[str]] = []
    elif adaptive is not None:
        waves = projected_waves(targets, adaptive)  # the fastest it can go: every wave clean
    else:
        waves = plan_waves(targets, spec.strategy.waves)
    return Draft(
        spec=spec,
        targets=targets,
        unknown=list(unknown),
        offline=[node for node in targets if not online(node)],
        busy=list(busy),
        waves=waves,
    )


def estimate(spec: RolloutSpec, wave_sizes: Sequence[int]) -> dict[str, Any]:
    """A worst-case duration: each node takes its steps' timeouts (capped by ``node_timeout_s``).

    A wave runs in ``ceil(size / max_parallel)`` rounds and then soaks ``soak_s``.
    """
    node_s = 0.0
    for step in spec.plan:
        timeout = step.timeout_s or spec.step_timeout_s
        retries = getattr(step, "retries", 1)
        interval = getattr(step, "interval_s", 0.0)
        node_s += timeout if step.type != "health" else retries * timeout + (retries - 1) * interval
    node_s = min(node_s, spec.node_timeout_s)
    per_wave = []
    total = 0.0
    parallel = spec.strategy.max_parallel
    for number, size in enumerate(wave_sizes, 1):
        rounds = math.ceil(size / parallel) if parallel else 1
        seconds = rounds * node_s + spec.strategy.soak_s
        total += seconds
        per_wave.append({"wave": number, "nodes": size, "rounds": rounds, "worst_case_s": seconds})
    return {
        "basis": "step timeouts (health: retries x timeout + intervals), capped by node_timeout_s; "
        "rounds of max_parallel; soak_s per wave",
        "node_worst_case_s": node_s,
        "worst_case_s": total,
        "waves": per_wave,
    }


def _listed(names: Sequence[str]) -> str:
    more = f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def labels_from(registry: object) -> Callable[[str], Mapping[str, str]]:
    """A node's labels from a registry with ``get(node)`` (``hub.core.registry.Registry``), else none."""
    get = getattr(registry, "get", None)

    def labels(node: str) -> Mapping[str, str]:
        info = get(node) if callable(get) else None
        found = getattr(info, "labels", None)
        return found if isinstance(found, Mapping) else {}

    return labels


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(body: Mapping[str, Any], limit: int = 12) -> list[str]:
    """The plan as short lines of text (``fleet rollout plan``, the TUI); always labelled a plan."""
    lines = [f"PLAN (dry run) of {body.get('name', '?')!s}: nothing was started"]
    targets = body.get("targets") or []
    offline, unknown, busy = body.get("offline") or [], body.get("unknown") or [], body.get("busy") or []
    lines.append(
        f"targets   {len(targets)} node(s)"
        + (f", {len(offline)} offline" if offline else "")
        + (f", {len(unknown)} unknown" if unknown else "")
        + (f", {len(busy)} busy" if busy else "")
    )
    timing = body.get("estimate") or {}
    waves = body.get("waves") or []
    if isinstance(timing, Mapping) and "worst_case_s" in timing:
        lines.append(f"timing    {len(waves)} wave(s), at most {_duration(float(timing['worst_case_s']))}")
    for extra in body.get("schedule_lines") or []:
        lines.append(str(extra))
    for number, wave in enumerate(waves[:limit], start=1):
        shown = ", ".join(f"{n} (offline)" if n in offline else str(n) for n in wave[:8])
        more = f" +{len(wave) - 8} more" if len(wave) > 8 else ""
        lines.append(f"wave {number:<4} {len(wave)}: {shown}{more}")
    if len(waves) > limit:
        lines.append(f"... {len(waves) - limit} more wave(s)")
    parameters = body.get("parameters") or {}
    if isinstance(parameters, Mapping):
        for node, values in list(parameters.items())[:limit]:
            if isinstance(values, Mapping):
                for field_name, value in values.items():
                    lines.append(f"params    {node}: {field_name} = {value}")
    pre = body.get("preflight") or {}
    if isinstance(pre, Mapping) and pre:
        lines.append(
            f"preflight {pre.get('passed', 0)} passed, {pre.get('failed', 0)} failed, "
            f"{pre.get('unanswered', 0)} did not answer (of {pre.get('asked', 0)} online)"
        )
        nodes = pre.get("nodes") or {}
        for node, info in list(nodes.items())[: limit * 2]:
            if not isinstance(info, Mapping) or info.get("state") == "passed":
                continue
            lines.append(f"  {node}: {info.get('state')}: {info.get('detail', '')}")
    lines.extend(f"! {problem}" for problem in body.get("problems") or [])
    lines.extend(f"~ {warning}" for warning in body.get("warnings") or [])
    lines.append("verdict   " + ("looks good: create it to start" if body.get("ok") else "would fail: see !"))
    return lines


# ---------------------------------------------------------------------- collecting answers


@dataclass
class _Answer:
    command: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    state: str | None = None  # passed, failed, rejected; None: no verdict yet
    detail: str = ""


@dataclass
class _Round:
    answers: dict[str, _Answer]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    left: int = 0


Publish = Callable[..., Awaitable[None]]


class Planner:
    """Answers the ``plan`` op (see the module docstring).

    Args:
        topics: the topic prefix in use.
        publish: the hub's publish (pre-flight commands go out unretained).
        resolve: ``Registry.resolve``: (known nodes, unknown names) of a spec's targets.
        is_online: ``Registry.is_online``.
        busy: the engine's ``busy``: those of some nodes another rollout holds.
        signing_key: the hub's key; pre-flight commands are signed like every command.
        clock: wall-clock seconds.
        labels: a node's labels (its ``tz`` label places its maintenance windows).
        offline_grace_s: the hub's default ``offline_grace_s`` (3 heartbeats plus the
            keepalive), shown for a spec that leaves it unset.
    """

    def __init__(
        self,
        *,
        topics: Topics,
        publish: Publish,
        resolve: Callable[[Any], tuple[list[str], list[str]]],
        is_online: Callable[[str], bool],
        busy: Callable[[Sequence[str]], list[str]],
        signing_key: Ed25519PrivateKey,
        clock: Callable[[], float],
        new_id: Callable[[], str] = new_id,
        labels: Callable[[str], Mapping[str, str]] | None = None,
        offline_grace_s: float = 25.0,
    ) -> None:
        self._topics = topics
        self._publish = publish
        self._resolve = resolve
        self._is_online = is_online
        self._busy = busy
        self._key = signing_key
        self._clock = clock
        self._new_id = new_id
        self._labels = labels or (lambda _node: {})
        self._offline_grace = offline_grace_s
        self._rounds: dict[str, _Round] = {}

    # ------------------------------------------------------------------ answers from nodes

    def take(self, node: str, status: StepStatus) -> bool:
        """Fold a ``StepStatus``; True when it belonged to a pre-flight (the engine must not see it)."""
        if not status.rollout.startswith(PLAN_PREFIX):
            return False
        found = self._rounds.get(status.rollout)
        answer = found.answers.get(node) if found is not None else None
        if found is None or answer is None or answer.command != status.command or answer.state is not None:
            return True  # late, foreign or repeated: a plan's answers change nothing else
        if status.state == "rejected":
            answer.state, answer.detail = "rejected", f"rejected the pre-flight: {status.detail}"
        elif status.index == -1 and status.type == "preflight":
            answer.state = "passed" if status.state == "succeeded" else "failed"
            answer.detail = status.detail
        else:
            if len(answer.checks) < _CHECKS_PER_NODE:
                check = {"index": status.index, "type": status.type, "state": status.state}
                answer.checks.append({**check, "detail": status.detail})
            return True
        found.left -= 1
        if found.left <= 0:
            found.done.set()
        return True

    # ------------------------------------------------------------------ the op

    async def plan(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one ``plan`` request.

        Args:
            body: a RolloutSpec, or ``{"spec": RolloutSpec, "preflight_timeout_s": S,
                "preflight": false}`` (``preflight: false`` skips asking the nodes).

        Returns:
            The plan (see the module docstring), as JSON values.

        Raises:
            InvalidInput: a bad spec or option (the message names the field).
        """
        spec, timeout, ask = _parse(body)
        known, unknown = self._resolve(spec.targets)
        draft = build_draft(spec, known, unknown, self._is_online, self._busy(known))
        result = self._skeleton(draft)
        self._timing(draft, result)
        self._parameters(draft, result)
        if ask and draft.asked:
            result["preflight"] = await self._preflight(draft, timeout)
        else:
            result["preflight"] = {
                "timeout_s": timeout,
                "asked": 0,
                "passed": 0,
                "failed": 0,
                "unanswered": 0,
                "nodes": {},
                "skipped": "not asked" if not ask else "no online target",
            }
        self._judge(draft, result)
        return result

    def _skeleton(self, draft: Draft) -> dict[str, Any]:
        spec = draft.spec
        return {
            "kind": "plan",
            "dry_run": True,
            "notice": NOTICE,
            "name": spec.name,
            "ok": True,
            "problems": [],
            "warnings": [],
            "targets": draft.targets,
            "unknown": draft.unknown,
            "offline": draft.offline,
            "busy": draft.busy,
            "waves": draft.waves,
            "estimate": estimate(spec, [len(w) for w in draft.waves]),
            "spec": spec.model_dump(mode="json"),
        }

    def _parameters(self, draft: Draft, result: dict[str, Any]) -> None:
        """Per-node parameters (DESIGN 3.10) as each target will run them, and who lacks a label.

        ``parameters``: {node: {"step N (type) FIELD": resolved value}} for the first
        ``_SHOWN_PARAMETER_NODES`` targets; a target lacking a named label is a problem.
        """
        templated = [
            (number, step.type, step.model_dump(mode="json"))
            for number, step in enumerate(draft.spec.plan, 1)
        ]
        templated = [
            (n, kind, data) for n, kind, data in templated if any(True for _ in params.variables(data))
        ]
        if not templated:
            return
        shown: dict[str, dict[str, str]] = {}
        for node in draft.targets:
            values: dict[str, str] = {}
            for number, kind, data in templated:
                try:
                    resolved = params.resolve(data, node, self._labels(node))
                except InvalidInput as exc:
                    result["problems"].append(f"{node}: plan step {number} ({kind}) {exc.reason}")
                    continue
                for key, value in data.items():
                    if any(True for _ in params.variables(value)):
                        values[f"step {number} ({kind}) {key}"] = (
                            resolved[key] if isinstance(resolved[key], str) else json.dumps(resolved[key])
                        )
            if len(shown) < _SHOWN_PARAMETER_NODES:
                shown[node] = values
        result["parameters"] = shown

    def _timing(self, draft: Draft, result: dict[str, Any]) -> None:
        """Maintenance windows per zone, deferral and start deadline: when the nodes may start."""
        spec = draft.spec
        lines: list[str] = []
        schedule = schedule_of(spec)  # InvalidInput names a bad cron or zone
        if schedule is not None:
            now = self._clock()
            zones: dict[str, dict[str, Any]] = {}
            for node in draft.targets:
                tz = self._labels(node).get("tz")
                zone = schedule.zone(tz).key
                entry = zones.get(zone)
                if entry is None:
                    is_open, when = schedule.state(tz, now)
                    entry = zones[zone] = {
                        "nodes": 0,
                        "open_now": is_open,
                        "next_open": when,
                        "next_open_local": schedule.describe(tz, when) if when is not None else None,
                    }
                entry["nodes"] += 1
            result["schedule"] = {
                "windows": [w.model_dump(mode="json") for w in spec.windows],
                "on_window_end": spec.on_window_end,
                "zones": zones,
            }
            starts = [z["next_open"] for z in zones.values() if z["next_open"] is not None]
            if starts:
                result["estimate"]["earliest_start"] = min(starts)
                result["estimate"]["starts_in_s"] = max(0.0, min(starts) - now)
            for zone, entry in sorted(zones.items()):
                if entry["open_now"]:
                    said = "open now"
                elif entry["next_open"] is not None:
                    said = f"opens {entry['next_open_local']} (in {_duration(entry['next_open'] - now)})"
                else:
                    said = "never opens"
                count = entry["nodes"]
                lines.append(f"window    {zone}: {said} for {count} node(s); {spec.on_window_end} at its end")
            if not starts:
                result["problems"].append("no maintenance window ever opens for these targets")
        if spec.max_defer_s:
            lines.append(f"defer     a node whose update lock is held may wait {_duration(spec.max_defer_s)}")
        if spec.start_deadline_s is not None:
            lines.append(
                f"deadline  a node not started {_duration(spec.start_deadline_s)} after its command is "
                "not_started (not failed)"
            )
        grace = self._offline_grace if spec.offline_grace_s is None else spec.offline_grace_s
        said = " (default: 3 heartbeats + keepalive)" if spec.offline_grace_s is None else ""
        result["offline_grace_s"] = grace
        lines.append(
            f"offline   a node offline mid-job is lost, not failed, for {_duration(grace)}{said}; "
            f"a rollback waits {_duration(spec.restore_timeout_s)} for an offline node's restore"
        )
        result["schedule_lines"] = lines

    async def _preflight(self, draft: Draft, timeout: float) -> dict[str, Any]:
        plan_id = f"{PLAN_PREFIX}{self._new_id()}"
        now = self._clock()
        commands = {
            node: Command(
                id=self._new_id(),
                node=node,
                rollout=plan_id,
                action="preflight",
                issued_at=now,
                expires_at=now + timeout + 5.0,
                plan=list(draft.spec.plan),
            )
            for node in draft.asked
        }
        found = _Round({node: _Answer(command.id) for node, command in commands.items()}, left=len(commands))
        self._rounds[plan_id] = found
        try:
            for node, command in commands.items():
                signed = sign_command(command, self._key)
                try:
                    # Not retained: the node's retained command (a running rollout's) stays.
                    await self._publish(self._topics.node(node, "cmd"), encode(signed), qos=1, retain=False)
                except BusError as exc:
                    found.answers[node].state = "unsent"
                    found.answers[node].detail = f"not sent: {exc.reason}"
                    found.left -= 1
            if found.left > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(found.done.wait(), timeout)
        finally:
            del self._rounds[plan_id]
        return self._collected(found, timeout, len(draft.asked))

    @staticmethod
    def _collected(found: _Round, timeout: float, asked: int) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        counts = {"passed": 0, "failed": 0, "unanswered": 0}
        detailed = asked <= _DETAILED_NODES
        for node, answer in found.answers.items():
            state = answer.state or "no_answer"
            detail = answer.detail or (
                f"no pre-flight answer within {timeout:g} s" if answer.state is None else ""
            )
            key = "passed" if state == "passed" else "failed" if state == "failed" else "unanswered"
            counts[key] += 1
            findings = [c for c in answer.checks if c["state"] != "succeeded"]
            if state == "passed" and not findings and asked > _PASSED_LISTED:
                continue  # a big fleet: clean nodes are counted, not listed (replies are size-bounded)
            entry: dict[str, Any] = {"state": state, "detail": detail}
            if detailed:
                entry["checks"] = answer.checks
            elif findings:
                entry["checks"] = findings
            nodes[node] = entry
        listed = "every node" if asked <= _PASSED_LISTED else "nodes with findings (clean ones are counted)"
        return {"timeout_s": timeout, "asked": asked, **counts, "listed": listed, "nodes": nodes}

    @staticmethod
    def _judge(draft: Draft, result: dict[str, Any]) -> None:
        problems: list[str] = result["problems"]
        warnings: list[str] = result["warnings"]
        spec = draft.spec
        if draft.unknown:
            problems.append(f"unknown targets: {_listed(draft.unknown)}")
        if not draft.targets and not draft.unknown:
            problems.append("the targets match no known node")
        if draft.offline:
            if spec.require_online:
                problems.append(
                    f"offline targets: {_listed(draft.offline)} (set require_online false to queue them)"
                )
            else:
                queued = _listed(draft.offline)
                warnings.append(f"offline targets get their command when they return: {queued}")
        if draft.busy:
            problems.append(f"busy in another rollout: {_listed(draft.busy)}")
        if spec.strategy.adaptive is not None:
            warnings.append(
                "adaptive pace: the waves shown are the fastest case (every wave clean); failures "
                "shrink or hold the next wave"
            )
        nodes = result["preflight"].get("nodes", {})
        bad = {n: i for n, i in nodes.items() if i["state"] != "passed"}
        for node, info in list(bad.items())[:_LISTED]:
            problems.append(f"{node}: pre-flight {info['state']}: {info['detail']}")
        if len(bad) > _LISTED:
            problems.append(f"+{len(bad) - _LISTED} more nodes whose pre-flight did not pass")
        skipped = sum(
            1 for info in nodes.values() for check in info.get("checks", []) if check["state"] == "skipped"
        )
        if skipped:
            warnings.append(f"{skipped} check(s) could not be decided before the update (see each node)")
        result["ok"] = not problems


def _parse(body: Mapping[str, Any]) -> tuple[RolloutSpec, float, bool]:
    """(spec, pre-flight timeout, whether to ask the nodes) of a ``plan`` body."""
    if not isinstance(body, Mapping):
        raise InvalidInput("a plan request takes a RolloutSpec")
    data: Any = body
    timeout: Any = DEFAULT_PREFLIGHT_TIMEOUT_S
    ask: Any = True
    if "spec" in body:
        extra = set(body) - {"spec", "preflight_timeout_s", "preflight"}
        if extra:
            raise InvalidInput(f"unknown plan option(s): {', '.join(sorted(extra))[:120]}")
        data = body["spec"]
        timeout = body.get("preflight_timeout_s", timeout)
        ask = body.get("preflight", True)
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not is_number or not 0 < timeout <= MAX_PREFLIGHT_TIMEOUT_S:
        raise InvalidInput(f"preflight_timeout_s must be above 0 and at most {MAX_PREFLIGHT_TIMEOUT_S:g}")
    if not isinstance(ask, bool):
        raise InvalidInput("preflight must be true or false")
    try:
        spec = RolloutSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid rollout spec: {describe(exc, data)}") from exc
    return spec, float(timeout), ask
