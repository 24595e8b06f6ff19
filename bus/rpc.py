"""Request/reply over MQTT (DESIGN section 2): what the CLI, the TUI and tools use.

A request sent while no hub is connected fails fast with why (issue 15): the
client follows the hub's retained ``hub/state`` and, when it says offline,
fails every waiting call (and every new one) with "hub offline since ..."
instead of waiting out the timeout. With a standby hub standing by (its
membership record), a call instead waits for the takeover, within its timeout,
and a request that changes nothing is sent again to the new active hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bus.errors import BusError, InvalidInput
from bus.messages import HubState, Reply, Request, RequestOp, decode, encode, new_id
from bus.mqtt import MqttClient
from bus.topics import Topics

__all__ = ["SHOW_PAGE", "HubClient", "fetch_show"]

#: How long a call waits for an offline hub's state to turn online before it fails
#: (with a standby hub known: as long as the call's timeout, for the takeover).
_OFFLINE_WAIT_S = 1.0
#: Requests that change nothing: sent again (a new id) to the hub that takes over when
#: the one they went to is lost before it answered (DESIGN 3.9). A create with an
#: idempotency key is as safe: the new hub finds the rollout if the lost one made it.
_READ_ONLY: frozenset[str] = frozenset({"list", "show", "nodes", "plan"})


class HubClient:
    """Send ``Request``s to the hub and await the matching ``Reply``.

    The caller owns ``client`` (connected or about to be); replies arrive on
    ``{prefix}/hub/reply/{client_id}``. Every message the client receives must
    be passed to ``feed`` (or use ``pump`` when nothing else reads the client).
    """

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self._client = client
        self._topics = topics
        self.reply_topic = topics.hub_reply(client.client_id)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        #: The hub's latest retained state (None until it arrives).
        self.hub_state: HubState | None = None
        #: Every hub's retained membership record, by hub id (DESIGN 3.9).
        self.members: dict[str, HubState] = {}
        self._state_seen = asyncio.Event()  # set at each new hub state

    async def subscribe(self) -> None:
        """Subscribe to this client's reply topic and to the hub's retained state."""
        await self._client.subscribe(self.reply_topic, qos=1)
        await self._client.subscribe(self._topics.hub_state, qos=1)
        await self._client.subscribe(self._topics.hub_member_filter, qos=1)

    def hubs_line(self) -> str:
        """Which hub is active (its term) and which stand by, in one line."""
        state = self.hub_state
        if state is None:
            return "hub: unknown (no hub state on the broker)"
        if state.state in ("active", "online"):
            head = f"hub: {state.hub or 'unnamed'} active" + (f" (term {state.term})" if state.term else "")
        else:
            head = f"hub: none active ({state.hub or 'the hub'} {state.state})"
        standby = sorted(h for h, m in self.members.items() if m.state == "standby")
        return head + (f"; standing by: {', '.join(standby)}" if standby else "")

    def standby_known(self) -> bool:
        """Whether a hub stands by to take over (its membership record says ``standby``)."""
        return any(member.state == "standby" for member in self.members.values())

    def offline_reason(self) -> str | None:
        """Why no hub can answer (its retained state says offline), or None."""
        state = self.hub_state
        if state is None or state.state != "offline":
            return None
        if state.reason == "shutdown":
            since = f" since {_clock(state.ts)}" if state.ts else ""
            return f"hub offline{since} (it shut down); start `fleet hub`"
        up = f", up since {_clock(state.ts)}," if state.ts else ""
        return f"hub offline (its connection{up} was lost); is `fleet hub` running?"

    def feed(self, topic: str, payload: bytes) -> bool:
        """Offer one received message; True when it was a reply this client waited for.

        The hub's state is taken and also left to the caller (False).
        """
        if topic == self._topics.hub_state:
            self._take_state(payload)
            return False
        member = self._topics.parse_hub_member(topic)
        if member is not None:
            with contextlib.suppress(InvalidInput):
                if payload:
                    self.members[member] = decode(HubState, payload)
                else:
                    self.members.pop(member, None)
            return False
        if topic != self.reply_topic:
            return False
        try:
            reply = decode(Reply, payload)
        except InvalidInput as exc:
            # A reply we cannot read (too large, malformed) must not look like a
            # hub that never answered: fail the call if only one is waiting, or
            # the one whose id the payload names.
            target = self._match_unreadable(payload)
            if target is not None and not target.done():
                target.set_exception(BusError(f"unreadable reply from the hub: {exc.reason}"))
            return True
        future = self._waiting.pop(reply.request, None)
        if future is not None and not future.done():
            future.set_result(reply)
        return True

    def _match_unreadable(self, payload: bytes) -> asyncio.Future[Reply] | None:
        head = payload[:4096].decode("utf-8", errors="replace")
        for request_id in list(self._waiting):
            if f'"request":"{request_id}"' in head.replace(" ", ""):
                return self._waiting.pop(request_id)
        if len(self._waiting) == 1:
            return self._waiting.pop(next(iter(self._waiting)))
        return None

    def _take_state(self, payload: bytes) -> None:
        try:
            self.hub_state = decode(HubState, payload) if payload else None
        except InvalidInput:
            return
        self._state_seen.set()
        reason = self.offline_reason()
        if reason is None:
            return
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BusError(reason))

    async def pump(self) -> None:
        """Read the client's messages forever, feeding replies (run as a task)."""
        async for message in self._client.messages():
            self.feed(message.topic, message.payload)

    async def call(self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Reply:
        """Send one request and wait for its reply.

        Raises:
            BusError: the hub's retained state says it is offline (at once, or once no
                standby took over within ``timeout``), or no reply within ``timeout``
                (is a hub running?).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        body = body or {}
        await self._until_online(deadline)
        while True:
            request = Request(id=new_id(), op=op, reply_to=self.reply_topic, body=body)
            future: asyncio.Future[Reply] = loop.create_future()
            self._waiting[request.id] = future
            try:
                await self._client.publish(self._topics.hub_request, encode(request), qos=1)
                return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError as exc:
                raise BusError(
                    f"no reply from the hub within {timeout:g} s (is `fleet hub` running?)"
                ) from exc
            except BusError:
                resend = op in _READ_ONLY or (op == "create_rollout" and bool(body.get("idempotency_key")))
                if not (resend and self.offline_reason() is not None and self.standby_known()):
                    raise
            finally:
                self._waiting.pop(request.id, None)
                with contextlib.suppress(Exception):
                    if not future.done():
                        future.cancel()
            await self._until_online(deadline)  # the takeover; then the same request again

    async def _until_online(self, deadline: float) -> None:
        """Return once no retained state says the hub is offline; BusError with why otherwise.

        A hub restarting says so again within moments: wait that long (``_OFFLINE_WAIT_S``),
        or, with a standby hub known, until ``deadline`` for it to take over.
        """
        loop = asyncio.get_running_loop()
        reason = self.offline_reason()
        if reason is None:
            return
        limit = deadline if self.standby_known() else min(deadline, loop.time() + _OFFLINE_WAIT_S)
        while reason is not None and loop.time() < limit:
            self._state_seen.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_seen.wait(), max(0.0, limit - loop.time()))
            reason = self.offline_reason()
        if reason is not None:
            raise BusError(reason)


#: Nodes per page of a ``show`` too big for one reply (10,000 nodes: about 2 MB in all).
SHOW_PAGE = 1000


async def fetch_show(call: Callable[..., Awaitable[Reply]], rollout: str, page: int = SHOW_PAGE) -> Reply:
    """The ``show`` reply of ``rollout``; one too big for the payload limit is fetched page by page.

    ``call(op, body)`` sends one request (``HubClient.call`` or a session's).

    The pages (nodes sorted by id, each with its step grid) are merged into one reply
    as an unpaged ``show`` would give it; a page the hub still finds too big is asked
    again smaller.
    """
    reply: Reply = await call("show", {"rollout": rollout})
    if reply.ok or not isinstance(reply.body, Mapping) or reply.body.get("kind") != "too_large":
        return reply
    merged: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    steps: dict[str, Any] = {}
    offset, total = 0, None
    while total is None or offset < total:
        part: Reply = await call("show", {"rollout": rollout, "offset": offset, "limit": page})
        body = part.body if isinstance(part.body, Mapping) else {}
        if not part.ok:
            if body.get("kind") == "too_large" and page > 1:
                page = max(1, page // 4)
                continue
            return part
        if not merged:
            merged = dict(body)
        total = int(body.get("nodes_total") or 0)
        nodes.update(body.get("nodes") or {})
        steps.update(body.get("steps") or {})
        offset += page
    merged.update(nodes=nodes, steps=steps, nodes_total=None)  # as an unpaged show: every node
    merged.pop("offset", None)
    return reply.model_copy(update={"ok": True, "body": merged, "error": None})


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
