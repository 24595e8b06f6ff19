"""What the command runner tells the hub: step reports, the job snapshot (coalesced), log lines.

``Reporter`` publishes, for one node:

- ``StepStatus`` on the ``status`` topic (QoS 1), each as it happens;
- the retained ``JobSnapshot`` on the ``job`` topic: the node's latest view of
  its job. Snapshots of a job in progress are coalesced: one is published at
  most ``snapshot_every_s`` after the change it shows (a later change replaces
  it while it waits), and a final snapshot goes out at once, replacing any
  still waiting. A step that takes longer than that is shown running in time;
  a plan of quick steps costs the broker and the hub one or two snapshots
  instead of one per step (``bench/rollout_latency.py``);
- ``LogLine`` on the ``log`` topic (QoS 0): what a step did, and its tools' output.

A failed publish is logged and never fails the job: the retained snapshot is
published again after every reconnect (``republish_snapshot``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel

from bus.messages import JobPhase, JobSnapshot, LogLine, StepStateName, StepStatus, encode
from bus.topics import Topics
from edge_agent import executor
from edge_agent.executor import ActiveJob, ApplyEntry

__all__ = ["MAX_DETAIL", "Publish", "Reporter"]

#: The least time between two answers to a command sent again (``Reporter.answer_replay``).
_REPLAY_ANSWER_EVERY_S = 1.0

_LOGGER = logging.getLogger(__name__)

Publish = Callable[..., Awaitable[None]]
"""``publish(topic, payload, *, qos=1, retain=False)``, e.g. ``MqttClient.publish``."""

_MAX_LINE = 4096
#: Details longer than this are cut (reports and snapshots).
MAX_DETAIL = 2000
#: Phases whose snapshots may be coalesced (a later one replaces an unpublished one).
_PROGRESS_PHASES = frozenset({"applying", "rolling_back"})


class Reporter:
    """Step reports, the coalesced retained job snapshot and log lines of one node.

    Args:
        node: the node's id.
        topics: the topic scheme.
        publish: ``publish(topic, payload, *, qos=1, retain=False)``.
        clock: wall-clock time (epoch seconds) for timestamps.
        entry: the journal's entry of a rollout (what a snapshot shows of its steps).
        snapshot_every_s: how long a snapshot of a job in progress may wait to be
            merged with the next (0: every change is published at once).
    """

    def __init__(
        self,
        node: str,
        topics: Topics,
        publish: Publish,
        *,
        clock: Callable[[], float],
        entry: Callable[[str], ApplyEntry | None],
        snapshot_every_s: float,
    ) -> None:
        self._node = node
        self._publish = publish
        self._clock = clock
        self._entry = entry
        self._status_topic = topics.node(node, "status")
        self._job_topic = topics.node(node, "job")
        self._log_topic = topics.node(node, "log")
        self._last_snapshot: bytes | None = None  # the latest retained JobSnapshot sent
        self._last_snapshot_of: str | None = None  # the command it is of
        self._answered_at = -_REPLAY_ANSWER_EVERY_S  # (monotonic) the snapshot last sent again
        self._snapshot_every_s = snapshot_every_s
        self._snapshot_due: tuple[ActiveJob, JobPhase, str] | None = None
        self._snapshot_timer: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Drop a snapshot still waiting to be merged (the runner is closing)."""
        timer = self._snapshot_timer
        if timer is not None and not timer.done():
            timer.cancel()
            await asyncio.wait({timer})

    async def republish_snapshot(self) -> None:
        """Publish the latest job snapshot again (a broker restarted without persistence lost it)."""
        if self._last_snapshot is not None:
            self._answered_at = time.monotonic()  # (a replay of the retained command needs no answer now)
            await self._send_raw(self._job_topic, self._last_snapshot)

    async def answer_replay(self, command: str) -> None:
        """The hub sent ``command`` again: if it is the latest job's, publish its snapshot again.

        The hub sends an awaited command again after a restart or a takeover, when the
        answer may have been lost: a broker that failed over (a NATS cluster electing
        new leaders) can lose a retained snapshot it acknowledged. Not within a second of
        the previous answer or of a reconnect's ``republish_snapshot``: a retained command
        comes back with every reconnect.
        """
        if self._last_snapshot is None or self._last_snapshot_of != command:
            return
        now = time.monotonic()
        if now - self._answered_at < _REPLAY_ANSWER_EVERY_S:
            return
        self._answered_at = now
        _LOGGER.info("command %s sent again: its latest snapshot published again", command)
        await self._send_raw(self._job_topic, self._last_snapshot)

    async def status(
        self, job: ActiveJob, index: int, step_type: str, state: StepStateName, detail: str = ""
    ) -> None:
        """Report one transition of a step (``index`` -1: of the command as a whole)."""
        _LOGGER.info("%s %s step %d (%s) %s%s", job.action, job.command, index, step_type, state,
                     f": {detail}" if detail else "")  # fmt: skip
        await self._send(
            self._status_topic,
            StepStatus(
                node=self._node,
                command=job.command,
                rollout=job.rollout,
                index=index,
                type=step_type,
                state=state,
                ts=self._clock(),
                detail=detail[:MAX_DETAIL],
            ),
        )

    async def snapshot(self, job: ActiveJob, phase: JobPhase, detail: str = "") -> None:
        """Publish the retained snapshot; one of a job in progress may wait to be merged."""
        if phase in _PROGRESS_PHASES and self._snapshot_every_s > 0:
            self._snapshot_due = (job, phase, detail)
            if self._snapshot_timer is None or self._snapshot_timer.done():
                self._snapshot_timer = asyncio.create_task(self._snapshot_later())
            return
        self._snapshot_due = None  # this one supersedes whatever waits
        await self._publish_snapshot(job, phase, detail)

    async def rejected(self, snapshot: JobSnapshot) -> None:
        """Publish the retained snapshot of a refused (signature-verified) command at once."""
        await self._send(self._job_topic, snapshot, retain=True)

    async def log(self, job: ActiveJob, index: int, line: str, stream: str = "agent") -> None:
        """One log line of step ``index``: ``stream`` is stdout/stderr of its tools, or the agent's own."""
        shown: Literal["stdout", "stderr", "agent"] = (
            "stdout" if stream == "stdout" else "stderr" if stream == "stderr" else "agent"
        )
        if shown == "agent":  # what a step did (its tools' output only goes to the hub)
            _LOGGER.info("%s step %d: %s", job.command, index, line)
        await self._send(
            self._log_topic,
            LogLine(
                node=self._node,
                command=job.command,
                rollout=job.rollout,
                index=index,
                stream=shown,
                line=line[:_MAX_LINE],
                ts=self._clock(),
            ),
            qos=0,
        )

    async def _snapshot_later(self) -> None:
        await asyncio.sleep(self._snapshot_every_s)
        due, self._snapshot_due = self._snapshot_due, None
        if due is not None:
            await self._publish_snapshot(*due)

    async def _publish_snapshot(self, job: ActiveJob, phase: JobPhase, detail: str) -> None:
        snapshot = executor.snapshot(
            job,
            self._entry(job.rollout),
            node=self._node,
            phase=phase,
            now=self._clock(),
            detail=detail[:MAX_DETAIL],
        )
        await self._send(self._job_topic, snapshot, retain=True)

    async def _send_raw(self, topic: str, payload: bytes) -> None:
        try:
            await self._publish(topic, payload, qos=1, retain=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.warning("publish to %s failed", topic, exc_info=True)

    async def _send(self, topic: str, message: BaseModel, *, qos: int = 1, retain: bool = False) -> None:
        payload = encode(message)
        if retain and topic == self._job_topic:
            self._last_snapshot = payload
            self._last_snapshot_of = message.id if isinstance(message, JobSnapshot) else None
        try:
            await self._publish(topic, payload, qos=qos, retain=retain)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.warning("publish to %s failed", topic, exc_info=True)
