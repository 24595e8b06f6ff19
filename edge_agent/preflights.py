"""Pre-flight commands beside the node's job: read-only checks of a plan, one report per check.

``Preflights`` runs each ``preflight`` command the runner accepted in a task of
its own, beside any job (it changes nothing and is never journalled): a
``StepStatus`` per check, then the verdict at index -1 (``edge_agent.preflight``
has the checks). A duplicate delivery (QoS 1) is not checked twice, and at most
a few run at once: a flood is left unanswered, which the hub counts as such.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping

from bus.messages import Command
from edge_agent import deferral
from edge_agent.executor import ActiveJob
from edge_agent.reporter import Reporter
from edge_agent.settings import ExecutorSettings
from edge_agent.steps import StepHandler

__all__ = ["Preflights"]

_LOGGER = logging.getLogger(__name__)

#: Pre-flight command ids remembered (a QoS 1 duplicate is not checked twice) and run at once.
_REMEMBERED = 64
_AT_ONCE = 4
_MAX_S = 120.0


class Preflights:
    """The pre-flight checks in progress on one node.

    Args:
        settings: the node's executor settings.
        handlers: step handlers by type (their intake checks).
        reporter: where the reports go.
        clock: wall-clock time (epoch seconds): a check ends by the command's expiry.
        busy_with: the rollout of the job in progress or queued, or None.
    """

    def __init__(
        self,
        settings: ExecutorSettings,
        handlers: Mapping[str, StepHandler],
        reporter: Reporter,
        *,
        clock: Callable[[], float],
        busy_with: Callable[[], str | None],
    ) -> None:
        self._settings = settings
        self._handlers = handlers
        self._reporter = reporter
        self._clock = clock
        self._busy_with = busy_with
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids: deque[str] = deque(maxlen=_REMEMBERED)

    def start(self, command: Command) -> None:
        """Check the command's plan in the background (unless a duplicate, or too many run)."""
        if command.id in self._ids or len(self._tasks) >= _AT_ONCE:
            return  # a duplicate delivery (QoS 1), or a flood: the hub counts it as unanswered
        self._ids.append(command.id)
        task = asyncio.create_task(self._run(command), name=f"preflight-{command.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the checks in progress and wait until they are gone."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _run(self, command: Command) -> None:
        """Check the plan without changing anything; one status per check, then the verdict (index -1)."""
        from edge_agent import preflight  # only agents asked for a plan pay for its checks

        who = ActiveJob(
            command=command.id, action="apply", rollout=command.rollout, issued_at=command.issued_at
        )
        busy = self._busy_with()
        try:
            checks = await preflight.run_preflight(
                command.plan,
                self._settings,
                self._handlers,
                busy_with=busy if busy != command.rollout else None,
                lock=lambda: deferral.busy_reason(self._settings),
                timeout=max(1.0, min(command.expires_at - self._clock(), _MAX_S)),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOGGER.exception("pre-flight %s failed inside the agent", command.id)
            detail = f"agent error: {type(exc).__name__}: {exc}"
            await self._reporter.status(who, -1, "preflight", "failed", detail)
            return
        for check in checks:
            await self._reporter.status(who, check.index, check.type, check.state, check.detail)
        state, summary = preflight.summarize(checks)
        await self._reporter.status(who, -1, "preflight", state, summary)
        _LOGGER.info("pre-flight %s for rollout plan %s: %s", command.id, command.rollout, summary)
