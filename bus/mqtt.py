"""The one MQTT client of fleetbus: paho-mqtt 2.x driven by the asyncio loop.

paho's callbacks only enqueue; callers ``async for msg in client.messages()``.
The socket is served by the running event loop (paho's external-loop API:
``add_reader``/``add_writer``), so one process can hold a thousand clients on
one epoll selector (FINDINGS.md: ``loop_start`` stops at ~338 per process).

What every client gets (DESIGN section 3.8, FINDINGS.md):
- TCP_NODELAY after every (re)connect: QoS 1 round trips of 0.2-0.5 ms, not 40-90 ms.
- QoS 1 publishes through a bounded in-flight window: paho's 16-bit message ids
  never wrap while messages are outstanding.
- Reconnect with exponential backoff and jitter; subscriptions are renewed and
  ``on_connect`` hooks (births) run again after every reconnect.
- A last will built fresh before every connect (each connection its own session).
- ``mqtt://`` and ``mqtts://`` URLs with user, password and TLS; a broker that
  refuses the credentials or a certificate that does not verify ends the first
  connect at once with a BusError naming the reason (no retrying until timeout).
- ``subscribe`` returns once the broker acknowledged it (BusError if refused).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bus.errors import BusError, ConfigError
from bus.topics import own_client_id

__all__ = ["BrokerUrl", "Message", "MqttClient", "Will", "parse_broker_url", "redact_url_text"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://[user:pass@]host:port`` or ``mqtts://...`` URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


_USERINFO = re.compile(r"(?P<head>^|[\s'\"(]|://)(?P<user>[^\s:/@'\"]*):[^\s/@'\"]*@")


def redact_url_text(text: str) -> str:
    """``text`` with the password of any ``user:password@`` in it shown as ``***``.

    For URLs too broken to parse (they still carry the password).
    """
    return _USERINFO.sub(lambda m: f"{m['head']}{m['user']}:***@", text)


def valid_broker_url(value: str) -> str:
    """Return ``value`` if it is a broker URL; ValueError with the reason (for pydantic)."""
    try:
        parse_broker_url(value)
    except ConfigError as exc:
        raise ValueError(exc.reason) from exc
    return value


def parse_broker_url(url: str, ca_file: str | None = None) -> BrokerUrl:
    """Parse a broker URL; ConfigError with a one-line reason if it is not one.

    ``mqtts://host:port?ca=/path/ca.pem`` names the CA that signs the server
    certificate; without it the system's trust store is used.
    """
    shown = redact_url_text(url)  # an error message never carries the password
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid broker URL {shown!r}: {redact_url_text(str(exc))}") from exc
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"invalid broker URL {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"invalid broker URL {shown!r}: no host")
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    return BrokerUrl(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=ca_file or (unquote(query["ca"]) if "ca" in query else None),
    )


@dataclass(frozen=True)
class Message:
    """One received MQTT message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Will:
    """A last will: published by the broker when the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


ConnectHook = Callable[[], Awaitable[None]]

#: CONNACK refusals that retrying cannot cure (paho's names for MQTT 3.1.1 codes 4 and 5).
_AUTH_REFUSALS = frozenset({"Bad user name or password", "Not authorized"})


class _Paho(paho.Client):
    """paho's client with a lighter PUBACK path for MQTT 3.1.1.

    For every PUBACK paho decodes MQTT 5 properties and builds a ``ReasonCode``
    and a ``Properties`` object, even on a 3.1.1 connection, where a PUBACK is
    just the packet id: about a third of the simulator's cost per published
    report. A 3.1.1 PUBACK here settles the message with shared "success"
    objects; anything else goes through paho's own code.
    """

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == paho.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho wraps the TCP socket and shakes hands inside ``connect``; when the
    handshake fails (wrong CA, wrong host) it drops the socket unclosed.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


@dataclass
class _Pending:
    future: asyncio.Future[None] | None
    released: bool = False


@dataclass
class _SubscribeRequest:
    """A SUBSCRIBE or UNSUBSCRIBE awaiting the broker's acknowledgement."""

    topic_filter: str
    futures: list[asyncio.Future[None]]

    def settle(self, error: BusError | None = None) -> None:
        for future in self.futures:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


@dataclass
class _Stats:
    received: int = 0
    sent: int = 0
    dropped: int = 0
    reconnects: int = 0


