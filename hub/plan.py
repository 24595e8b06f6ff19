"""Plan a rollout before acting: targets, waves, timing, and a pre-flight on every online target.

``fleet rollout plan FILE``, the ``plan`` request op, ``POST
/api/updates?dry_run=true`` and the TUI's preview all come here and get the
same answer (``Planner.plan``): a JSON object labelled ``"kind": "plan"``,
``"dry_run": true``, that

- resolves the targets as ``create_rollout`` would (unknown ones named,
  offline ones flagged, nodes busy in another rollout named),
- splits them into waves exactly as the engine will (``bus.pace.planned_waves``), with a
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

``Planner`` does the I/O (asking the nodes); what needs no node is computed by the
pure ``hub.core.plan``, and ``bus.plan_view.plan_lines`` renders the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.errors import BusError
from bus.messages import PLAN_PREFIX, Command, StepStatus, new_id
from bus.publisher import Publish
from bus.signing import CommandSigner
from bus.topics import Topics
from hub.core.plan import (
    Answer,
    Draft,
    add_parameters,
    add_timing,
    build_draft,
    collected,
    judge,
    skeleton,
)

if TYPE_CHECKING:
    from hub.requests import PlanRollout

__all__ = ["Planner"]

_LOGGER = logging.getLogger(__name__)

_CHECKS_PER_NODE = 70


@dataclass
class _Round:
    answers: dict[str, Answer]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    left: int = 0


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
        self._signer = CommandSigner(signing_key)
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

    async def plan(self, request: PlanRollout) -> dict[str, Any]:
        """Answer one ``plan`` request (decoded at the edge: ``hub.requests``).

        Returns:
            The plan (see the module docstring), as JSON values.
        """
        spec, timeout, ask = request.spec, request.timeout_s, request.ask
        known, unknown = self._resolve(spec.targets)
        draft = build_draft(spec, known, unknown, self._is_online, self._busy(known))
        result = skeleton(draft)
        add_timing(draft, result, self._labels, self._clock(), self._offline_grace)
        add_parameters(draft, result, self._labels)
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
        judge(draft, result)
        return result

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
        found = _Round({node: Answer(command.id) for node, command in commands.items()}, left=len(commands))
        self._rounds[plan_id] = found
        try:
            for node, command in commands.items():
                payload = self._signer.payload(command)
                try:
                    # Not retained: the node's retained command (a running rollout's) stays.
                    await self._publish(self._topics.node(node, "cmd"), payload, qos=1, retain=False)
                except BusError as exc:
                    found.answers[node].state = "unsent"
                    found.answers[node].detail = f"not sent: {exc.reason}"
                    found.left -= 1
            if found.left > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(found.done.wait(), timeout)
        finally:
            del self._rounds[plan_id]
        return collected(found.answers, timeout, len(draft.asked))
