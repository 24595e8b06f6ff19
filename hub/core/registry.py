"""Fleet presence: which nodes exist, which are online, what they last reported (pure, takes ``now``).

Rules (DESIGN sections 2 and 3.7):

- A birth (``NodeState`` online) starts a session: the node is online, its
  ``session``, labels, inventory and versions are taken from the birth and
  ``last_seen`` is ``now``.
- A will or shutdown (``NodeState`` offline) ends the node's *current*
  session only: one whose ``session`` differs (a stale will of an older
  connection, delivered late) is ignored, Sparkplug's bdSeq idea.
- A birth of a session that already ended (its will was seen, or, delivered
  as retained, it timed out) is a stale replay (the retained birth
  re-delivered when the hub reconnects) and does not bring the node back;
  its labels, inventory and versions are still taken (the node's latest).
  A live birth of a session that only missed heartbeats is proof of life.
- A heartbeat of the current session refreshes ``last_seen`` and the load
  figures. A heartbeat is proof of life, so one brings an offline node back
  online when its session did not end by will or shutdown: an unknown node,
  a node whose birth was missed (new session), or a node that only missed
  heartbeats. A heartbeat of the session whose will was seen is ignored (that
  connection is gone). While a node is online, heartbeats of another session
  are ignored; its birth (or, failing that, expiry and the next heartbeat)
  moves it to the new session.
- ``expire(now)`` marks offline every online node not seen for
  ``misses x heartbeat_s + grace_s``; ``heartbeat_s`` is what the node's birth
  announced, else the hub's default. The hub calls it only while connected to
  the broker and calls ``refresh(now)`` after every reconnect (the hub was
  blind, the nodes were not silent).

Every update returns a ``Transition`` (node, online, reason) or None, so the
runner can tell the rollout manager and the UIs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from bus.messages import Heartbeat, Inventory, NodeState, TargetLabels
from bus.targets import resolve_targets
from bus.topics import is_node_id

__all__ = ["NodeInfo", "Registry", "Transition"]


class Transition(NamedTuple):
    """A node went online or offline."""

    node: str
    online: bool
    reason: str


@dataclass(frozen=True, slots=True)  # one per node, replaced on every heartbeat
class NodeInfo:
    """What the hub knows about one node."""

    node: str
    online: bool = False
    session: str = ""
    #: True once the current session ended by will or shutdown.
    session_ended: bool = False
    #: Why the node is offline: "lost", "shutdown", "missed heartbeats", "restored", "unknown".
    offline_reason: str = "unknown"
    labels: Mapping[str, str] = field(default_factory=dict)
    inventory: Inventory = field(default_factory=Inventory)
    agent_version: str = ""
    started_at: float = 0.0
    heartbeat_s: float | None = None
    last_seen: float = 0.0
    #: When ``online`` last changed.
    since: float = 0.0
    heartbeat: Heartbeat | None = None


def _announced(state: NodeState) -> dict[str, Any]:
    """What a node's birth or will says of it, as ``NodeInfo`` fields."""
    return {
        "labels": dict(state.labels),
        "inventory": state.inventory,
        "agent_version": state.agent_version,
        "started_at": state.started_at,
        "heartbeat_s": state.heartbeat_s,
    }


def _beaten(info: NodeInfo, now: float, heartbeat: Heartbeat) -> NodeInfo:
    """``info`` seen again at ``now``: ``dataclasses.replace`` in half its time (the hot path)."""
    return NodeInfo(
        info.node,
        info.online,
        info.session,
        info.session_ended,
        info.offline_reason,
        info.labels,
        info.inventory,
        info.agent_version,
        info.started_at,
        info.heartbeat_s,
        now,
        info.since,
        heartbeat,
    )


