"""One active hub among several (DESIGN 3.9): the term, the view of who is active, rollout records.

Mutual exclusion comes from the broker: every hub of a fleet connects its
*active* connection with one client id (``lock_client_id``), and a broker keeps
one connection per client id, ending the older one when a newer one connects.
A standby connects it only once the active hub is gone (its will said
``offline`` on ``hub/state``, or its membership heartbeats stopped), and a
hub whose active connection drops stops acting at once and never reconnects
it by itself. Whatever the older hub still sends is fenced by the ``term``:
the new active hub takes ``max(every term seen, its own term file) + 1``,
writes it durably before acting, and signs it into every command; agents
refuse commands of a lower term than the highest they have seen.

``ActiveView`` is the pure part (fed hub states and membership records,
asked whether the active hub is alive); ``TermFile`` the durable term;
``encode_record``/``decode_record`` and ``RecordSplitter`` the retained rollout
records a standby keeps warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.errors import InvalidInput
from bus.files import write_atomic
from bus.messages import MAX_PAYLOAD_BYTES, HubState, loads_object
from hub.core.state import EncodedRecord

__all__ = [
    "HUB_HEARTBEAT_S",
    "ActiveView",
    "RecordPayloads",
    "RecordSplitter",
    "TermFile",
    "decode_record",
    "encode_record",
    "lock_client_id",
    "term_path",
]

_LOGGER = logging.getLogger(__name__)

#: How often the active hub republishes its membership record (its heartbeat).
HUB_HEARTBEAT_S = 1.0
#: Heartbeats missed before a standby takes the active hub for dead (when no will came).
MISSED_HEARTBEATS = 4
#: Audit entries carried in a rollout's retained record.
RECORD_AUDIT = 50


def lock_client_id(prefix: str) -> str:
    """The client id of the active connection: one per fleet (prefix), shared by all its hubs."""
    digest = hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:12]
    return f"active-{digest}"


def term_path(db: Path) -> Path:
    """Where a hub keeps the highest term it has seen or held: beside its database."""
    return db.with_name(db.name + ".term")


class TermFile:
    """The highest term this hub has seen or taken, durable. Blocking: call through asyncio.to_thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        """The stored term (0 when missing; unreadable is 0 with a warning)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            _LOGGER.warning("term file %s unreadable: %s", self.path, exc)
            return 0
        try:
            value = int(text)
        except ValueError:
            _LOGGER.warning("term file %s holds %r, not a term", self.path, text[:40])
            return 0
        return max(value, 0)

    def write(self, term: int) -> None:
        """Store ``term`` atomically (temp file, fsync, rename)."""
        write_atomic(self.path, f"{term}\n", 0o600)


@dataclass
class ActiveView:
    """What a hub knows of the active hub, from ``hub/state`` and the membership records.

    Times are monotonic seconds; ``dead_after_s`` is how long without a sign of
    life from the active hub counts as its death when no will came (a broker that
    restarted, a half-open connection the broker has not noticed yet).
    """

    dead_after_s: float = HUB_HEARTBEAT_S * MISSED_HEARTBEATS
    me: str = ""  # the asking hub's id: a retained "active" naming it while it stands by is its own past
    state: HubState | None = None
    max_term: int = 0
    last_alive: float = 0.0
    members: dict[str, HubState] = field(default_factory=dict)

    def on_state(self, state: HubState | None, now: float) -> None:
        """The retained ``hub/state`` changed (None: cleared)."""
        if state is None:
            self.state = None
            return
        if state.state == "offline" and state.term and state.term < self.max_term:
            return  # the will of a hub older than the one known active: stale
        self.max_term = max(self.max_term, state.term)
        self.state = state
        if state.state in ("active", "online"):
            self.last_alive = now

    def on_member(self, hub: str, state: HubState | None, now: float) -> None:
        """A hub's membership record (None: cleared)."""
        if state is None:
            self.members.pop(hub, None)
            return
        self.members[hub] = state
        self.max_term = max(self.max_term, state.term)
        if (
            state.state == "active"
            and self.state is not None
            and self.state.hub == hub
            and state.term >= self.state.term
        ):
            self.last_alive = now

    def active_hub(self) -> str | None:
        """The id of the hub ``hub/state`` names active, or None."""
        if self.state is None or self.state.state not in ("active", "online"):
            return None
        return self.state.hub or "(unnamed)"

    def vacant(self, now: float) -> str | None:
        """Why no hub is acting (so a standby may take over), or None while one is."""
        if self.state is None:
            return "no hub state on the broker"
        if self.state.state in ("offline", "standby"):
            return f"hub {self.state.hub or '(unnamed)'} is offline ({self.state.reason})"
        if self.me and self.state.hub == self.me:
            return "the hub state left on the broker is this hub's own, from before"
        if now - self.last_alive > self.dead_after_s:
            return f"hub {self.state.hub or '(unnamed)'} silent for {now - self.last_alive:.1f} s"
        return None


