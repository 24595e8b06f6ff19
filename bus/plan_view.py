"""The plan reply as text, and its limits: one rendering for the CLI, the TUI and the hub.

A plan (``fleet rollout plan``, the ``plan`` request op, ``POST
/api/updates?dry_run=true``) is a JSON object labelled ``"kind": "plan"``; its
fields are contract, so how it reads is written once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_PREFLIGHT_TIMEOUT_S",
    "MAX_PREFLIGHT_TIMEOUT_S",
    "NOTICE",
    "duration",
    "plan_lines",
]

#: How long a plan waits for the nodes' pre-flight answers unless told otherwise.
DEFAULT_PREFLIGHT_TIMEOUT_S = 10.0
MAX_PREFLIGHT_TIMEOUT_S = 120.0
NOTICE = "PLAN ONLY (dry run): nothing was started, nothing on any node was changed"


def duration(seconds: float) -> str:
    """Seconds as a short human duration (``90 s``, ``15 min``, ``2.5 h``)."""
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
        lines.append(f"timing    {len(waves)} wave(s), at most {duration(float(timing['worst_case_s']))}")
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
