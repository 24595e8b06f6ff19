"""The one MQTT client of fleetbus: paho-mqtt 2.x driven by the asyncio loop.

paho's callbacks only enqueue; callers ``async for msg in client.messages()``.
The socket is served by the running event loop (paho's external-loop API:
``add_reader``/``add_writer``), so one process can hold a thousand clients on
one epoll selector (FINDINGS.md: ``loop_start`` stops at ~338 per process).

What every client gets (DESIGN section 3.8, FINDINGS.md):
- TCP_NODELAY after every (re)connect: QoS 1 round trips of 0.2-0.5 ms, not 40-90 ms.
- QoS 1 publishes through a bounded in-flight window: paho's 16-bit message ids
  never wrap while messages are outstanding.
- Several broker URLs (a cluster: ``mqtt://a:1883,mqtt://b:1883``), each with its own
  credentials and TLS options: the client connects to one (``spread``: a random
  one first, to share a fleet out) and moves on to the next when its connection
  fails or drops.
- Reconnect with exponential backoff and jitter; subscriptions are renewed and
  ``on_connect`` hooks (births) run again after every reconnect, once the broker
  has granted every subscription.
- A refused subscription (SUBACK 0x80: an ACL, or a cluster that cannot create it
  just now) is never dropped: it is retried with backoff, and after repeated
  refusals on one server a client with several URLs moves on to the next.
  ``missing_subscriptions`` names what is not granted at the moment.
- A last will built fresh before every connect (each connection its own session).
- ``mqtt://`` and ``mqtts://`` URLs with user, password and TLS; a broker that
  refuses the credentials or a certificate that does not verify ends the first
  connect at once with a BusError naming the reason (no retrying until timeout),
  once every URL of the list has refused.
- ``subscribe`` returns once the broker acknowledged it (BusError if refused).
- URL options (query): ``ca=/path/ca.pem``; ``kind=nats`` (a NATS server's MQTT
  gateway: topics must not contain ``.``, and subscriptions default to QoS 0,
  which it never refused in our measurements); ``subqos=0|1`` (the QoS asked for
  every subscription, capping what the caller asks).
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
import time
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

__all__ = [
    "BrokerUrl",
    "Message",
    "MqttClient",
    "Will",
    "check_topic_name",
    "parse_broker_url",
    "parse_broker_urls",
    "redact_url_text",
    "redacted_urls",
    "valid_broker_url",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

#: Broker kinds a URL may name (``?kind=``) and the characters each cannot carry in a topic level.
BROKER_KINDS: dict[str, str] = {"mqtt": "", "nats": "."}


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://[user:pass@]host:port`` or ``mqtts://...`` URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    kind: str = "mqtt"
    sub_qos: int | None = None

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"

    @property
    def subscription_qos(self) -> int | None:
        """The QoS every subscription asks for at this URL (None: what the caller asks)."""
        if self.sub_qos is not None:
            return self.sub_qos
        return 0 if self.kind == "nats" else None


_USERINFO = re.compile(r"(?P<head>^|[\s'\"(]|://)(?P<user>[^\s:/@'\"]*):[^\s/@'\"]*@")


def redact_url_text(text: str) -> str:
    """``text`` with the password of any ``user:password@`` in it shown as ``***``.

    For URLs too broken to parse (they still carry the password).
    """
    return _USERINFO.sub(lambda m: f"{m['head']}{m['user']}:***@", text)


def valid_broker_url(value: str) -> str:
    """Return ``value`` if it is a broker URL or a comma-separated list of them; ValueError if not."""
    try:
        parse_broker_urls(value)
    except ConfigError as exc:
        raise ValueError(exc.reason) from exc
    return value


def parse_broker_urls(text: str) -> tuple[BrokerUrl, ...]:
    """Parse one broker URL or a comma-separated list of them (the servers of a cluster).

    A comma inside a password must be written ``%2C``. ConfigError naming the bad entry.
    """
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ConfigError("invalid broker URL '': empty")
    if not all(entries):
        raise ConfigError(f"invalid broker URL list {_shown_list(text)!r}: an empty entry")
    urls = tuple(parse_broker_url(entry) for entry in entries)
    seen: set[tuple[str, int]] = set()
    for url in urls:
        if (url.host, url.port) in seen:
            raise ConfigError(f"invalid broker URL list: {url.host}:{url.port} is listed twice")
        seen.add((url.host, url.port))
    return urls


def redacted_urls(text: str) -> str:
    """A broker URL list without its passwords, for logs and messages (ConfigError if invalid)."""
    return ",".join(url.redacted() for url in parse_broker_urls(text))


def _shown_list(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


def parse_broker_url(url: str, ca_file: str | None = None) -> BrokerUrl:
    """Parse one broker URL; ConfigError with a one-line reason if it is not one.

    ``mqtts://host:port?ca=/path/ca.pem`` names the CA that signs the server
    certificate; without it the system's trust store is used. ``?kind=nats``
    says the server is a NATS MQTT gateway; ``?subqos=0`` sets the QoS of every
    subscription (module docstring).
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
    kind = unquote(query.get("kind", "mqtt"))
    if kind not in BROKER_KINDS:
        raise ConfigError(f"invalid broker URL {url!r}: kind must be one of {', '.join(BROKER_KINDS)}")
    sub_qos: int | None = None
    if "subqos" in query:
        if query["subqos"] not in ("0", "1"):
            raise ConfigError(f"invalid broker URL {url!r}: subqos must be 0 or 1")
        sub_qos = int(query["subqos"])
    return BrokerUrl(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=ca_file or (unquote(query["ca"]) if "ca" in query else None),
        kind=kind,
        sub_qos=sub_qos,
    )