def encode_record(
    record: dict[str, Any] | str,
    audit: list[dict[str, Any]],
    *,
    layout: tuple[int, int, int] | None = None,
) -> bytes | None:
    """A rollout's retained record (its engine record and audit tail), within the payload limit.

    ``record`` is the engine's record or its JSON text. The audit tail shrinks until it
    fits; None when the record alone does not fit. ``layout``: (parts, nodes per part,
    parts of nodes) of a record in parts (``RecordSplitter``).
    """
    # The record is encoded once (at 10,000 nodes it is megabytes): only the tail shrinks.
    split = b"" if layout is None else b'"parts":%d,"per_part":%d,"node_parts":%d,' % layout
    text = (
        record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    )
    head = b'{"v":1,' + split + b'"record":' + text.encode("utf-8")
    head += b',"audit":'
    if len(head) + 3 > MAX_PAYLOAD_BYTES:
        return None
    tail = audit[-RECORD_AUDIT:]
    while True:
        data = head + json.dumps(tail, separators=(",", ":")).encode("utf-8") + b"}"
        if len(data) <= MAX_PAYLOAD_BYTES:
            return data
        if not tail:
            return None
        tail = tail[len(tail) // 2 + 1 :]


def decode_record(
    payload: bytes, parts: Mapping[int, bytes] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(record, audit tail) of a retained rollout record, its nodes from ``parts`` when split.

    Raises:
        InvalidInput: malformed, or a part it names is missing or of another layout.
    """
    data = loads_object(payload)
    record, audit = data.get("record"), data.get("audit", [])
    if not isinstance(record, dict) or not isinstance(audit, list):
        raise InvalidInput("rollout record: 'record' must be an object and 'audit' a list")
    count, per_part = data.get("parts", 0), data.get("per_part", 0)
    if count:
        node_parts = data.get("node_parts", count)
        if (
            not all(isinstance(n, int) and n >= 0 for n in (count, per_part, node_parts))
            or node_parts > count
        ):
            raise InvalidInput("rollout record: 'parts', 'node_parts' and 'per_part' must be counts")
        nodes: dict[str, Any] = {}
        text: list[str] = []  # the rest of the record (spec, waves), as JSON text in pieces
        for index in range(count):
            found = (parts or {}).get(index)
            if found is None:
                raise InvalidInput(f"rollout record: part {index} of {count} is missing")
            part = loads_object(found)
            piece = part.get("nodes") if index < node_parts else part.get("text")
            if part.get("per_part") != per_part or not isinstance(piece, dict if index < node_parts else str):
                raise InvalidInput(f"rollout record: part {index} is of another layout")
            if isinstance(piece, dict):
                nodes.update(piece)
            else:
                text.append(piece)
        try:
            rest = json.loads("".join(text)) if text else {}
        except ValueError as exc:
            raise InvalidInput(f"rollout record: its text pieces are not JSON: {exc}") from exc
        if not isinstance(rest, dict):
            raise InvalidInput("rollout record: its text pieces are not an object")
        record = {**record, **rest, "nodes": nodes}
    return record, [entry for entry in audit if isinstance(entry, dict)]


#: Nodes per part of a record too big for one payload, at first (halved while a part is too big).
PART_NODES = 500


@dataclass(frozen=True)
class RecordPayloads:
    """What to publish for a rollout's record: its parts that changed, then its head.

    ``parts`` maps a part's index to its payload (``b""``: a part no longer used,
    cleared); ``head`` is None when it did not change.
    """

    parts: dict[int, bytes]
    head: bytes | None


class RecordSplitter:
    """A rollout's retained record, in parts when one payload cannot carry it (10,000 nodes).

    The head (``rollout/{id}/record``) keeps the record without its nodes, the audit
    tail, and the layout (``parts``, ``per_part``); part ``k``
    (``rollout/{id}/record/{k}``) the nodes ``k * per_part`` to ``(k + 1) * per_part - 1``
    in id order. Only parts whose bytes changed since the last call go out again: a
    wave touches a few. A reader needs the head and every part of its layout
    (``decode_record``).
    """

    def __init__(self, part_nodes: int = PART_NODES) -> None:
        self._part_nodes = part_nodes
        self._per_part: dict[str, int] = {}
        self._sent: dict[str, list[bytes]] = {}
        self._head: dict[str, bytes] = {}
        self._names: dict[str, list[str]] = {}  # per rollout: its nodes in id order

    def payloads(
        self, rollout: str, record: EncodedRecord, audit: list[dict[str, Any]]
    ) -> RecordPayloads | None:
        """The payloads of the record now, or None when even one node per part is too big."""
        whole = None if rollout in self._per_part else encode_record(record.text, audit)
        if whole is not None:
            return self._changed(rollout, [], whole)
        nodes = record.nodes
        names = self._names.get(rollout)
        if names is None or len(names) != len(nodes) or not nodes.keys() >= set(names):
            names = self._names[rollout] = sorted(nodes)  # (a rollout's nodes do not change: once)
        per_part = self._per_part.get(rollout, self._part_nodes)
        while True:
            parts = [_encode_part(per_part, [nodes[name] for name in names[start : start + per_part]])
                     for start in range(0, len(names), per_part)]  # fmt: skip
            if all(len(part) <= MAX_PAYLOAD_BYTES for part in parts):
                break
            if per_part == 1:
                return None
            per_part = max(1, per_part // 2)
        self._per_part[rollout] = per_part
        # The target list and the waves name every node too: they go in text pieces after the
        # nodes' parts (the same bytes each round unless the waves were split again).
        big = {key: record.head[key] for key in _BIG_FIELDS if key in record.head}
        text = json.dumps(big, ensure_ascii=False, separators=(",", ":"))
        pieces = [_encode_text(per_part, text[i : i + _TEXT_PART]) for i in range(0, len(text), _TEXT_PART)]
        small = {key: value for key, value in record.head.items() if key not in big}
        layout = (len(parts) + len(pieces), per_part, len(parts))
        head = encode_record({**small, "nodes": {}}, audit, layout=layout)
        if head is None:
            return None
        return self._changed(rollout, parts + pieces, head)

    def used_parts(self, rollout: str) -> int:
        """How many parts were last sent for ``rollout``."""
        return len(self._sent.get(rollout, []))

    def forget(self, rollout: str) -> None:
        """The rollout is gone (its record cleared)."""
        self._per_part.pop(rollout, None)
        self._sent.pop(rollout, None)
        self._head.pop(rollout, None)
        self._names.pop(rollout, None)

    def _changed(self, rollout: str, parts: list[bytes], head: bytes) -> RecordPayloads:
        before = self._sent.get(rollout, [])
        changed = {k: part for k, part in enumerate(parts) if k >= len(before) or before[k] != part}
        changed.update({k: b"" for k in range(len(parts), len(before))})
        self._sent[rollout] = parts
        same_head = self._head.get(rollout) == head
        self._head[rollout] = head
        return RecordPayloads(changed, None if same_head else head)


#: The fields of a record that name every node besides its nodes (carried in text pieces when in parts).
_BIG_FIELDS = ("spec", "waves")
#: Characters of a text piece: escaped (a quote or a backslash doubles) and UTF-8 encoded
#: (4 bytes a character at most), 60,000 stay within the payload limit.
_TEXT_PART = 60_000


def _encode_text(per_part: int, text: str) -> bytes:
    return json.dumps({"v": 1, "per_part": per_part, "text": text}, ensure_ascii=False).encode("utf-8")


def _encode_part(per_part: int, entries: list[str]) -> bytes:
    """A part of a record: ``entries`` are ``"name":{...}`` texts (``EncodedRecord.nodes``)."""
    return (f'{{"v":1,"per_part":{per_part},"nodes":{{' + ",".join(entries) + "}}").encode("utf-8")