class MqttClient:
    """An asyncio MQTT client; use as ``async with MqttClient(url) as client:``.

    Args:
        url: broker URL (``mqtt://`` or ``mqtts://``), or a parsed ``BrokerUrl``.
        client_id: MQTT client id; a random one by default. With a user in the URL it
            is prefixed ``user~`` unless it already is the user's (bus.topics).
        will: called before every connect attempt to build the last will.
        keepalive: MQTT keepalive in seconds.
        clean_session: MQTT 3.1.1 clean-session flag.
        max_inflight: QoS >= 1 publishes outstanding at once (the window).
        queue_limit: received messages buffered before the oldest QoS 0 ones are
            dropped (0 = unbounded).
        connect_timeout: how long ``__aenter__`` waits for the first CONNACK.
    """

    def __init__(
        self,
        url: str | BrokerUrl,
        *,
        client_id: str | None = None,
        will: Callable[[], Will | None] | None = None,
        keepalive: int = 10,
        clean_session: bool = True,
        max_inflight: int = 1000,
        queue_limit: int = 0,
        connect_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.1, 10.0),
    ) -> None:
        self.url = url if isinstance(url, BrokerUrl) else parse_broker_url(url)
        # A broker with users binds client ids to them (bus.topics.is_own_client_id).
        self.client_id = own_client_id(self.url.username, client_id or f"fleet-{uuid.uuid4().hex[:12]}")
        self._will = will
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._queue_limit = queue_limit
        # paho's 16-bit message ids must never wrap while messages are outstanding.
        self._window = asyncio.Semaphore(min(max_inflight, 65000))
        self._pending: dict[int, _Pending] = {}
        self._subscriptions: dict[str, int] = {}
        self._acks: dict[int, _SubscribeRequest] = {}
        self._hooks: list[ConnectHook] = []
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._settled = asyncio.Event()
        self._fatal: BusError | None = None
        self._fail_fast = False
        self._ever_connected = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._sock: Any = None
        self._flush_scheduled = False
        self._writer_on = False
        self._renewed: list[asyncio.Future[None]] = []
        self._attempt_done = asyncio.Event()
        self.stats = _Stats()
        self._paho = _Paho(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        # Our window bounds what is outstanding, so paho's own limit is off (0): with a
        # limit, paho rescans every outstanding message on each PUBACK (quadratic in
        # the window: 0.7 s of CPU for the hub's 1000 commands of one rollout).
        self._paho.max_inflight_messages_set(0)
        if self.url.username:
            self._paho.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            try:
                context = ssl.create_default_context(cafile=self.url.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA file {self.url.ca_file}: {exc}") from exc
            context.sslsocket_class = _ClosingSSLSocket
            self._paho.tls_set_context(context)
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.on_publish = self._on_publish
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_unsubscribe = self._on_unsubscribe
        self._paho.on_socket_open = self._on_socket_open
        self._paho.on_socket_close = self._on_socket_close
        self._paho.on_socket_register_write = self._on_socket_register_write
        self._paho.on_socket_unregister_write = self._on_socket_unregister_write

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> MqttClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, wait: bool = True) -> None:
        """Connect (retrying with backoff); with ``wait``, until the first CONNACK.

        Subscriptions made before ``start`` are acknowledged by the broker by the
        time it returns, so a message published right after is not missed.

        Raises:
            BusError: ``wait`` and no connection within ``connect_timeout``, or
                the broker refused the credentials, or its TLS certificate did
                not verify (both at once: retrying cannot help).
        """
        self._loop = asyncio.get_running_loop()
        self._fail_fast = wait
        self._misc_task = asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}")
        self._reconnect_task = asyncio.create_task(
            self._connect_loop(), name=f"mqtt-connect-{self.client_id}"
        )
        if wait:
            try:
                await asyncio.wait_for(self._settled.wait(), self._connect_timeout)
            except asyncio.TimeoutError as exc:
                await self.close()
                raise BusError(
                    f"no connection to {self.url.redacted()} within {self._connect_timeout:g} s"
                ) from exc
            if self._fatal is not None:
                await self.close()
                raise self._fatal
            renewed, self._renewed = self._renewed, []
            if renewed:
                try:
                    await asyncio.wait_for(asyncio.gather(*renewed), self._connect_timeout)
                except (BusError, asyncio.TimeoutError) as exc:
                    await self.close()
                    reason = exc.reason if isinstance(exc, BusError) else "no acknowledgement in time"
                    raise BusError(f"subscribing at {self.url.redacted()} failed: {reason}") from exc

    async def close(self, publish_before: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly (no will); optionally publish one last message first."""
        if self._closing:
            return
        if publish_before is not None and self.is_connected:
            topic, payload, retain = publish_before
            with contextlib.suppress(BusError, asyncio.TimeoutError):
                await asyncio.wait_for(self.publish(topic, payload, qos=1, retain=retain, wait=True), 2)
        self._closing = True
        for task in (self._reconnect_task, self._misc_task, *self._hook_tasks):
            if task is not None:
                task.cancel()
        for task in (self._reconnect_task, self._misc_task, *self._hook_tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._sock is not None:
            self._paho.disconnect()
            # Let the DISCONNECT packet leave before the socket closes.
            with contextlib.suppress(Exception):
                self._paho.loop_write()
        self._drop_socket()
        for pending in self._pending.values():
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(BusError("client closed"))
            # Wakes a publisher blocked on the window; it sees _closing and raises.
            self._window.release()
        self._pending.clear()
        for request in self._acks.values():
            request.settle(BusError("client closed"))
        self._acks.clear()
        self._queue.put_nowait(None)  # ends every messages() iterator

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash or a pulled cable would.

        The broker publishes the last will; the client reconnects as after any
        loss. For fault tests and demos.
        """
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            # The plain socket's shutdown (also under TLS): FIN now, no DISCONNECT.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    @property
    def is_connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (again)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``hook`` after every successful (re)connect, after resubscribing."""
        self._hooks.append(hook)

    # ------------------------------------------------------------------ pub/sub

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect.

        While connected it returns once the broker acknowledged the subscription
        (if the connection drops meanwhile: once it is renewed after the
        reconnect); while disconnected it returns at once and the subscription
        is made on connect.

        Raises:
            BusError: the broker refused the subscription (an ACL, say), or the
                client closed meanwhile.
        """
        self._subscriptions[topic_filter] = qos
        if not self.is_connected:
            return
        future = asyncio.get_running_loop().create_future()
        self._send_subscribe(topic_filter, qos, [future])
        await future

    async def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription; returns once the broker acknowledged it (if connected)."""
        self._subscriptions.pop(topic_filter, None)
        if not self.is_connected:
            return
        future = asyncio.get_running_loop().create_future()
        rc, mid = self._paho.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected after all: nothing to undo on the broker
        self._acks[mid] = _SubscribeRequest(topic_filter, [future])
        await future

    def _send_subscribe(self, topic_filter: str, qos: int, futures: list[asyncio.Future[None]]) -> None:
        rc, mid = self._paho.subscribe(topic_filter, qos)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._acks[mid] = _SubscribeRequest(topic_filter, futures)
        elif futures:
            # Lost the connection in between: renewed (and acknowledged) after reconnect.
            self._acks[-id(futures[0])] = _SubscribeRequest(topic_filter, futures)

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
    ) -> None:
        """Publish; QoS >= 1 waits for a slot in the in-flight window.

        With ``wait`` it returns only when the broker acknowledged the message.
        While disconnected QoS >= 1 messages are queued and sent on reconnect.
        """
        if self._closing:
            raise BusError("client is closed")
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        if qos == 0:
            if self.is_connected:
                self._paho.publish(topic, data, qos=0, retain=retain)
                self.stats.sent += 1
            return
        await self._window.acquire()
        if self._is_closing():
            self._window.release()  # pass the wake-up on to the next blocked publisher
            raise BusError("client is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] | None = loop.create_future() if wait else None
        try:
            info = self._paho.publish(topic, data, qos=qos, retain=retain)
        except Exception:
            self._window.release()
            raise
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._window.release()
            raise BusError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self.stats.sent += 1
        # (is_published() raises while disconnected: the message waits in paho's queue.)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():
            self._window.release()
            if future is not None:
                future.set_result(None)
        else:
            self._pending[info.mid] = _Pending(future)
        if future is not None:
            await future

    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, in arrival order, until the client closes."""
        while True:
            message = await self._queue.get()
            if message is None:
                self._queue.put_nowait(None)  # for any other iterator
                return
            yield message

    def get_nowait(self) -> Message | None:
        """The next buffered message, or None."""
        try:
            message = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if message is None:
            self._queue.put_nowait(None)
        return message

    # ------------------------------------------------------------------ internals

    def _is_closing(self) -> bool:
        return self._closing

    async def _connect_loop(self, wait_first: bool = False) -> None:
        # After a loss the first attempt waits too (jittered), so a fleet does not
        # reconnect in lockstep after a broker restart, and the broker has seen the
        # old connection go (and published its will) before the new one arrives.
        delay = self._backoff[0]
        first = not wait_first
        while not self._closing:
            if not first:
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                delay = min(delay * 2, self._backoff[1])
            first = False
            will = self._will() if self._will else None
            self._paho.will_clear()
            if will is not None:
                self._paho.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
            try:
                # Blocking TCP (and TLS) connect: quick on a LAN or loopback, and
                # the loop has nothing else to serve for this client until it is done.
                rc = self._paho.connect(self.url.host, self.url.port, keepalive=self._keepalive)
            except ssl.SSLCertVerificationError as exc:
                self._refused(f"TLS certificate of {self.url.host} does not verify: {exc.verify_message}")
                if self._fatal is not None:
                    return
                continue
            except (OSError, ssl.SSLError, ValueError) as exc:
                _LOGGER.info("connect to %s failed: %s", self.url.redacted(), exc)
                continue
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _LOGGER.info("connect to %s failed: %s", self.url.redacted(), paho.error_string(rc))
                continue
            # Wait for the CONNACK or the loss of this attempt.
            self._attempt_done = asyncio.Event()
            await self._attempt_done.wait()
            if self.is_connected:
                return
            self._drop_socket()
            if self._fatal is not None:
                return

    def _refused(self, reason: str) -> None:
        """A refusal retrying cannot cure: fatal for the first connect of ``start(wait=True)``."""
        message = f"{self.url.redacted()} refused the connection: {reason}"
        if self._fail_fast and not self._ever_connected:
            self._fatal = BusError(message)
            self._settled.set()
        else:
            _LOGGER.warning("%s (retrying)", message)

    def _restart_connect_loop(self) -> None:
        if self._closing or self._loop is None:
            return
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return
        self.stats.reconnects += 1
        self._reconnect_task = self._loop.create_task(
            self._connect_loop(wait_first=True), name=f"mqtt-connect-{self.client_id}"
        )

    async def _misc_loop(self) -> None:
        # paho pings once ``keepalive`` has passed since the last packet, but only
        # when loop_misc runs: run it often enough that the ping leaves well within
        # the broker's 1.5 x keepalive even when the loop is busy (a fixed 1 s
        # period left a keepalive=1 client 0.5 s of margin).
        period = min(1.0, max(0.05, self._keepalive / 4)) if self._keepalive > 0 else 1.0
        while True:
            await asyncio.sleep(period)
            if self._sock is not None:
                self._paho.loop_misc()

    def _drop_socket(self) -> None:
        sock = self._sock
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._sock = None
        self._writer_on = False
        with contextlib.suppress(Exception):
            self._paho._sock_close()

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        assert self._loop is not None  # noqa: S101 - set in start()
        self._sock = sock
        self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None
            self._writer_on = False

    def _on_socket_register_write(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        # paho has bytes to send. Send them once this loop iteration is over rather
        # than registering the socket for writability first: every publish (and
        # PUBACK) of the iteration leaves in one go, and no epoll_ctl pair is spent
        # per message (a thousand clients publishing in one process, the simulator).
        # The socket is watched for writability only when the kernel buffer is full.
        if self._loop is None or self._flush_scheduled:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _on_socket_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._writer_on and sock is self._sock:
            self._loop.remove_writer(sock)
            self._writer_on = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self._sock
        if sock is None or self._loop is None:
            return  # no connection: paho sends what is queued after the next connect
        _coalesce(self._paho._out_packet)
        self._paho.loop_write()
        # paho still believes the socket registered for writing while bytes are left
        # (the kernel buffer is full): wait for writability then.
        if self._sock is sock and self._paho.want_write() and not self._writer_on:
            self._loop.add_writer(sock, self._write)
            self._writer_on = True

    def _read(self) -> None:
        self._paho.loop_read(max_packets=100)

    def _write(self) -> None:
        _coalesce(self._paho._out_packet)
        self._paho.loop_write()

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason: Any,
        _properties: Any,
    ) -> None:
        if reason.is_failure:
            if str(reason) in _AUTH_REFUSALS:
                self._refused(str(reason))
            else:
                _LOGGER.warning("broker %s refused connection: %s", self.url.redacted(), reason)
            self._finish_attempt()
            return
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Requests of the lost connection are void; their waiters wait for the renewal.
        waiting: dict[str, list[asyncio.Future[None]]] = {}
        for request in self._acks.values():
            waiting.setdefault(request.topic_filter, []).extend(request.futures)
        self._acks.clear()
        for topic_filter, qos in self._subscriptions.items():
            futures = waiting.pop(topic_filter, [])
            if self._loop is not None and self._fail_fast and not self._ever_connected:
                renewed = self._loop.create_future()  # awaited by start()
                futures.append(renewed)
                self._renewed.append(renewed)
            self._send_subscribe(topic_filter, qos, futures)
        for futures in waiting.values():  # unsubscribed meanwhile: nothing to wait for
            _SubscribeRequest("", futures).settle()
        self._ever_connected = True
        self._connected.set()
        self._settled.set()
        self._finish_attempt()
        _LOGGER.debug("connected to %s as %s", self.url.redacted(), self.client_id)
        for hook in self._hooks:
            task = asyncio.ensure_future(self._run_hook(hook))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    async def _run_hook(self, hook: ConnectHook) -> None:
        try:
            await hook()
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("on_connect hook failed")

    def _finish_attempt(self) -> None:
        self._attempt_done.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason: Any,
        _properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._finish_attempt()
        if self._closing:
            return
        if was_connected:
            _LOGGER.info("lost connection to %s: %s", self.url.redacted(), reason)
            if self._loop is not None:
                self._loop.call_soon(self._after_loss)

    def _after_loss(self) -> None:
        self._drop_socket()
        self._restart_connect_loop()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.received += 1
        if self._queue_limit and self._queue.qsize() >= self._queue_limit and msg.qos == 0:
            self.stats.dropped += 1
            return
        self._queue.put_nowait(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[Any], _properties: Any
    ) -> None:
        request = self._acks.pop(mid, None)
        if request is None:
            return
        refused = any(reason.is_failure for reason in reasons)
        if not refused:
            request.settle()
            return
        # Not renewed on reconnect either: the broker's answer will not change.
        self._subscriptions.pop(request.topic_filter, None)
        _LOGGER.warning("broker %s refused subscription to %s", self.url.redacted(), request.topic_filter)
        request.settle(BusError(f"{self.url.redacted()} refused subscription to {request.topic_filter}"))

    def _on_unsubscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, _reasons: Any, _properties: Any
    ) -> None:
        request = self._acks.pop(mid, None)
        if request is not None:
            request.settle()

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _properties: Any
    ) -> None:
        pending = self._pending.pop(mid, None)
        if pending is None:
            return
        self._window.release()
        if pending.future is not None and not pending.future.done():
            pending.future.set_result(None)


