"""Topic names of DESIGN section 1: build them, parse them, validate node ids."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from bus.errors import InvalidInput, InvalidNodeId

__all__ = [
    "CLIENT_ID_SEPARATOR",
    "DEFAULT_PREFIX",
    "NODE_ID_PATTERN",
    "NodeTopic",
    "Topics",
    "check_node_id",
    "is_node_id",
    "is_own_client_id",
    "own_client_id",
    "valid_prefix",
]

DEFAULT_PREFIX = "fleet/v1"
NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_NODE_ID = re.compile(NODE_ID_PATTERN)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: A reply topic's client id: an MQTT client id, which may hold CLIENT_ID_SEPARATOR.
_REPLY_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}")

#: Splits a client id into its broker user and a local name (``tui~fleet-tui-3f2a``).
#: No broker user name holds it (node ids, ``hub`` and ``tui`` are [A-Za-z0-9_.-]),
#: so which user owns a client id is never ambiguous.
CLIENT_ID_SEPARATOR = "~"


def is_own_client_id(username: str, client_id: str) -> bool:
    """True when ``client_id`` belongs to broker user ``username``: the name itself or ``name~...``.

    Both brokers bind client ids to users this way (the embedded one refuses any
    other id; the generated mosquitto.conf replaces the id with the user name), so
    one credential can never take over, or squat, another client's connection.
    """
    return client_id == username or client_id.startswith(username + CLIENT_ID_SEPARATOR)


def own_client_id(username: str | None, wanted: str) -> str:
    """The client id to connect with: ``wanted``, prefixed with ``username~`` unless it is the user's."""
    if not username or is_own_client_id(username, wanted):
        return wanted
    return f"{username}{CLIENT_ID_SEPARATOR}{wanted}"


NodeChannel = Literal["state", "heartbeat", "cmd", "status", "job", "log"]
NODE_CHANNELS: tuple[NodeChannel, ...] = ("state", "heartbeat", "cmd", "status", "job", "log")
_CHANNELS = frozenset(NODE_CHANNELS)


def is_node_id(value: str) -> bool:
    """Tell whether ``value`` is a valid node id."""
    return _NODE_ID.fullmatch(value) is not None


def check_node_id(value: str) -> str:
    """Return ``value`` if it is a valid node id, else raise InvalidNodeId."""
    if not isinstance(value, str) or not is_node_id(value):
        shown = repr(value)[:80]
        raise InvalidNodeId(
            f"invalid node id {shown}: must match {NODE_ID_PATTERN} "
            "(letters, digits, '_', '.', '-'; at most 64 characters)"
        )
    return value


def valid_prefix(value: str) -> str:
    """Return ``value`` if it is a valid topic prefix; ValueError with the reason (for pydantic)."""
    try:
        Topics(value)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from exc
    return value


@dataclass(frozen=True)
class NodeTopic:
    """A parsed ``{prefix}/node/{node}/{channel}`` topic."""

    node: str
    channel: NodeChannel