def check_topic_name(urls: str | tuple[BrokerUrl, ...], what: str, value: str) -> str:
    """``value`` (a node id, a topic prefix) if every broker of ``urls`` can carry it in a topic.

    A NATS MQTT gateway refuses ``.`` in topics (it maps topic levels to NATS
    subjects, whose separator is ``.``). ConfigError naming the character and
    the broker kind; the value is returned unchanged otherwise.
    """
    parsed = parse_broker_urls(urls) if isinstance(urls, str) else urls
    for url in parsed:
        for char in BROKER_KINDS[url.kind]:
            if char in value:
                raise ConfigError(
                    f"{what} {value[:80]!r} contains {char!r}, which a {url.kind} broker "
                    f"({url.redacted()}) refuses in topics: choose another name"
                )
    return value


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
    """paho's client with a buffered read and a lighter PUBACK path for MQTT 3.1.1.

    paho reads a packet with three or more ``recv`` calls (one byte of type, the
    length bytes one by one, then the rest), and its ``loop_read`` takes one packet
    per call whatever ``max_packets`` says: at 2,000 heartbeats a second that was a
    wake-up of the event loop and four system calls per message. Here ``recv``
    takes what the socket holds (up to 64 KiB) and paho's reads are served from it;
    ``MqttClient._read`` goes on while bytes are buffered (``buffered``).

    For every PUBACK paho decodes MQTT 5 properties and builds a ``ReasonCode``
    and a ``Properties`` object, even on a 3.1.1 connection, where a PUBACK is
    just the packet id: about a third of the simulator's cost per published
    report. A 3.1.1 PUBACK here settles the message with shared "success"
    objects; anything else goes through paho's own code.
    """

    _rbuf = b""  # bytes read from the socket, paho's from ``_rpos`` on
    _rpos = 0
    _rsock: object = None  # the socket they came from

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:  # a new connection (or none): nothing old is served
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(_RECV_BYTES)  # BlockingIOError, ConnectionError: as paho's
            if not data:
                return data  # the connection closed
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def buffered(self) -> bool:
        """Bytes of the current connection read from the socket and not yet taken by paho."""
        return self._rsock is self._sock and self._rpos < len(self._rbuf)

    def take_buffered(self, limit: int) -> int:
        """Handle up to ``limit`` whole packets of the buffer without paho's reader; how many.

        paho reads a packet through a state machine of dictionary entries, one
        ``_sock_recv`` for its type, one per length byte and one for the rest:
        about half of what a heartbeat costs the hub. On an MQTT 3.1.1 connection,
        whole PUBLISH packets of QoS 0 or 1 and PUBACKs waiting in the buffer are
        read here in one pass and handled as ``_handle_publish`` and
        ``_handle_pubackcomp`` do. The first packet that is anything else, not whole
        yet, or odd (a malformed length, a topic that is not UTF-8) stops the pass:
        paho's ``loop_read`` takes it, as before.
        """
        deliver = self.deliver
        if (
            deliver is None
            or self._protocol == paho.MQTTv5
            or self._manual_ack
            or self._rsock is not self._sock
            or self._in_packet["command"] != 0  # paho is in the middle of a packet
        ):
            return 0
        buf, pos, size = self._rbuf, self._rpos, len(self._rbuf)
        taken = 0
        while taken < limit and pos < size:
            header = buf[pos]
            kind = header & 0xF0
            if kind != 0x30 and kind != 0x40:  # PUBLISH, PUBACK
                break
            start, length, shift = pos + 1, 0, 0
            while start < size and shift < 28:
                byte = buf[start]
                length |= (byte & 0x7F) << shift
                start += 1
                shift += 7
                if byte < 0x80:
                    break
            else:
                break  # the length is not whole yet (or longer than 4 bytes: paho says so)
            end = start + length
            if end > size:
                break  # the rest of the packet is not here yet
            if kind == 0x40:
                if length != 2 or header != 0x40:
                    break
                self._rpos = pos = end
                mid = (buf[start] << 8) | buf[start + 1]
                with self._out_message_mutex:
                    if mid in self._out_messages:
                        self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
            else:
                qos = (header & 0x06) >> 1
                topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1]) if length >= 2 else end + 1
                payload_at = topic_end + 2 * qos
                if qos > 1 or payload_at > end:
                    break
                try:
                    topic = buf[start + 2 : topic_end].decode("utf-8")
                except UnicodeDecodeError:
                    break
                self._rpos = pos = end  # (before delivering: whatever happens there, this one is taken)
                deliver(topic, buf[payload_at:end], qos, bool(header & 0x01))
                if qos:
                    self._send_puback((buf[topic_end] << 8) | buf[topic_end + 1])
            taken += 1
        if taken:
            with self._msgtime_mutex:
                self._last_bytes_received = time.monotonic()
        return taken

    #: ``deliver(topic, payload, qos, retain)``: where a 3.1.1 PUBLISH of QoS 0 or 1 goes
    #: straight to, without paho's ``MQTTMessage`` (with its lock), log line and filter
    #: match per message; None: paho's ``on_message``.
    deliver: Callable[[str, bytes, int, bool], None] | None = None

    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet: bytes | bytearray = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        deliver = self.deliver
        if deliver is None or qos > 1 or self._protocol == paho.MQTTv5 or self._manual_ack or len(packet) < 2:
            return super()._handle_publish()
        end = 2 + ((packet[0] << 8) | packet[1])
        mid = 0
        if qos:
            if len(packet) < end + 2:
                return super()._handle_publish()  # (paho's answer to a malformed packet)
            mid = (packet[end] << 8) | packet[end + 1]
        try:
            topic = packet[2:end].decode("utf-8")
        except UnicodeDecodeError:
            return super()._handle_publish()
        deliver(topic, bytes(packet[end + 2 * qos :]), qos, bool(header & 0x01))
        return self._send_puback(mid) if qos else MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == paho.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