_PUBLISH = 0x30
_DISCONNECT = 0xE0
#: Largest packet ``_coalesce`` builds: one send() rarely takes more on loopback anyway.
_COALESCE_BYTES = 64 * 1024


def _needs_bookkeeping(packet: paho._OutPacket) -> bool:
    """Whether paho acts on it once written: a QoS 0 PUBLISH (on_publish), a DISCONNECT (close)."""
    kind = packet["command"] & 0xF0
    return bool((kind == _PUBLISH and packet["qos"] == 0) or kind == _DISCONNECT)


def _coalesce(queue: collections.deque[paho._OutPacket]) -> None:
    """Merge runs of queued packets into one, so that paho writes them with one send().

    paho writes its queue a packet per ``send()``: a hub acknowledging a thousand
    status reports makes a thousand system calls, each pushing one PUBACK through
    the TCP stack. Packets paho does nothing with once written (QoS 1 PUBLISH,
    PUBACK, SUBSCRIBE, PINGREQ ...) are joined, in order, into packets of up to
    64 KiB; the rest stay as they are. paho's own partial-write handling covers
    the joined bytes; a reconnect drops the queue and re-sends unacknowledged
    QoS 1 messages from its own records, as before.
    """
    if len(queue) < 2:
        return
    merged: list[paho._OutPacket] = []
    run: list[paho._OutPacket] = []
    size = 0

    def close_run() -> None:
        nonlocal size
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            data = b"".join(bytes(p["packet"][p["pos"] :]) for p in run)
            merged.append(
                {
                    "command": run[0]["command"],
                    "mid": 0,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(data),
                    "packet": data,
                    "info": None,
                }
            )
        run.clear()
        size = 0

    for packet in queue:
        if _needs_bookkeeping(packet):
            close_run()
            merged.append(packet)
            continue
        length = packet["to_process"]
        if run and size + length > _COALESCE_BYTES:
            close_run()
        run.append(packet)
        size += length
    close_run()
    if len(merged) < len(queue):
        queue.clear()
        queue.extend(merged)