@dataclass(frozen=True)
class Topics:
    """Every topic of DESIGN section 1 under one prefix (``fleet/v1`` by default)."""

    prefix: str = DEFAULT_PREFIX
    _node_head: str = field(init=False, repr=False, compare=False)  # parse_node's, per message

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise InvalidInput(f"invalid topic prefix {self.prefix!r}")
        object.__setattr__(self, "_node_head", f"{self.prefix}/node/")

    def node(self, node: str, channel: NodeChannel) -> str:
        """Topic of one node's channel; refuses invalid node ids."""
        return f"{self.prefix}/node/{check_node_id(node)}/{channel}"

    def node_filter(self, channel: NodeChannel | Literal["+", "#"] = "#", node: str = "+") -> str:
        """Subscription filter for a channel of every node (or of one node)."""
        return f"{self.prefix}/node/{node}/{channel}"

    def parse_node(self, topic: str) -> NodeTopic | None:
        """Parse a node topic; None when it is not one (or names an invalid node)."""
        head = self._node_head
        if not topic.startswith(head):
            return None
        node, _, channel = topic[len(head) :].partition("/")
        if channel not in _CHANNELS or not is_node_id(node):
            return None
        return NodeTopic(node=node, channel=channel)

    @property
    def hub_state(self) -> str:
        """Retained hub birth/will topic."""
        return f"{self.prefix}/hub/state"

    def hub_member(self, hub: str) -> str:
        """Retained membership record of one hub (DESIGN 3.9), with a will."""
        if not _CLIENT.fullmatch(hub):
            raise InvalidInput(f"invalid hub id {hub[:80]!r}")
        return f"{self.prefix}/hub/member/{hub}"

    @property
    def hub_member_filter(self) -> str:
        """Filter for every hub's membership record."""
        return f"{self.prefix}/hub/member/+"

    def parse_hub_member(self, topic: str) -> str | None:
        """Hub id of a membership record topic, or None."""
        head = f"{self.prefix}/hub/member/"
        if not topic.startswith(head):
            return None
        hub = topic[len(head) :]
        return hub if _CLIENT.fullmatch(hub) else None

    @property
    def hub_request(self) -> str:
        """Topic that tools publish ``Request``s to."""
        return f"{self.prefix}/hub/request"

    def hub_reply(self, client: str) -> str:
        """Reply topic of one requesting client."""
        if not _REPLY_CLIENT.fullmatch(client):
            raise InvalidInput(f"invalid reply client id {client[:80]!r}")
        return f"{self.prefix}/hub/reply/{client}"

    def parse_reply_to(self, value: str) -> str:
        """Turn a request's ``reply_to`` (a client id or a full reply topic) into the topic.

        Only topics under ``{prefix}/hub/reply/`` are accepted, so a request can
        never make the hub publish anywhere else (a node's ``cmd``, say).
        """
        head = f"{self.prefix}/hub/reply/"
        client = value[len(head) :] if value.startswith(head) else value
        return self.hub_reply(client)

    def rollout(self, rollout: str) -> str:
        """Retained summary topic of one rollout."""
        if not _CLIENT.fullmatch(rollout):
            raise InvalidInput(f"invalid rollout id {rollout[:80]!r}")
        return f"{self.prefix}/rollout/{rollout}"

    def rollout_record(self, rollout: str) -> str:
        """Retained full record of one rollout (what a standby hub carries it on from)."""
        return f"{self.rollout(rollout)}/record"

    @property
    def rollout_record_filter(self) -> str:
        """Filter for every rollout's record."""
        return f"{self.prefix}/rollout/+/record"

    def parse_rollout_record(self, topic: str) -> str | None:
        """Rollout id of a record topic, or None."""
        if not topic.endswith("/record"):
            return None
        return self.parse_rollout(topic[: -len("/record")])

    def rollout_record_part(self, rollout: str, part: int) -> str:
        """Retained part ``part`` of the nodes of a record too big for one payload."""
        if part < 0:
            raise InvalidInput(f"invalid record part {part}")
        return f"{self.rollout(rollout)}/record/{part}"

    @property
    def rollout_record_part_filter(self) -> str:
        """Filter for every part of every rollout's record."""
        return f"{self.prefix}/rollout/+/record/+"

    def parse_rollout_record_part(self, topic: str) -> tuple[str, int] | None:
        """(rollout id, part) of a record part topic, or None."""
        head, _, part = topic.rpartition("/")
        if not (part.isascii() and part.isdigit()) or len(part) > 6 or not head.endswith("/record"):
            return None
        rollout = self.parse_rollout(head[: -len("/record")])
        return None if rollout is None else (rollout, int(part))

    def rollout_nodes(self, rollout: str) -> str:
        """Per-node changes of one rollout (not retained; the summary's ``nodes`` may be cut)."""
        return f"{self.rollout(rollout)}/nodes"

    @property
    def rollout_nodes_filter(self) -> str:
        """Filter for every rollout's per-node changes."""
        return f"{self.prefix}/rollout/+/nodes"

    def parse_rollout_nodes(self, topic: str) -> str | None:
        """Rollout id of a per-node changes topic, or None."""
        if not topic.endswith("/nodes"):
            return None
        return self.parse_rollout(topic[: -len("/nodes")])

    @property
    def rollout_filter(self) -> str:
        """Filter for every rollout summary."""
        return f"{self.prefix}/rollout/+"

    def parse_rollout(self, topic: str) -> str | None:
        """Rollout id of a summary topic, or None."""
        head = f"{self.prefix}/rollout/"
        if not topic.startswith(head):
            return None
        rid = topic[len(head) :]
        return rid if _CLIENT.fullmatch(rid) else None

    @property
    def events(self) -> str:
        """Fleet-wide event feed."""
        return f"{self.prefix}/events"
