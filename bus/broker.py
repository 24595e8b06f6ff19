"""The embedded broker: amqtt 0.12.1 with the defects that touch fleetbus guarded.

amqtt is pinned to 0.12.1 in pyproject.toml because the guards below reach into
its internals. Upstream-style notes on each defect (FINDINGS.md has the figures):

1. Retained messages leak to clients that never subscribed to them. On every
   CONNECT, ``Broker._handle_client_session`` replays the retained messages of
   *every* subscription filter in the broker to the new session. A node with no
   subscriptions received all nodes' retained commands. Guard:
   ``_publish_retained_messages_for_subscription`` sends retained messages only
   for filters the session itself holds, at the QoS it was granted.
2. Concurrent connects crash sessions: that same loop (and the broadcast loop)
   iterate ``self._subscriptions`` across ``await`` points, so a SUBSCRIBE
   arriving meanwhile raises ``RuntimeError: dictionary changed size during
   iteration``; the client has its CONNACK but is never served again. Guard: the
   subscription table is a dict whose iteration walks a snapshot.
   The inner per-filter lists are copied too, so a subscriber list that
   changes during a broadcast neither skips nor repeats a subscriber.
3. Keepalive is not enforced: the reader loop of ``ProtocolHandler`` waits
   ``session.keep_alive`` seconds for the next packet and on timeout calls
   ``handle_read_timeout``, which does nothing, so a half-open connection (a
   frozen host, a pulled cable) never yields its last will. Guard, touching as
   little as possible: the session's keepalive is stretched to 1.5 x the
   client's (MQTT 3.1.1 section 3.1.2.10, as mosquitto does), and the handler
   of each connection gets a ``handle_read_timeout`` that ends the session as
   lost, exactly as an EOF would, so the broker publishes the will. fleetbus
   also detects dead nodes from missed heartbeats on any broker (DESIGN 3.7).

4. A refused client could still disturb a session: amqtt deletes or adopts the
   session of the CONNECT's client id before it checks the password. Guard:
   ``_read_connect`` authenticates first (see its docstring).

5. Any client may take any client id: a node's credentials connecting as
   ``agent-n2`` or as the hub ended the real client's connection, or held the
   id in a persistent session so the rightful client was refused until the
   broker restarted. Guard: a client with a user name may only use its own ids
   (``bus.topics.is_own_client_id``: the name, or ``name~anything``).
6. No packet size limit: amqtt reads a packet of any announced length into
   memory (one 100 MB publish took the broker to ~1 GB). Guard: a packet larger
   than ``bus.messages.MAX_PACKET_BYTES`` ends the connection before its body is read.
7. A clean-session CONNECT with a client id already connected deleted that
   session but left its connection open and publishing (no take-over). Guard:
   ``_read_connect`` ends the older connection first, as mosquitto does.

The guards are tested in tests/integration/test_embedded_broker.py, together
with tests that fail once upstream fixes a defect (then drop its guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import ItemsView, Iterator, ValuesView
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from bus.errors import ConfigError
from bus.messages import MAX_PACKET_BYTES
from bus.topics import CLIENT_ID_SEPARATOR, is_own_client_id, own_client_id

__all__ = [
    "KEEPALIVE_GRACE",
    "BrokerThread",
    "FleetBroker",
    "PacketTooLarge",
    "default_config",
    "load_config",
]

_LOGGER = logging.getLogger(__name__)

#: How long amqtt's own shutdown may take before every connection is closed anyway.
_SHUTDOWN_TIMEOUT_S = 5.0

#: A client silent for this many times its keepalive is lost (MQTT 3.1.1 section 3.1.2.10).
KEEPALIVE_GRACE = 1.5


class _SnapshotDict(dict[str, Any]):
    """A dict whose iteration walks a copy, so awaits inside a loop over it are safe.

    ``items()`` and ``values()`` also copy the list values (amqtt keeps one list
    of ``(session, qos)`` per topic filter), so a loop that awaits while a
    session subscribes or leaves sees one consistent snapshot.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return {k: _copied(v) for k, v in super().items()}.items()

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        return {k: _copied(v) for k, v in super().items()}.values()