class Registry:
    """Presence of every node the hub has heard of.

    Args:
        default_heartbeat_s: the heartbeat period of nodes that announce none.
        misses: heartbeats a node may miss before it counts as offline.
        grace_s: extra seconds on top of ``misses x heartbeat_s`` (delivery jitter).
    """

    def __init__(self, default_heartbeat_s: float = 5.0, *, misses: int = 3, grace_s: float = 0.5) -> None:
        if default_heartbeat_s <= 0 or misses < 1 or grace_s < 0:
            raise ValueError("heartbeat period and misses must be positive, grace non-negative")
        self.default_heartbeat_s = default_heartbeat_s
        self.misses = misses
        self.grace_s = grace_s
        self._nodes: dict[str, NodeInfo] = {}
        # The online nodes to watch for missed heartbeats: per heartbeat period, in the
        # order they were last seen (a node seen again moves to the end), so ``expire``
        # looks at the silent ones only, not at 10,000 nodes twice a second.
        self._watch: dict[float, dict[str, None]] = {}
        self._period_of: dict[str, float] = {}
        self._latest_seen = 0.0  # the latest last_seen so far (time going back: the order is rebuilt)
        self._ordered = True

    # ------------------------------------------------------------------ updates

    def on_state(self, state: NodeState, now: float, *, retained: bool = True) -> Transition | None:
        """Apply a birth, will or shutdown.

        ``retained``: the broker delivered it as a retained message (a replay at
        subscription time) rather than as the node published it just now.
        """
        info = self._nodes.get(state.node)
        if state.state == "online":
            return self._birth(info, state, now, retained=retained)
        return self._death(info, state, now)

    def _birth(
        self, info: NodeInfo | None, state: NodeState, now: float, *, retained: bool
    ) -> Transition | None:
        if (
            info is not None
            and state.session == info.session
            and not info.online
            and (info.session_ended or (retained and info.offline_reason == "missed heartbeats"))
        ):
            # A replayed birth of a connection that is over or silent: not a sign of life,
            # but what it says is the node's latest word (an agent re-publishes its birth
            # when a job changed its versions): never keep an older inventory (issue 14.2).
            self._nodes[state.node] = dataclasses.replace(info, **_announced(state))
            return None
        was_online = info is not None and info.online
        self._put(
            NodeInfo(
                node=state.node,
                online=True,
                session=state.session,
                **_announced(state),
                last_seen=now,
                since=info.since if (info is not None and was_online) else now,
                heartbeat=info.heartbeat if (info is not None and info.session == state.session) else None,
            )
        )
        return None if was_online else Transition(state.node, True, "birth")

    def _death(self, info: NodeInfo | None, state: NodeState, now: float) -> Transition | None:
        reason = "shutdown" if state.reason == "shutdown" else "lost"
        if info is None:
            # Known only from its retained will: list it, offline.
            self._nodes[state.node] = NodeInfo(
                node=state.node,
                session=state.session,
                session_ended=True,
                offline_reason=reason,
                **_announced(state),
                since=now,
            )
            return None
        if state.session != info.session:
            return None  # a stale will of an older connection
        self._unwatch(state.node)
        self._nodes[state.node] = dataclasses.replace(
            info,
            online=False,
            session_ended=True,
            offline_reason=reason,
            since=now if info.online else info.since,
        )
        return Transition(state.node, False, reason) if info.online else None

    def on_heartbeat(self, heartbeat: Heartbeat, now: float) -> Transition | None:
        """Apply a heartbeat."""
        info = self._nodes.get(heartbeat.node)
        if info is None:
            self._put(
                NodeInfo(
                    node=heartbeat.node,
                    online=True,
                    session=heartbeat.session,
                    last_seen=now,
                    since=now,
                    heartbeat=heartbeat,
                )
            )
            return Transition(heartbeat.node, True, "heartbeat")
        if info.online:
            if heartbeat.session != info.session:
                return None
            self._put(_beaten(info, now, heartbeat))
            return None
        if heartbeat.session == info.session and info.session_ended:
            return None  # that connection's will was seen: it is gone
        self._put(
            dataclasses.replace(
                info,
                online=True,
                session=heartbeat.session,
                session_ended=False,
                offline_reason="unknown",
                last_seen=now,
                since=now,
                heartbeat=heartbeat,
            )
        )
        return Transition(heartbeat.node, True, "heartbeat")

    def expire(self, now: float) -> list[Transition]:
        """Mark offline every online node silent for too long; return those transitions."""
        if not self._ordered:
            self._reorder()
        gone: list[Transition] = []
        nodes = self._nodes
        for period, names in self._watch.items():
            limit = self.misses * period + self.grace_s
            for name in names:  # the longest silent first: stop at the first one heard recently enough
                if now - nodes[name].last_seen <= limit:
                    break
                gone.append(Transition(name, False, "missed heartbeats"))
        for transition in gone:
            self._unwatch(transition.node)
            info = nodes[transition.node]
            nodes[transition.node] = dataclasses.replace(
                info, online=False, offline_reason="missed heartbeats", since=now
            )
        return gone

    def refresh(self, now: float) -> None:
        """Count every online node as seen now (after the hub itself was disconnected)."""
        for name, info in self._nodes.items():
            if info.online:
                self._nodes[name] = dataclasses.replace(info, last_seen=max(info.last_seen, now))
        self._latest_seen = max(self._latest_seen, now)
        self._ordered = False  # (every one seen now: rebuilt at the next expire, in any order)

    def deadline_s(self, info: NodeInfo) -> float:
        """How long ``info``'s node may stay silent before it counts as offline."""
        period = info.heartbeat_s or self.default_heartbeat_s
        return self.misses * period + self.grace_s

    def forget(self, node: str) -> bool:
        """Drop a node from the registry; True if it was known."""
        self._unwatch(node)
        return self._nodes.pop(node, None) is not None

    def _put(self, info: NodeInfo) -> None:
        """Keep ``info`` of an online node just seen: at the end of its period's watch list."""
        name = info.node
        self._nodes[name] = info
        period = info.heartbeat_s or self.default_heartbeat_s
        old = self._period_of.get(name)
        if old is not None:
            del self._watch[old][name]
        watch = self._watch.get(period)
        if watch is None:
            watch = self._watch[period] = {}
        watch[name] = None
        self._period_of[name] = period
        if info.last_seen >= self._latest_seen:
            self._latest_seen = info.last_seen
        else:  # seen "before" another already watched (a clock gone back, a test): out of order
            self._ordered = False

    def _unwatch(self, node: str) -> None:
        old = self._period_of.pop(node, None)
        if old is not None:
            del self._watch[old][node]

    def _reorder(self) -> None:
        """Sort every watch list by last seen again (after time went back, or a refresh)."""
        for period, names in self._watch.items():
            self._watch[period] = dict.fromkeys(sorted(names, key=lambda name: self._nodes[name].last_seen))
        self._ordered = True

    # ------------------------------------------------------------------ queries

    def is_online(self, node: str) -> bool:
        """True when ``node`` is known and online."""
        info = self._nodes.get(node)
        return info is not None and info.online

    def get(self, node: str) -> NodeInfo | None:
        """What is known about ``node``, or None."""
        return self._nodes.get(node)

    def nodes(self) -> list[str]:
        """Every known node, sorted."""
        return sorted(self._nodes)

    def online(self) -> list[str]:
        """Every online node, sorted."""
        return sorted(name for name, info in self._nodes.items() if info.online)

    def resolve(self, targets: list[str] | TargetLabels | Literal["all"]) -> tuple[list[str], list[str]]:
        """Turn a rollout's targets into (known nodes, unknown names).

        A list keeps its order (duplicates dropped); labels and ``"all"`` give
        known nodes sorted by name. Offline nodes count as known.
        """
        return resolve_targets(targets, self._nodes, lambda node: self._nodes[node].labels)

    def to_api(self, node: str) -> dict[str, Any]:
        """The node as ``GET /api/nodes`` and ``fleet nodes --json`` show it.

        Raises:
            KeyError: the node is unknown.
        """
        info = self._nodes[node]
        beat = info.heartbeat
        return {
            "node": info.node,
            "online": info.online,
            "last_seen": info.last_seen or None,
            "labels": dict(info.labels),
            "inventory": info.inventory.model_dump(mode="json"),
            "job": beat.job.model_dump(mode="json") if beat is not None and beat.job is not None else None,
            "session": info.session,
            "agent_version": info.agent_version,
            "started_at": info.started_at or None,
            "since": info.since or None,
            "offline_reason": None if info.online else info.offline_reason,
            "heartbeat_s": info.heartbeat_s or self.default_heartbeat_s,
            "heartbeat": None
            if beat is None
            else {
                "seq": beat.seq,
                "ts": beat.ts,
                "uptime_s": beat.uptime_s,
                "load1": beat.load1,
                "mem_used_pct": beat.mem_used_pct,
                "disk_free_pct": beat.disk_free_pct,
            },
        }

    def all_api(self) -> list[dict[str, Any]]:
        """``to_api`` of every node, sorted by name."""
        return [self.to_api(name) for name in self.nodes()]

    # ------------------------------------------------------------------ persistence

    def record(self, node: str) -> dict[str, Any]:
        """What the hub stores about ``node`` (transitions only; heartbeats stay in memory)."""
        info = self._nodes[node]
        return {
            "node": info.node,
            "online": info.online,
            "session": info.session,
            "session_ended": info.session_ended,
            "offline_reason": info.offline_reason,
            "labels": dict(info.labels),
            "inventory": info.inventory.model_dump(mode="json"),
            "agent_version": info.agent_version,
            "started_at": info.started_at,
            "heartbeat_s": info.heartbeat_s,
            "last_seen": info.last_seen,
            "since": info.since,
        }

    def restore(self, records: Iterable[Mapping[str, Any]], now: float) -> int:
        """Load stored records (at hub start): every node offline until it is heard again.

        A node that was online keeps its session open, so its retained birth
        brings it back; malformed records are skipped. Returns how many loaded.
        """
        loaded = 0
        for record in records:
            try:
                name = str(record["node"])
                if not is_node_id(name):
                    continue
                was_online = bool(record.get("online"))
                heartbeat_s = record.get("heartbeat_s")
                info = NodeInfo(
                    node=name,
                    online=False,
                    session=str(record.get("session", "")),
                    session_ended=bool(record.get("session_ended")),
                    offline_reason="restored" if was_online else str(record.get("offline_reason", "unknown")),
                    labels={str(k): str(v) for k, v in dict(record.get("labels") or {}).items()},
                    inventory=Inventory.model_validate(record.get("inventory") or {}),
                    agent_version=str(record.get("agent_version", "")),
                    started_at=float(record.get("started_at") or 0.0),
                    heartbeat_s=float(heartbeat_s) if heartbeat_s else None,
                    last_seen=float(record.get("last_seen") or 0.0),
                    since=now if was_online else float(record.get("since") or 0.0),
                )
            except (KeyError, TypeError, ValueError):
                continue
            self._nodes.setdefault(name, info)
            loaded += 1
        return loaded
