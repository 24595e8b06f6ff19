"""The pure half of a plan (``hub.plan``): targets and waves, timing, parameters, the verdict.

Everything a plan says that needs no node to answer is computed here from
values: the spec, the resolved targets, who is online, the nodes' labels and
the time, given as arguments. ``hub.plan.Planner`` asks the nodes for their
pre-flight and calls these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bus import params
from bus.messages import RolloutSpec
from bus.pace import planned_waves
from bus.plan_view import NOTICE, duration
from hub.core.windows import schedule_of

__all__ = [
    "Answer",
    "Draft",
    "LabelSource",
    "Labelled",
    "add_parameters",
    "add_timing",
    "build_draft",
    "collected",
    "estimate",
    "judge",
    "labels_from",
    "skeleton",
]

#: Nodes listed with every check (beyond this, only the nodes with findings are detailed).
_DETAILED_NODES = 20
#: Beyond this many asked nodes, nodes that passed every check are counted, not listed.
_PASSED_LISTED = 200
_LISTED = 50
#: How many targets the plan shows per-node parameters for (every target is checked).
_SHOWN_PARAMETER_NODES = 20


class Labelled(Protocol):
    """A node as a registry knows it: its labels."""

    @property
    def labels(self) -> Mapping[str, str]:
        """The node's labels (its ``tz`` label places its maintenance windows)."""


class LabelSource(Protocol):
    """What a plan needs of ``hub.core.registry.Registry``: a node by name."""

    def get(self, node: str) -> Labelled | None:
        """The node, or None when unknown."""


def labels_from(registry: LabelSource) -> Callable[[str], Mapping[str, str]]:
    """A node's labels from a registry (an unknown node has none)."""

    def labels(node: str) -> Mapping[str, str]:
        info = registry.get(node)
        return info.labels if info is not None else {}

    return labels


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
    return Draft(
        spec=spec,
        targets=targets,
        unknown=list(unknown),
        offline=[node for node in targets if not online(node)],
        busy=list(busy),
        waves=planned_waves(targets, spec.strategy),
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


def skeleton(draft: Draft) -> dict[str, Any]:
    """The plan before timing, parameters and pre-flight are added."""
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


def add_parameters(draft: Draft, result: dict[str, Any], labels: Callable[[str], Mapping[str, str]]) -> None:
    """Per-node parameters (DESIGN 3.10) as each target will run them, and who lacks a label.

    ``parameters``: {node: {"step N (type) FIELD": resolved value}} for the first
    ``_SHOWN_PARAMETER_NODES`` targets; a target lacking a named label is a problem
    (``bus.params.lacking_labels``, the check ``create_rollout`` makes).
    """
    templated = [
        (number, step.type, step.model_dump(mode="json")) for number, step in enumerate(draft.spec.plan, 1)
    ]
    templated = [(n, kind, data) for n, kind, data in templated if any(True for _ in params.variables(data))]
    if not templated:
        return
    lacking = params.lacking_labels([data for _n, _kind, data in templated], draft.targets, labels)
    for node, names in lacking.items():
        result["problems"].append(f"{node}: the plan names label(s) it does not have: {', '.join(names)}")
    shown: dict[str, dict[str, str]] = {}
    for node in draft.targets:
        if len(shown) >= _SHOWN_PARAMETER_NODES:
            break
        if node in lacking:
            continue
        values: dict[str, str] = {}
        for number, kind, data in templated:
            resolved = params.resolve(data, node, labels(node))
            for key, value in data.items():
                if any(True for _ in params.variables(value)):
                    values[f"step {number} ({kind}) {key}"] = (
                        resolved[key] if isinstance(resolved[key], str) else json.dumps(resolved[key])
                    )
        shown[node] = values
    result["parameters"] = shown


def add_timing(
    draft: Draft,
    result: dict[str, Any],
    labels: Callable[[str], Mapping[str, str]],
    now: float,
    offline_grace_s: float,
) -> None:
    """Maintenance windows per zone, deferral and start deadline: when the nodes may start.

    Args:
        draft: the resolved spec.
        result: the plan so far (``schedule``, ``schedule_lines``, ``offline_grace_s``
            and the estimate's start are added; a window that never opens is a problem).
        labels: a node's labels (its ``tz`` label places its windows).
        now: wall-clock seconds.
        offline_grace_s: the hub's default, for a spec that leaves it unset.

    Raises:
        InvalidInput: a bad cron or zone (naming it).
    """
    spec = draft.spec
    lines: list[str] = []
    schedule = schedule_of(spec)
    if schedule is not None:
        zones: dict[str, dict[str, Any]] = {}
        for node in draft.targets:
            tz = labels(node).get("tz")
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
                said = f"opens {entry['next_open_local']} (in {duration(entry['next_open'] - now)})"
            else:
                said = "never opens"
            count = entry["nodes"]
            lines.append(f"window    {zone}: {said} for {count} node(s); {spec.on_window_end} at its end")
        if not starts:
            result["problems"].append("no maintenance window ever opens for these targets")
    if spec.max_defer_s:
        lines.append(f"defer     a node whose update lock is held may wait {duration(spec.max_defer_s)}")
    if spec.start_deadline_s is not None:
        lines.append(
            f"deadline  a node not started {duration(spec.start_deadline_s)} after its command is "
            "not_started (not failed)"
        )
    grace = offline_grace_s if spec.offline_grace_s is None else spec.offline_grace_s
    said = " (default: 3 heartbeats + keepalive)" if spec.offline_grace_s is None else ""
    result["offline_grace_s"] = grace
    lines.append(
        f"offline   a node offline mid-job is lost, not failed, for {duration(grace)}{said}; "
        f"a rollback waits {duration(spec.restore_timeout_s)} for an offline node's restore"
    )
    result["schedule_lines"] = lines


@dataclass
class Answer:
    """One node's pre-flight answer as collected so far."""

    command: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    state: str | None = None  # passed, failed, rejected, unsent; None: no verdict yet
    detail: str = ""


def collected(answers: Mapping[str, Answer], timeout: float, asked: int) -> dict[str, Any]:
    """The ``preflight`` part of a plan from the answers (big fleets: clean nodes counted, not listed)."""
    nodes: dict[str, Any] = {}
    counts = {"passed": 0, "failed": 0, "unanswered": 0}
    detailed = asked <= _DETAILED_NODES
    for node, answer in answers.items():
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


def judge(draft: Draft, result: dict[str, Any]) -> None:
    """Add the problems and warnings of the targets and the pre-flight; ``ok`` when there is no problem."""
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
