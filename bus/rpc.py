"""Request/reply over MQTT (DESIGN section 2): what the CLI, the TUI and tools use."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bus.errors import BusError, InvalidInput
from bus.messages import Reply, Request, RequestOp, decode, encode, new_id
from bus.mqtt import MqttClient
from bus.topics import Topics

__all__ = ["HubClient"]


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

    async def subscribe(self) -> None:
        """Subscribe to this client's reply topic."""
        await self._client.subscribe(self.reply_topic, qos=1)

    def feed(self, topic: str, payload: bytes) -> bool:
        """Offer one received message; True when it was a reply this client waited for."""
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

    async def pump(self) -> None:
        """Read the client's messages forever, feeding replies (run as a task)."""
        async for message in self._client.messages():
            self.feed(message.topic, message.payload)

    async def call(self, op: RequestOp, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Reply:
        """Send one request and wait for its reply.

        Raises:
            BusError: no reply within ``timeout`` (is a hub running?).
        """
        request = Request(id=new_id(), op=op, reply_to=self.reply_topic, body=body or {})
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        try:
            await self._client.publish(self._topics.hub_request, encode(request), qos=1)
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError as exc:
            raise BusError(f"no reply from the hub within {timeout:g} s (is `fleet hub` running?)") from exc
        finally:
            self._waiting.pop(request.id, None)
            with contextlib.suppress(Exception):
                if not future.done():
                    future.cancel()
