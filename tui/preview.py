"""What a rollout spec would do, before it is sent: targets, offline ones, waves (pure).

The hub has the last word (DESIGN section 3.1): this preview resolves targets
against the nodes the TUI knows, so the operator sees offline or unknown targets
and the wave split before confirming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from bus.errors import InvalidInput
from bus.messages import RolloutSpec, describe, loads_object
from bus.pace import planned_waves
from bus.plan_view import DEFAULT_PREFLIGHT_TIMEOUT_S, plan_lines
from bus.targets import resolve_targets as resolve
from bus.waves import plan_waves
from tui.model import NodeView

__all__ = [
    "Preview",
    "compute_waves",
    "hub_plan_lines",
    "make_preview",
    "parse_spec",
    "plan_request",
    "resolve_targets",
]


def parse_spec(text: str) -> RolloutSpec:
    """Parse a rollout spec from JSON text; InvalidInput with a one-line reason otherwise."""
    data = loads_object(text.strip() or "null")
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid rollout spec: {describe(exc, data)}") from exc


def resolve_targets(spec: RolloutSpec, nodes: Mapping[str, NodeView]) -> tuple[list[str], list[str]]:
    """(targets, unknown): the nodes a spec names, and listed names no node answers to (as the hub does)."""
    return resolve(spec.targets, nodes, lambda node: nodes[node].labels)


def compute_waves(targets: Sequence[str], waves: Sequence[int | str]) -> list[list[str]]:
    """Split targets into waves exactly as the hub will (``bus.waves.plan_waves``)."""
    return plan_waves(targets, waves)


@dataclass(frozen=True)
class Preview:
    """A spec resolved against the known fleet."""

    spec: RolloutSpec
    targets: list[str]
    unknown: list[str]
    offline: list[str]
    waves: list[list[str]]

    @property
    def problems(self) -> list[str]:
        """Why the hub would refuse it as it stands (empty when it looks acceptable)."""
        found: list[str] = []
        if self.unknown:
            found.append("unknown targets: " + ", ".join(self.unknown))
        if not self.targets and not self.unknown:
            found.append("no node matches the targets")
        if self.offline and self.spec.require_online:
            found.append("offline targets: " + ", ".join(self.offline))
        return found

    def lines(self, limit: int = 12) -> list[str]:
        """The preview as short lines of text for the screen."""
        spec = self.spec
        out = [
            f"name      {spec.name}",
            f"targets   {len(self.targets)} node(s)"
            + (f", {len(self.offline)} offline" if self.offline else "")
            + (f", {len(self.unknown)} unknown" if self.unknown else ""),
            f"plan      {len(spec.plan)} step(s): " + " > ".join(step.type for step in spec.plan),
            f"failure   max_failed={spec.failure.max_failed} on_failure={spec.failure.on_failure}"
            f" require_online={str(spec.require_online).lower()}",
        ]
        for number, wave in enumerate(self.waves[:limit], start=1):
            shown = ", ".join(f"{node} (offline)" if node in self.offline else node for node in wave[:8])
            more = f" +{len(wave) - 8} more" if len(wave) > 8 else ""
            out.append(f"wave {number:<4} {len(wave)}: {shown}{more}")
        if len(self.waves) > limit:
            out.append(f"... {len(self.waves) - limit} more wave(s)")
        out.extend(f"! {problem}" for problem in self.problems)
        return out


def make_preview(spec: RolloutSpec, nodes: Mapping[str, NodeView], now: float) -> Preview:
    """Resolve ``spec`` against the known nodes as of ``now``."""
    targets, unknown = resolve_targets(spec, nodes)
    offline = [n for n in targets if nodes[n].presence(now) == "offline"]
    return Preview(spec, targets, unknown, offline, planned_waves(targets, spec.strategy))


def plan_request(spec_body: Mapping[str, Any], request_timeout_s: float) -> dict[str, Any]:
    """The body of the hub's ``plan`` request for a spec (when connected, the hub's plan is the preview).

    The nodes' pre-flight answers are awaited for at most the default (10 s) and
    always some seconds less than the TUI waits for a reply, so a slow node shows
    as "did not answer" rather than the whole request timing out.
    """
    wait = max(1.0, min(DEFAULT_PREFLIGHT_TIMEOUT_S, request_timeout_s - 3.0))
    return {"spec": dict(spec_body), "preflight_timeout_s": wait}


def hub_plan_lines(plan: Mapping[str, Any], limit: int = 12) -> list[str]:
    """The hub's plan (targets, waves, timing, each node's pre-flight) as lines; labelled a plan."""
    return plan_lines(plan, limit)