#: How much one ``recv`` of ``_Paho`` may take.
_RECV_BYTES = 65536
#: Packets read per wake-up of the event loop at most (then other work gets its turn).
_PACKETS_PER_READ = 1000

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
        url: broker URL (``mqtt://`` or ``mqtts://``), a comma-separated list of
            them (a cluster), or parsed ``BrokerUrl``s.
        client_id: MQTT client id; a random one by default. With a user in the URL it
            is prefixed ``user~`` unless it already is the user's (bus.topics).
        will: called before every connect attempt to build the last will.
        keepalive: MQTT keepalive in seconds.
        clean_session: MQTT 3.1.1 clean-session flag.
        max_inflight: QoS >= 1 publishes outstanding at once (the window).
        queue_limit: received messages buffered before an incoming QoS 0 message
            is dropped (the newest, not a buffered one; counted in
            ``stats.dropped``); QoS 1 and 2 messages are always buffered, even past
            it (0 = unbounded).
        connect_timeout: how long ``__aenter__`` waits for the first CONNACK (and
            for every subscription made before it to be granted).
        spread: start at a random URL of the list (agents: shares a fleet out
            over a cluster); else at the first.
        sub_qos: the QoS asked for every subscription (capping what ``subscribe``
            asks); None: the URL's ``subqos``/``kind``, else what is asked.
        reconnect: False: once connected, the first loss closes the client for good
            (``lost`` is set) instead of reconnecting: a connection that holds a
            role (the active hub's, DESIGN 3.9) must never come back by itself.
    """

    def __init__(
        self,
        url: str | BrokerUrl | tuple[BrokerUrl, ...],
        *,
        client_id: str | None = None,
        will: Callable[[], Will | None] | None = None,
        keepalive: int = 10,
        clean_session: bool = True,
        max_inflight: int = 1000,
        queue_limit: int = 0,
        connect_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.1, 10.0),
        spread: bool = False,
        sub_qos: int | None = None,
        reconnect: bool = True,
    ) -> None:
        self._reconnect = reconnect
        #: Set when a client made with ``reconnect=False`` lost its connection (and closed).
        self.lost = asyncio.Event()
        self._loss_task: asyncio.Task[None] | None = None
        if isinstance(url, BrokerUrl):
            self.urls: tuple[BrokerUrl, ...] = (url,)
        elif isinstance(url, str):
            self.urls = parse_broker_urls(url)
        else:
            self.urls = tuple(url)
        if not self.urls:
            raise ConfigError("no broker URL")
        self._index = random.randrange(len(self.urls)) if spread else 0  # noqa: S311 - load spreading
        self._sub_qos = sub_qos
        # Characters some server of the list cannot carry in a topic ("." at NATS).
        self._forbidden = "".join(sorted({c for u in self.urls for c in BROKER_KINDS[u.kind]}))
        # A broker with users binds client ids to them (bus.topics.is_own_client_id): the id
        # is made for each URL's user when it is tried (the servers of one cluster usually
        # share one user; reply topics are named after the first URL's).
        self._wanted_id = client_id or f"fleet-{uuid.uuid4().hex[:12]}"
        self.client_id = own_client_id(self.urls[self._index].username, self._wanted_id)
        self._will = will
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._queue_limit = queue_limit
        # paho's 16-bit message ids must never wrap while messages are outstanding.
        self._window = asyncio.Semaphore(min(max_inflight, 65000))
        self._pending: dict[int, _Pending] = {}
        self._subscriptions: dict[str, int] = {}
        self._granted: set[str] = set()
        self._optional: set[str] = set()  # wanted, retried, but nothing waits for them
        self._refusals: dict[str, int] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._connection = 0
        self._complete = asyncio.Event()
        self._hooks_due = False
        self._last_refusal: str | None = None
        self._refused_urls: dict[int, str] = {}
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
        # One TLS context per CA (the servers of a cluster share theirs: one per client, as before).
        self._tls: dict[int, ssl.SSLContext] = {}
        contexts: dict[str | None, ssl.SSLContext] = {}
        for index, each in enumerate(self.urls):
            if not each.tls:
                continue
            if each.ca_file not in contexts:
                try:
                    context = ssl.create_default_context(cafile=each.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load CA file {each.ca_file}: {exc}") from exc
                context.sslsocket_class = _ClosingSSLSocket
                contexts[each.ca_file] = context
            self._tls[index] = contexts[each.ca_file]
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.deliver = self._deliver
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
                refusals = "; ".join(self._refused_urls[i] for i in sorted(self._refused_urls))
                await self.close()
                raise BusError(
                    f"no connection to {self.redacted_urls()} within {self._connect_timeout:g} s"
                    + (f" ({refusals})" if refusals else "")
                ) from exc
            if self._fatal is not None:
                await self.close()
                raise self._fatal
            if self._subscriptions:
                # Refused subscriptions are retried meanwhile (a cluster may grant them in a moment).
                try:
                    await asyncio.wait_for(self._complete.wait(), self._connect_timeout)
                except asyncio.TimeoutError as exc:
                    await self.close()
                    reason = self._last_refusal or "no acknowledgement in time"
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
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
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

    @property
    def url(self) -> BrokerUrl:
        """The URL of the server connected to (or tried next)."""
        return self.urls[self._index]

    def redacted_urls(self) -> str:
        """Every URL of the list, without passwords."""
        return ",".join(url.redacted() for url in self.urls)

    @property
    def missing_subscriptions(self) -> tuple[str, ...]:
        """Subscriptions the broker has not granted on the current connection (all, while disconnected).

        Optional ones are left out: neither ``on_connect`` hooks nor callers wait for them.
        """
        return tuple(t for t in self._subscriptions if t not in self._granted and t not in self._optional)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (again)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``hook`` after every successful (re)connect, once every subscription is granted."""
        self._hooks.append(hook)

    # ------------------------------------------------------------------ pub/sub

    async def subscribe(self, topic_filter: str, qos: int = 1, *, optional: bool = False) -> None:
        """Subscribe now and after every reconnect.

        ``optional``: the client is complete without it (births are not held back
        while the broker refuses it, e.g. under an older ACL); still retried.

        While connected it returns once the broker acknowledged the subscription
        (if the connection drops meanwhile: once it is renewed after the
        reconnect); while disconnected it returns at once and the subscription
        is made on connect.

        Raises:
            BusError: the broker refused the subscription (an ACL, say; it stays
                wanted and is retried with backoff until ``unsubscribe``), or the
                client closed meanwhile.
            ConfigError: the topic has a character the broker cannot carry.
        """
        check_topic_name(self.urls, "topic filter", topic_filter)
        self._subscriptions[topic_filter] = qos
        self._refusals.pop(topic_filter, None)
        if optional:
            self._optional.add(topic_filter)
        else:
            self._optional.discard(topic_filter)
        if topic_filter in self._granted:
            return
        if not optional:
            self._complete.clear()
        if not self.is_connected:
            return
        future = asyncio.get_running_loop().create_future()
        self._send_subscribe(topic_filter, [future])
        await future

    async def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription; returns once the broker acknowledged it (if connected)."""
        self._subscriptions.pop(topic_filter, None)
        self._granted.discard(topic_filter)
        self._optional.discard(topic_filter)
        self._refusals.pop(topic_filter, None)
        retry = self._retries.pop(topic_filter, None)
        if retry is not None:
            retry.cancel()
        self._check_complete()
        if not self.is_connected:
            return
        future = asyncio.get_running_loop().create_future()
        rc, mid = self._paho.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected after all: nothing to undo on the broker
        self._acks[mid] = _SubscribeRequest(topic_filter, [future])
        await future

    def _qos_for(self, topic_filter: str) -> int:
        asked = self._subscriptions.get(topic_filter, 1)
        cap = self._sub_qos if self._sub_qos is not None else self.url.subscription_qos
        return asked if cap is None else min(asked, cap)

    def _send_subscribe(self, topic_filter: str, futures: list[asyncio.Future[None]]) -> None:
        rc, mid = self._paho.subscribe(topic_filter, self._qos_for(topic_filter))
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
        if self._forbidden and any(char in topic for char in self._forbidden):
            raise BusError(f"publish to {topic} refused: the broker cannot carry {self._forbidden!r}")
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
            url = self.url
            will = self._will() if self._will else None
            self._paho.will_clear()
            if will is not None:
                self._paho.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
            self._use_url(url)
            if len(self.urls) > 1 and not await self._reachable(url):
                self._move_on()
                continue
            try:
                # Blocking TCP (and TLS) connect: quick on a LAN or loopback, and
                # the loop has nothing else to serve for this client until it is done.
                rc = self._paho.connect(url.host, url.port, keepalive=self._keepalive)
            except ssl.SSLCertVerificationError as exc:
                self._refused(f"TLS certificate of {url.host} does not verify: {exc.verify_message}")
                if self._fatal is not None:
                    return
                self._move_on()
                continue
            except (OSError, ssl.SSLError, ValueError) as exc:
                _LOGGER.info("connect to %s failed: %s", url.redacted(), exc)
                self._move_on()
                continue
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _LOGGER.info("connect to %s failed: %s", url.redacted(), paho.error_string(rc))
                self._move_on()
                continue
            # Wait for the CONNACK or the loss of this attempt; with several servers, not
            # for long: a server that takes the TCP connection but never answers is skipped.
            self._attempt_done = asyncio.Event()
            try:
                await asyncio.wait_for(self._attempt_done.wait(), self._attempt_timeout())
            except asyncio.TimeoutError:
                _LOGGER.info("no CONNACK from %s in time: trying the next server", url.redacted())
            if self.is_connected:
                return
            self._drop_socket()
            if self._fatal is not None:
                return
            self._move_on()

    def _attempt_timeout(self) -> float | None:
        """How long one connect attempt waits for its CONNACK: bounded when there is another server."""
        return max(2.0, min(self._connect_timeout, 5.0)) if len(self.urls) > 1 else None

    async def _reachable(self, url: BrokerUrl) -> bool:
        """A TCP connection to ``url`` opens within a few seconds (paho's own connect blocks the loop).

        Only with several servers: a host that is down without refusing (no RST) would
        otherwise hold the event loop for paho's whole socket timeout at every attempt.
        """
        timeout = max(1.0, min(self._connect_timeout, 3.0))
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(url.host, url.port), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            _LOGGER.info("connect to %s failed: %s", url.redacted(), exc or "timed out")
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    def _use_url(self, url: BrokerUrl) -> None:
        """Credentials and TLS of the URL about to be tried (each server of a list has its own)."""
        self._paho.username_pw_set(url.username, url.password)
        self.client_id = own_client_id(url.username, self._wanted_id)
        self._paho._client_id = self.client_id.encode()
        context = self._tls.get(self._index)
        # paho's tls_set_context may be called once per client; the attributes it sets are swapped here.
        self._paho._ssl = context is not None
        self._paho._ssl_context = context
        self._paho._tls_insecure = False

    def _move_on(self) -> None:
        """Try the next URL of the list next time."""
        if len(self.urls) > 1:
            self._index = (self._index + 1) % len(self.urls)

    def _refused(self, reason: str) -> None:
        """A refusal retrying cannot cure.

        Fatal for the first connect of ``start(wait=True)`` once every URL of the list refused.
        """
        message = f"{self.url.redacted()} refused the connection: {reason}"
        self._refused_urls[self._index] = message
        if self._fail_fast and not self._ever_connected and len(self._refused_urls) == len(self.urls):
            self._fatal = BusError("; ".join(self._refused_urls[i] for i in sorted(self._refused_urls)))
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
        client = self._paho
        left = _PACKETS_PER_READ
        while left > 0:
            client.loop_read()  # one packet (paho's own limit), the socket read when nothing is buffered
            left -= 1 + client.take_buffered(left - 1)  # the whole ones after it, without paho's reader
            if not client.buffered():
                return  # (the socket is read again when it has more: the reader is level-triggered)
        # Packets left in the buffer: the socket may have nothing new to wake the reader.
        if self._loop is not None:
            self._loop.call_soon(self._read)

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
        self._connection += 1
        self._granted.clear()
        self._refusals.clear()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for topic_filter in self._subscriptions:
            self._send_subscribe(topic_filter, waiting.pop(topic_filter, []))
        for futures in waiting.values():  # unsubscribed meanwhile: nothing to wait for
            _SubscribeRequest("", futures).settle()
        self._ever_connected = True
        self._refused_urls.clear()
        self._connected.set()
        self._settled.set()
        self._finish_attempt()
        _LOGGER.debug("connected to %s as %s", self.url.redacted(), self.client_id)
        # The births wait for the grants: whoever sees one can reach this client.
        self._hooks_due = True
        self._check_complete()

    def _check_complete(self) -> None:
        """Once connected with every subscription granted: set ``_complete``, run due hooks."""
        if not self.is_connected or self.missing_subscriptions:
            self._complete.clear()
            return
        self._complete.set()
        if not self._hooks_due:
            return
        self._hooks_due = False
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
        self._complete.clear()
        self._granted.clear()
        self._hooks_due = False
        self._finish_attempt()
        if self._closing:
            return
        if was_connected:
            _LOGGER.info("lost connection to %s: %s", self.url.redacted(), reason)
            if self._loop is not None:
                self._loop.call_soon(self._after_loss)

    def _after_loss(self) -> None:
        self._drop_socket()
        if not self._reconnect:
            self.lost.set()
            self._loss_task = asyncio.get_running_loop().create_task(self.close(), name="mqtt-lost")
            return
        self._move_on()  # the server may be gone: the next of the list first
        self._restart_connect_loop()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self._deliver(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.stats.received += 1
        if self._queue_limit and self._queue.qsize() >= self._queue_limit and qos == 0:
            self.stats.dropped += 1
            return
        self._queue.put_nowait(Message(topic, payload, qos, retain))

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[Any], _properties: Any
    ) -> None:
        request = self._acks.pop(mid, None)
        if request is None:
            return
        topic_filter = request.topic_filter
        refused = any(reason.is_failure for reason in reasons)
        if not refused:
            if topic_filter in self._subscriptions:
                self._granted.add(topic_filter)
                if self._refusals.pop(topic_filter, 0):
                    _LOGGER.warning("broker %s granted subscription to %s", self.url.redacted(), topic_filter)
            request.settle()
            self._check_complete()
            return
        # Never dropped: a cluster may refuse now and grant in a moment (an ACL would not).
        count = self._refusals.get(topic_filter, 0) + 1
        self._refusals[topic_filter] = count
        self._last_refusal = f"{self.url.redacted()} refused subscription to {topic_filter}"
        request.settle(BusError(self._last_refusal))
        if topic_filter not in self._subscriptions or self._closing:
            return
        optional = topic_filter in self._optional  # (an older ACL may refuse it everywhere)
        if count >= _REFUSALS_BEFORE_MOVING_ON and len(self.urls) > 1 and not optional:
            _LOGGER.warning("%s %d times: moving on to another server", self._last_refusal, count)
            self.abort()
            return
        low, high = _SUBSCRIBE_RETRY
        delay = min(low * 2 ** (count - 1), high) * (0.5 + random.random())  # noqa: S311 - jitter
        log = _LOGGER.info if optional and count > 1 else _LOGGER.warning
        log("%s (retrying in %.1f s)", self._last_refusal, delay)
        if self._loop is not None:
            old = self._retries.pop(topic_filter, None)
            if old is not None:
                old.cancel()
            self._retries[topic_filter] = self._loop.call_later(
                delay, self._retry_subscribe, topic_filter, self._connection
            )

    def _retry_subscribe(self, topic_filter: str, connection: int) -> None:
        self._retries.pop(topic_filter, None)
        if self._closing or not self.is_connected or connection != self._connection:
            return  # a reconnect renews every subscription anyway
        if topic_filter in self._subscriptions and topic_filter not in self._granted:
            self._send_subscribe(topic_filter, [])

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


#: Retry delays of a refused subscription (first, longest), jittered.
_SUBSCRIBE_RETRY = (0.5, 15.0)
#: Refusals of one subscription on one server after which a client with several URLs moves on.
_REFUSALS_BEFORE_MOVING_ON = 4

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