def _copied(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class _KeepaliveHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's protocol handler, except that a read timeout ends the session as lost.

    amqtt's reader loop calls ``handle_read_timeout`` once the client has been
    silent for ``session.keep_alive`` seconds; this one does what the reader
    loop does on EOF (``handle_connection_closed``), so the broker's client loop
    sees an abnormal disconnect, publishes the will and stops the handler
    (which cancels the reader loop and closes the socket).
    """

    _lost_task: asyncio.Task[None] | None = None

    def handle_read_timeout(self) -> None:
        if self._lost_task is not None:
            return
        session = self.session
        _LOGGER.info(
            "client %s silent for %s s: closing its connection as lost",
            session.client_id if session is not None else "?",
            session.keep_alive if session is not None else "?",
        )
        self._lost_task = asyncio.ensure_future(self.handle_connection_closed())


class PacketTooLarge(AMQTTError):  # type: ignore[misc]
    """A client announced a packet larger than the broker accepts (defect 6)."""


class _BoundedReader:
    """An asyncio StreamReader whose exact reads are bounded: amqtt reads a packet's body in one.

    A larger read raises PacketTooLarge before any of it is buffered; amqtt's
    reader loop then ends the connection (as lost: a will is published).
    """

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit

    async def readexactly(self, n: int) -> bytes:
        if n > self._limit:
            raise PacketTooLarge(f"packet of {n} bytes exceeds the broker's {self._limit}-byte limit")
        return await self._reader.readexactly(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class FleetBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the retained-message leak, the connect race and keepalive guarded."""

    #: Largest packet accepted (defect 6); a test may lower it.
    max_packet_bytes: int = MAX_PACKET_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotDict()
        self._streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Start listening (amqtt's start clears the table, so re-install the guard)."""
        await super().start()
        self._subscriptions = _SnapshotDict(self._subscriptions)

    async def shutdown(self) -> None:
        """Stop accepting, end every session, then close any connection still open.

        amqtt closes its listeners last, so a client reconnecting meanwhile got in
        and its socket outlived the broker; and a connection still in its CONNECT
        when the sessions were ended had nobody left to close it.
        """
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        try:
            # amqtt's shutdown can hang (a session it cannot clean up): bounded, so
            # that every connection is closed below whatever happens, and clients
            # never stay connected to a broker that is gone.
            await asyncio.wait_for(super().shutdown(), _SHUTDOWN_TIMEOUT_S)
        except asyncio.TimeoutError:
            _LOGGER.warning(
                "broker shutdown unfinished after %g s: closing every connection", _SHUTDOWN_TIMEOUT_S
            )
        finally:
            for writer in list(self._streams):
                writer.transport.abort()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """Serve one TCP connection; whatever happens, its socket is closed at the end."""
        self._streams.add(writer)
        try:
            bounded: Any = _BoundedReader(reader, self.max_packet_bytes)
            await super().stream_connected(bounded, writer, listener_name)
        finally:
            self._streams.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _read_connect(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Read the CONNECT like amqtt's ``_initialize_client_session``, but authenticate first.

        Defect 4: amqtt deletes (clean session) or adopts (persistent session) the
        existing session of the CONNECT's client id before it checks the password,
        so an anonymous client that reuses the hub's client id silently wiped the
        hub's subscriptions. Here a refused client gets its CONNACK refusal and
        nothing else; so does a client that claims an id held by another user.
        """
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError:
            await writer.close()
            raise
        authorized = await self._authenticate(session, None)
        if (
            authorized
            and session.username
            and session.client_id
            and not is_own_client_id(session.username, session.client_id)
        ):
            # Defect 5: ids are bound to users, so no credential takes over or squats another's.
            _LOGGER.warning(
                "refusing %s: client id %r is not its own (expected %r or %r)",
                session.username,
                session.client_id[:200],
                session.username,
                f"{session.username}{CLIENT_ID_SEPARATOR}...",
            )
            authorized = False
        held = self._sessions.get(session.client_id) if session.client_id else None
        if authorized and held is not None and held[0].username != session.username:
            _LOGGER.warning(
                "refusing %s: client id %r belongs to another user", session.username, session.client_id
            )
            authorized = False
        if not authorized:
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError(f"client {session.client_id!r} refused before touching any session")
        if session.clean_session:
            if held is not None and held[0].transitions.is_connected():
                # Defect 7: a clean-session CONNECT dropped the older connection's session
                # but left that connection open and publishing. One connection per client
                # id, as mosquitto does: the older one is ended (its will is published).
                _LOGGER.info("client id %r connected again: ending its older connection", session.client_id)
                await held[1].handle_connection_closed()
                for _ in range(200):  # its session loop stops it (and sends its will) on its own task
                    if not held[0].transitions.is_connected():
                        break
                    await asyncio.sleep(0.01)
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = own_client_id(session.username, gen_client_id())
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        return handler, session

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await self._read_connect(reader, writer, remote_address, remote_port)
        # defect 3: the session's keep_alive is what the reader loop waits for
        # (amqtt sets it afresh from every CONNECT); 0 means no keepalive at all.
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE)
        handler.__class__ = _KeepaliveHandler
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        granted = [
            qos
            for sub_session, qos in self._subscriptions.get(topic_filter, [])
            if sub_session.client_id == session.client_id
        ]
        if not granted:
            return  # defect 1: never replay retained messages the session did not ask for
        await super()._publish_retained_messages_for_subscription((topic_filter, granted[0]), session)


def default_config() -> dict[str, Any]:
    """broker_config/amqtt.yaml as shipped."""
    text = resources.files("broker_config").joinpath("amqtt.yaml").read_text(encoding="utf-8")
    return load_config_text(text)


def load_config_text(text: str) -> dict[str, Any]:
    """Parse an amqtt YAML config; ConfigError if it is not a mapping."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid broker config: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError("invalid broker config: not a mapping")
    return config


def load_config(path: Path | None, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """The broker config from ``path`` (or the default), with the bind address overridden."""
    if path is None:
        config = default_config()
    else:
        try:
            config = load_config_text(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read broker config {path}: {exc}") from exc
    listeners = config.setdefault("listeners", {})
    default = listeners.setdefault("default", {"type": "tcp"})
    bind = str(default.get("bind", "127.0.0.1:1883"))
    old_host, _, old_port = bind.rpartition(":")
    default["bind"] = f"{host or old_host or '127.0.0.1'}:{port if port is not None else old_port}"
    return config


class BrokerThread:
    """A FleetBroker on its own event loop in a daemon thread (tests, demo).

    Blocking start/stop: call from synchronous code or through asyncio.to_thread.
    One instance runs once; to restart a broker on the same port, start a new one.

    Args:
        config: amqtt config (see ``load_config``).
        broker_class: the broker to run; amqtt's plain ``Broker`` lets a test
            show a defect that FleetBroker guards.
    """

    def __init__(self, config: dict[str, Any], broker_class: type[Broker] = FleetBroker) -> None:
        self._config = config
        self._broker_class = broker_class
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-broker", daemon=True)
        self._broker: Broker | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and wait until it listens."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout)

    async def _start(self) -> None:
        self._broker = self._broker_class(self._config, loop=self._loop)
        await self._broker.start()

    async def _shutdown(self) -> None:
        assert self._broker is not None  # noqa: S101 - only after start()
        try:
            await self._broker.shutdown()
        finally:
            # Whatever the broker left running (a connection in its CONNECT) ends
            # now, while the loop still runs, so nothing is left to close later.
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            if rest:
                await asyncio.wait(rest, timeout=5)
            # amqtt leaves the sockets of sessions still open at shutdown (a client that
            # never disconnected): closed here, on the loop, or they are only found by the
            # garbage collector later, in another test's time, as "unclosed transport".
            loop = asyncio.get_running_loop()
            for transport in list(getattr(loop, "_transports", {}).values()):
                if transport is not None and not transport.is_closing():
                    transport.abort()
            await asyncio.sleep(0)  # their connection_lost callbacks run

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the broker down and end its thread."""
        if self._broker is not None:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def broker(self) -> Broker:
        """The running broker (for tests that look inside)."""
        assert self._broker is not None  # noqa: S101 - only after start()
        return self._broker
